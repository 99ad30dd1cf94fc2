"""More data of the same people for training only: `convsim import chitchat --other-chats` and
`convsim train --extra-data` (the held-out splits stay those of the main data; nothing from the held-out
period is trained on)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from convsim.data.examples import build_examples
from convsim.data.importers import Report, chitchat
from convsim.data.schema import Conversation, Message, write_conversations
from convsim.config import TrainConfig
from convsim.errors import UserError
from convsim.training.data import extra_summary, prepare_data
from tests.conftest import cli, synthetic_conversations

A, B, C, D = (
    "549cc1d1-0000-0000-0000-000000000001",
    "a54af4d5-0000-0000-0000-000000000002",
    "720840be-0000-0000-0000-000000000003",
    "99999999-0000-0000-0000-000000000004",
)


def _chat(*senders):
    return {
        "messages": [
            [{"text": f"hi from {s[:4]} {i}", "timestamp": f"2018-05-0{i + 1}T10:00:00Z", "sender": s}]
            for i, s in enumerate(senders)
        ]
    }


CHITCHAT = {
    "p1": _chat(A, B, A),
    "p2": _chat(B, A),
    "o1": _chat(A, C, A),
    "o2": _chat(D, B),
    "o3": _chat(C, D),
    "solo": _chat(A, A),
}


def test_other_chats_are_the_pairs_chats_with_everyone_else():
    pair = chitchat.parse_obj(CHITCHAT, "mini", Report(), pair=("549cc1d1", "a54af4d5"))
    rep = Report()
    others = chitchat.parse_obj(CHITCHAT, "mini", rep, pair=("549cc1d1", "a54af4d5"), other_chats=True)
    assert sorted(c.source for c in pair) == ["chitchat:p1", "chitchat:p2"]
    # the pair's chats with someone else; not the pair's own, not strangers alone, not one person alone
    assert sorted(c.source for c in others) == ["chitchat:o1", "chitchat:o2"]
    assert [[m.speaker for m in c.messages] for c in others] == [
        ["549cc1d1", "stranger", "549cc1d1"],
        ["stranger", "a54af4d5"],
    ]
    # the pair are named as in the pair's own import, so their tokens are the same people
    assert {m.speaker for c in pair for m in c.messages} == {"549cc1d1", "a54af4d5"}
    assert rep.notes["other_chats"] == {"chats": 2, "partners": 2}
    assert rep.dropped["pair_not_selected"] == 3 + 2 + 2 + 2
    with pytest.raises(UserError, match="needs --pair"):
        chitchat.parse_obj(CHITCHAT, "mini", Report(), other_chats=True)


def _write(path, convs):
    path.mkdir(parents=True, exist_ok=True)
    write_conversations(path / "conversations.jsonl", convs)
    return path


def _extra(start: datetime, n=6):
    """Ana's chats with a stranger, one a day from `start`, each 10 messages a minute apart."""
    out = []
    for k in range(n):
        t = start + timedelta(days=k)
        msgs = [
            Message("Ana" if i % 2 else "Zed", f"extra {k} {i}", (t + timedelta(minutes=i)).isoformat())
            for i in range(10)
        ]
        out.append(Conversation(f"c{k:03d}", msgs, "extra"))
    return out


def test_extra_data_trains_only_and_never_from_the_held_out_period(tmp_path):
    main = synthetic_conversations()  # 12 conversations from 2024-01-01, a day apart
    main_dir = _write(tmp_path / "main", main)
    extra_dir = _write(tmp_path / "extra", _extra(datetime(2024, 1, 5, 9, 0, tzinfo=timezone.utc), n=12))
    cfg = TrainConfig(context_size=4)
    convs0, speakers0, targets0, split0, ex0 = prepare_data(cfg, str(main_dir))
    cfg.extra_data = [str(extra_dir)]
    convs, speakers, targets, split, ex = prepare_data(cfg, str(main_dir))
    # validation and test: exactly the main data's, examples and all
    for name in ("val", "test"):
        assert [c.id for c in split[name]] == [c.id for c in split0[name]]
        assert ex[name] == ex0[name]
    # the people simulated by default are the main data's; the stranger only gets a token
    assert targets == targets0 == ["Ana", "Ben"] and speakers == ["Ana", "Ben", "Zed"]
    # no extra message from the held-out period (the first validation conversation's start) on
    cutoff = min(c.messages[0].time for c in split["val"] + split["test"])
    extra = [c for c in split["train"] if c.id.startswith("x0:")]
    assert extra and all(m.time < cutoff for c in extra for m in c.messages)
    n_before = sum(
        m.time < cutoff for c in _extra(datetime(2024, 1, 5, 9, 0, tzinfo=timezone.utc), n=12) for m in c.messages
    )
    assert sum(len(c.messages) for c in extra) == n_before < 120
    # more training examples: Ana's replies in the extra chats
    assert len(ex["train"]) > len(ex0["train"]) and {e.speaker for e in ex["train"]} == {"Ana", "Ben"}
    assert extra_summary(cfg, convs, speakers) == {
        "dirs": [str(extra_dir)],
        "conversations": len(extra),
        "messages": n_before,
        "speakers_only_here": ["Zed"],
    }


def test_extra_data_errors(tmp_path):
    main_dir = _write(tmp_path / "main", synthetic_conversations())
    with pytest.raises(UserError, match="no conversations.jsonl"):
        prepare_data(TrainConfig(extra_data=[str(tmp_path / "missing")]), str(main_dir))
    many = [
        Conversation(
            f"c{k}",
            [Message(f"p{k}", "hi", "2020-01-01T00:00:00+00:00"), Message("Ana", "yo", "2020-01-01T00:01:00+00:00")],
            "x",
        )
        for k in range(300)
    ]
    with pytest.raises(UserError, match="more than 256"):
        prepare_data(TrainConfig(extra_data=[str(_write(tmp_path / "many", many))]), str(main_dir))


def test_train_and_eval_with_extra_data(tmp_path):
    """Through the CLI: the run records the extra data, and `eval` reports the simulated people only, with a
    speaker classifier that was not trained on the stranger."""
    main_dir = _write(tmp_path / "main", synthetic_conversations())
    extra_dir = _write(tmp_path / "extra", _extra(datetime(2023, 12, 1, 9, 0, tzinfo=timezone.utc)))
    run = tmp_path / "run"
    cli(
        "train",
        main_dir,
        "--extra-data",
        extra_dir,
        "--out",
        run,
        "--model",
        "tiny-gemma3",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--context-size",
        "4",
        "--json",
    )
    meta = json.loads((run / "run.json").read_text())
    assert meta["context_size"] == 4 and meta["targets"] == ["Ana", "Ben"]
    assert meta["extra_data"]["conversations"] == 6 and meta["extra_data"]["speakers_only_here"] == ["Zed"]
    # the speaker classifier learns from the chat itself only: the same messages as without --extra-data
    from convsim.evaluation.evaluate import ruler_examples
    from convsim.runs import open_run

    run_ = open_run(run)
    ruler = ruler_examples(run_)
    assert ruler and not any(e.conv_id.startswith("x0:") for e in ruler)
    assert {e.speaker for e in ruler} == {"Ana", "Ben"}
    assert len(ruler) < len(build_examples(run_.split("train"), None, 4, 8))
    out = tmp_path / "eval.json"
    cli("eval", run, "--n", "2", "--batch-size", "2", "--max-new-tokens", "4", "--json", "--out", out)
    res = json.loads(out.read_text())
    assert sorted(res["speakers"]) == ["Ana", "Ben"]
    for row in res["speakers"].values():
        assert 0.0 <= row["speaker_id_real"] <= 1.0


def test_import_other_chats_of_the_top_pair(tmp_path):
    """The embedded data: the top pair's 565 chats with 154 other people (the headline's extra data)."""
    from convsim.data.import_cli import import_chats

    convs, summary = import_chats(["chitchat"], top_pair=True, other_chats=True)
    assert summary["speakers"] == {"stranger": 16_254, "549cc1d1": 16_131, "a54af4d5": 1_549}
    assert summary["sources"][0]["other_chats"] == {"chats": 565, "partners": 154}
    assert summary["options"]["other_chats"] is True
    with pytest.raises(UserError, match="needs --pair or --top-pair"):
        import_chats(["chitchat"], other_chats=True)


def test_extra_data_ratio_keeps_the_most_recent_conversations(tmp_path):
    main_dir = _write(tmp_path / "main", synthetic_conversations())
    extra_dir = _write(tmp_path / "extra", _extra(datetime(2023, 11, 1, 9, 0, tzinfo=timezone.utc), n=12))
    _, _, _, split0, _ = prepare_data(TrainConfig(context_size=4), str(main_dir))
    n_train = sum(len(c.messages) for c in split0["train"])
    cfg = TrainConfig(context_size=4, extra_data=[str(extra_dir)], extra_data_ratio=25 / n_train)
    _, _, _, split, _ = prepare_data(cfg, str(main_dir))
    kept = [c for c in split["train"] if c.id.startswith("x0:")]
    # 10 messages a conversation, at most 25 messages: the two latest days
    assert [c.id for c in kept] == ["x0:c010", "x0:c011"]
    with pytest.raises(UserError, match="extra-data-ratio"):
        TrainConfig(extra_data_ratio=-1).validate()


def test_train_uses_data_dir_extra_unless_told_not_to(tmp_path):
    """The GPU recipe trains on data/extra too; the CPU recipe (the default without a GPU) leaves it out and
    says so, unless a flag asks for it."""
    main_dir = _write(tmp_path / "main", synthetic_conversations())
    _write(main_dir / "extra", _extra(datetime(2023, 12, 1, 9, 0, tzinfo=timezone.utc)))
    common = ["--model", "tiny-gemma3", "--max-steps", "1", "--batch-size", "4", "--context-size", "4"]
    cli("train", main_dir, "--out", tmp_path / "auto", "--recipe", "gpu", *common)
    meta = json.loads((tmp_path / "auto" / "run.json").read_text())
    assert meta["extra_data"]["dirs"] == [str((main_dir / "extra").resolve())]
    assert meta["extra_data"]["conversations"] == 6
    cli("train", main_dir, "--out", tmp_path / "none", "--recipe", "gpu", "--no-auto-extra-data", *common)
    assert json.loads((tmp_path / "none" / "run.json").read_text())["extra_data"]["dirs"] == []
    p = cli("train", main_dir, "--out", tmp_path / "cpu", "--recipe", "cpu", *common)
    assert "data/extra left out" in p.stderr
    assert json.loads((tmp_path / "cpu" / "run.json").read_text())["extra_data"]["dirs"] == []
    cli("train", main_dir, "--out", tmp_path / "cpu-extra", "--recipe", "cpu", "--auto-extra-data", *common)
    assert json.loads((tmp_path / "cpu-extra" / "run.json").read_text())["extra_data"]["dirs"]


def test_extra_data_paths_are_kept_absolute_and_checked_on_resume(tmp_path):
    """--extra-data typed relative to one directory: the run keeps it absolute, so --continue-training from
    another directory finds it; once the data has moved, resuming is one error line naming the path."""
    import os
    import subprocess
    import sys

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    _write(work / "main", synthetic_conversations())
    extra_dir = _write(work / "extra", _extra(datetime(2023, 12, 1, 9, 0, tzinfo=timezone.utc)))
    elsewhere.mkdir()
    run = tmp_path / "run"

    def convsim(cwd, *args):
        return subprocess.run(
            [sys.executable, "-m", "convsim", *map(str, args)],
            capture_output=True,
            text=True,
            cwd=cwd,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=600,
        )

    common = ["--model", "tiny-gemma3", "--batch-size", "4", "--context-size", "4", "--save-steps", "2"]
    p = convsim(work, "train", "main", "--extra-data", "extra", "--out", run, "--max-steps", "2", *common)
    assert p.returncode == 0, p.stderr[-3000:]
    want = str(extra_dir.resolve())
    assert json.loads((run / "run.json").read_text())["extra_data"]["dirs"] == [want]
    assert want in (run / "config.yaml").read_text()

    p = convsim(elsewhere, "train", work / "main", "--out", run, "--continue-training", "--max-steps", "4", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    meta = json.loads((run / "run.json").read_text())
    assert meta["resumed_from"] == "checkpoint-2" and meta["extra_data"]["conversations"] == 6

    moved = work / "extra-moved"
    extra_dir.rename(moved)
    before = (run / "run.json").read_text()
    p = convsim(elsewhere, "train", work / "main", "--out", run, "--continue-training", "--max-steps", "6")
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --extra-data ") and "Traceback" not in p.stderr
    assert want in lines[0] and str(run / "config.yaml") in lines[0] and "--extra-data" in lines[0]
    assert (run / "run.json").read_text() == before
    # given its new place, the run goes on
    p = convsim(
        elsewhere,
        "train",
        work / "main",
        "--out",
        run,
        "--continue-training",
        "--max-steps",
        "6",
        "--extra-data",
        moved,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["extra_data"]["dirs"] == [str(moved.resolve())]


def test_a_runs_people_are_its_targets_never_extra_only_speakers(tmp_path):
    """A run trained with --extra-data knows the stranger's name (a speaker token, context) but the stranger
    is not one of its people: not in plots, not a model to serve, not someone to chat as."""
    from convsim.runs import open_run
    from convsim.serve.schemas import ApiError
    from convsim.serve.service import Service

    main_dir = _write(tmp_path / "main", synthetic_conversations())
    extra_dir = _write(tmp_path / "extra", _extra(datetime(2023, 12, 1, 9, 0, tzinfo=timezone.utc)))
    run = tmp_path / "run"
    common = ["--model", "tiny-gemma3", "--max-steps", "2", "--batch-size", "4", "--context-size", "4"]
    cli("train", main_dir, "--extra-data", extra_dir, "--out", run, *common)
    figs = tmp_path / "figs"
    report = json.loads(cli("plots", run, "--out", figs, "--sample", "40", "--json").stdout)
    files = {f["file"] for f in report["figures"]}
    assert {"emotion-finetuned-Ana.png", "emotion-finetuned-Ben.png"} <= files
    assert not any("Zed" in f for f in files), files
    page = (figs / "index.html").read_text(encoding="utf-8")
    assert "people Ana, Ben," in page and "Zed" not in page

    p = cli("chat", run, "--as", "Zed", input="/quit\n", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "only in --extra-data" in p.stderr

    svc = Service.from_run(run)
    try:
        assert svc.entries[0].speakers == ["Ana", "Ben"] and not any("Zed" in i for i in svc.model_ids())
        with pytest.raises(ApiError, match="does not exist"):
            svc.job_for({"model": "convsim/Zed", "messages": [{"role": "user", "content": "hi"}]})
        # the stranger may still appear in a history: the model reads them as context
        job = svc.job_for({"model": "convsim/Ana", "messages": [{"role": "user", "name": "Zed", "content": "hi"}]})
        assert job.speaker == "Ana"
    finally:
        svc.close()
    run_ = open_run(run)
    assert run_.speakers == ["Ana", "Ben", "Zed"] and run_.people == ["Ana", "Ben"]


def test_pair_repeat_shows_the_chats_own_examples_n_times_and_the_extra_once(tmp_path):
    main_dir = _write(tmp_path / "main", synthetic_conversations())
    extra_dir = _write(tmp_path / "extra", _extra(datetime(2024, 1, 5, 9, 0, tzinfo=timezone.utc), n=12))
    cfg = TrainConfig(context_size=4, extra_data=[str(extra_dir)])
    *_, ex1 = prepare_data(cfg, str(main_dir))
    cfg.pair_repeat = 3
    *_, ex3 = prepare_data(cfg, str(main_dir))
    own = [e for e in ex1["train"] if not e.conv_id.startswith("x0:")]
    extra = [e for e in ex1["train"] if e.conv_id.startswith("x0:")]
    assert own and extra
    assert sorted(map(repr, ex3["train"])) == sorted(map(repr, own * 3 + extra))
    assert ex3["val"] == ex1["val"] and ex3["test"] == ex1["test"]  # held-out examples never repeat
    # without extra data there is nothing to weigh against: the examples are the chat's, once
    *_, ex_alone = prepare_data(TrainConfig(context_size=4, pair_repeat=3), str(main_dir))
    *_, ex_alone1 = prepare_data(TrainConfig(context_size=4), str(main_dir))
    assert ex_alone["train"] == ex_alone1["train"]
    with pytest.raises(UserError, match="pair-repeat"):
        TrainConfig(pair_repeat=0).validate()
