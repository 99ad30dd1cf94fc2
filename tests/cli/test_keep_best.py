"""--keep-best: a run ends with the weights of its lowest validation loss, and they are what it saves."""

import json

import pytest

from convsim.data.schema import write_conversations
from conftest import cli, synthetic_conversations


def test_keep_best_ends_with_the_lowest_validation_loss(tmp_path):
    data_dir = tmp_path / "data"
    write_conversations(data_dir / "conversations.jsonl", synthetic_conversations(20, 20))
    conf = tmp_path / "c.yaml"
    conf.write_text("logging_steps: 2\nsamples: 0\n")
    out = tmp_path / "run"
    # a learning rate high enough that the validation loss turns back up before the end
    cli(
        "train",
        data_dir,
        "--out",
        out,
        "--model",
        "tiny-gemma3",
        "--max-steps",
        "12",
        "--batch-size",
        "8",
        "--learning-rate",
        "3e-1",
        "--eval-steps",
        "2",
        "--save-steps",
        "100",
        "--seed",
        "0",
        "--keep-best",
        "--config",
        conf,
    )
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    meta = json.loads((out / "run.json").read_text())
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert best_step < meta["global_step"], evals  # the case that matters: the best is not the last
    assert meta["kept_best"]["step"] == best_step
    assert meta["eval_loss"] == pytest.approx(best_loss, abs=1e-5)
    # the saved adapter is the kept one: evaluating it again gives the best loss, not the last step's
    last_loss = [l for s, l in evals if s == meta["global_step"]][0]
    assert abs(last_loss - best_loss) > 1e-3
    assert (out / "best" / "trained.pt").exists()


def test_keep_best_is_refused_under_several_processes(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    p = cli(
        "train",
        data_dir,
        "--out",
        tmp_path / "r",
        "--model",
        "tiny-gemma3",
        "--max-steps",
        "2",
        "--keep-best",
        check=False,
    )
    assert p.returncode == 2 and "--keep-best" in p.stderr and "Traceback" not in p.stderr
