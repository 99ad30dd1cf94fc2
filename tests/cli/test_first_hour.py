"""What a new user sees first, end to end: the demo's summary follows its printed table, its progress is
labelled, id-like people get friendly aliases, and reply/chat/serve never show an empty reply without a
word. The pieces alone (summary sentences, aliases, stop hold-off, tag cut): tests/unit/test_readable_output.py."""

import json
import re
import sys

import pytest
import yaml

from conftest import cli

from convsim.training.cpu_recipe import CPU_RECIPE


def parse_table(stdout: str) -> dict[str, tuple[float, float, float]]:
    lines = stdout.split("=== 3/5")[1].split("=== 4/5")[0].strip().splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("person"))
    rows = {}
    for line in lines[i + 1 :]:
        m = re.match(r"(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", line)
        if m:
            rows[m.group(1)] = tuple(float(m.group(k)) for k in (2, 3, 4))
    return rows


def test_demo_end_to_end_tiny(tmp_path):
    p = cli("demo", "--model", "tiny-gemma3", "--steps", "2", "--eval-n", "2", "--out", tmp_path / "demo")
    rows = parse_table(p.stdout)
    assert len(rows) == 2 and all(re.match(r"\w+ \(\w{8}\)$", name) for name in rows)  # aliases beside ids
    said = p.stdout.split("=== what the table shows")[1].split("=== 5/5")[0].strip().splitlines()
    for name, (ft, ic, base) in rows.items():
        line = next(s for s in said if s.startswith(name + ":"))
        word = "beat" if ft < ic else ("tied with" if ft == ic else "lost to")
        assert f"fine-tuning {word} prompting ({ft:.1f} vs {ic:.1f})" in line, line
    wins = sum(ft < ic for ft, ic, _ in rows.values())
    last = said[-1]
    if wins == len(rows):
        assert last.startswith("Fine-tuning beat prompting for every person here")
    elif wins:
        assert last.startswith(f"Fine-tuning beat prompting for {wins} of {len(rows)} people")
    else:
        assert last.startswith("Fine-tuning did not beat prompting for anyone here")
    assert "after 2 steps of 8 examples" in last
    talk_to = re.search(r"# talk to (.+)$", p.stdout, re.M).group(1).strip()
    assert talk_to in rows  # the next steps name the person as the table does
    saved = json.loads((tmp_path / "demo" / "demo-eval.json").read_text())
    assert saved["summary"] == said
    # progress: labelled phases on stderr, no raw trainer dicts anywhere
    assert "training:" in p.stderr and "validation at step 2" in p.stderr and "saving the adapter" in p.stderr
    assert "{'loss'" not in p.stdout + p.stderr and "'train_runtime'" not in p.stdout + p.stderr
    # on a CPU the demo trains `convsim train`'s CPU recipe, with its steps instead of the probe's work
    cfg = yaml.safe_load((tmp_path / "demo" / "config.yaml").read_text())
    assert {k: cfg[k] for k in ("context_size", "batch_size", "auto_extra_data")} == {
        k: CPU_RECIPE[k] for k in ("context_size", "batch_size", "auto_extra_data")
    }
    assert "CPU recipe: 8 messages of context, batches of 8" in p.stderr and "probing" not in p.stderr


def test_demo_rejects_bad_steps(tmp_path):
    p = cli("demo", "--steps", "0", "--out", tmp_path / "d", check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error:")
    assert not (tmp_path / "d").exists() and not (tmp_path / "d-data").exists()


# ----------------------------------------------------------------------------- empty replies


@pytest.fixture
def empty_generation(monkeypatch):
    """Generation that returns empty bursts, as an undertrained model can: `reply` and `stream_reply` for
    the commands, the batched rows for the server (each stopped at once by another speaker's tag)."""
    import convsim.inference.generate as gen
    import convsim.serve.batch as batch

    def nothing(model, tok, fmt, history, speaker, cfg=None, n=1, cache=None, guard=None):
        return [[] for _ in range(n)]

    def stream_nothing(*a, **kw):
        return iter(())

    def rows_of_nothing(model, tok, rows, pad_id, vocab=None, guard=None):
        for r in rows:
            r.ids, r.stop = [], r.stops[0]
        return rows

    monkeypatch.setattr(gen, "reply", nothing)
    monkeypatch.setattr(gen, "stream_reply", stream_nothing)
    monkeypatch.setattr(batch, "generate_rows", rows_of_nothing)


def run_main(argv, capsys, monkeypatch, stdin=""):
    import io

    from convsim.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_reply_never_empty_silently(tiny_run, tmp_path, empty_generation, capsys, monkeypatch):
    h = tmp_path / "h.txt"
    h.write_text("[Ben] are you coming?\n")
    rc, out, err = run_main(["reply", tiny_run, "--as", "Ana", "--history", h], capsys, monkeypatch)
    assert rc == 0 and out.strip() == "[Ana] …" and "reply came out empty" in err
    rc, out, err = run_main(["reply", tiny_run, "--as", "Ana", "--history", h, "--json"], capsys, monkeypatch)
    got = json.loads(out)["replies"][0]
    assert got["messages"] == [] and "reply came out empty" in got["note"] and "reply came out empty" in err


@pytest.mark.parametrize("stream", [False, True])
def test_chat_never_empty_silently(tiny_run, empty_generation, capsys, monkeypatch, stream):
    argv = ["chat", tiny_run, "--as", "Ana"] + (["--stream"] if stream else [])
    rc, out, err = run_main(argv, capsys, monkeypatch, stdin="hi!\n/quit\n")
    assert rc == 0 and "[Ana] …" in out and "reply came out empty" in err


def test_serve_never_empty_silently(tiny_run, empty_generation):
    from test_serve import AUTH, KEY, chat, serving, sse_events

    ask = {"model": "convsim/Ana", "messages": [{"role": "user", "content": "hi"}]}
    with serving(tiny_run, api_key=KEY) as (url, _):
        status, _, data = chat(url, ask, AUTH)
        body = json.loads(data)
        assert status == 200 and body["choices"][0]["message"]["content"] == ""
        assert body["choices"][0]["finish_reason"] == "stop" and body["convsim"]["messages"] == [[]]
        assert "reply came out empty" in body["convsim"]["note"]
        status, _, data = chat(url, {**ask, "stream": True, "stream_options": {"include_usage": True}}, AUTH)
    events = sse_events(data)
    assert status == 200 and not any(e["choices"][0]["delta"].get("content") for e in events if e["choices"])
    # the note comes in a chunk of its own, before the final chunk (and the usage)
    note = next(k for k, e in enumerate(events) if "convsim" in e)
    assert events[note]["choices"] == [] and "reply came out empty" in events[note]["convsim"]["note"]
    assert events[note + 1]["choices"][0]["finish_reason"] == "stop" and "usage" in events[note + 2]
