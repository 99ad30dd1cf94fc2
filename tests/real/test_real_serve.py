"""Tier 3: `convsim serve`'s batched decoding on the embedded Gemma 3 270M (tied head, left padding):
requests decoded together in one batch, and runs of two pairs of people on one base, each give exactly
the greedy reply `convsim.inference.generate.reply` gives alone."""

from __future__ import annotations

import time

import pytest

from convsim.data.schema import Message, write_conversations
from convsim.inference.nocopy import for_run
from convsim.serve.service import Service

from conftest import cli, synthetic_conversations

pytestmark = pytest.mark.real


def lone(model, tok, fmt, text, speaker, other, guard):
    """The greedy reply `reply` gives alone (no server, no batch), with the copy guard the server uses."""
    from convsim.inference.generate import SampleConfig, reply

    cfg = SampleConfig(temperature=0, max_new_tokens=48)
    return reply(model, tok, fmt, [Message(other, text)], speaker, cfg, guard=guard)[0]


def train_one_step(data, out) -> None:
    """The embedded model trained for one step: enough for the new speaker rows and an adapter to exist."""
    cli("train", data, "--out", out, "--batch-size", "2", "--max-steps", "1", "--eval-steps", "1000",
        "--max-val-examples", "2", "--json")  # fmt: skip


def wait_for(fn, timeout, what):
    deadline = time.time() + timeout
    while not fn():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_real_model_batched_rows_equal_their_lone_replies(tmp_path, data_dir):
    """Gemma 3 270M: four requests of different lengths and people decoded in one left-padded batch each
    give exactly the greedy reply `convsim.inference.generate.reply` gives alone."""
    from convsim.runs import open_run

    run_dir = tmp_path / "run"
    train_one_step(data_dir, run_dir)
    run = open_run(run_dir)
    model, tok = run.load()
    cases = [
        ("Ana", "Ben", "hey how are you"),
        ("Ben", "Ana", "I am reading a book about history. What about you?"),
        ("Ana", "Ben", "lol"),
        ("Ben", "Ana", "are you coming tonight? we are meeting at the station at eight"),
    ]
    guard = for_run(run, tok)
    wants = [lone(model, tok, run.fmt, text, who, other, guard) for who, other, text in cases]
    assert sum(map(bool, wants)) >= 2, wants  # replies with text to compare
    svc = Service.from_run(run_dir)
    try:
        jobs = [
            svc.job_for(
                {
                    "model": f"convsim/{who}",
                    "temperature": 0,
                    "max_tokens": 48,
                    "stream": i == 1,
                    "messages": [{"role": "user", "content": text}],
                }
            )
            for i, (who, _, text) in enumerate(cases)
        ]
        with svc.model_lock:
            svc.submit(svc.job_for({"model": "convsim/Ana", "messages": [], "max_tokens": 1}))
            wait_for(lambda: svc.busy, 60, "the worker")
            for j in jobs:
                svc.submit(j)
        for i, (j, want) in enumerate(zip(jobs, wants)):
            events = [j.wait(300)]
            while events[-1][0] == "delta":
                events.append(j.wait(300))
            assert events[-1][0] == "done" and events[-1][1] == [want], (cases[i], events[-1], want)
            if j.stream:
                assert "".join(e[1] for e in events[:-1]) == "\n".join(want)
        assert len({j.batch for j in jobs}) == 1 and jobs[0].batch[1] == 4
    finally:
        svc.close()
    # a second run of other people beside it (tied head: PEFT's trainable rows of the embedding and head
    # must switch with the adapter): each run's people answer as that run does alone
    other_data = tmp_path / "cd"
    write_conversations(other_data / "conversations.jsonl", synthetic_conversations(seed=5, speakers=("Cy", "Dee")))
    train_one_step(other_data, tmp_path / "cd-run")
    other = open_run(tmp_path / "cd-run")
    other_model, other_tok = other.load()
    want_cy = lone(other_model, other_tok, other.fmt, "hey how are you", "Cy", "Dee", for_run(other, other_tok))
    svc = Service.from_runs([run_dir, tmp_path / "cd-run"])
    try:
        for model_id, want in [("convsim/Cy", want_cy), ("convsim/Ana", wants[0])]:
            j = svc.job_for(
                {
                    "model": model_id,
                    "temperature": 0,
                    "max_tokens": 48,
                    "messages": [{"role": "user", "content": "hey how are you"}],
                }
            )
            svc.submit(j)
            assert j.wait(300)[1] == [want], model_id
    finally:
        svc.close()
