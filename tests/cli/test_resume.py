"""Resume after SIGKILL (issue #4): a training run killed mid-way and continued with `--continue-training`
ends where an uninterrupted run ends, and a half-written checkpoint is never resumed from.

    pytest tests/cli/test_resume.py        # ~40 s on 2 idle CPU cores (three tiny-gemma3 runs through the CLI)
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from convsim.training.checkpoints import clean_checkpoints, complete_checkpoint, last_checkpoint, publish_checkpoint

STEPS, SAVE = 30, 3  # 90 training examples / batch 4: the run crosses an epoch boundary at step 23


# one thread: a tiny model gains nothing from more, and the three runs must do their sums the same way
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def convsim(*args):
    p = subprocess.run(
        [sys.executable, "-m", "convsim", *map(str, args)], capture_output=True, text=True, env=ENV, timeout=600
    )
    assert p.returncode == 0, f"convsim {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr[-3000:]}"
    return p


def train_args(data_dir, out, cfg):
    return [
        "train",
        data_dir,
        "--out",
        out,
        "--model",
        "tiny-gemma3",
        "--max-steps",
        STEPS,
        "--save-steps",
        SAVE,
        "--eval-steps",
        1000,
        "--batch-size",
        4,
        "--seed",
        7,
        "--config",
        cfg,
        "--json",
    ]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), "metrics.jsonl repeats steps after the resume"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def kill_after_checkpoint(argv, ckpt_dir: Path, min_step: int) -> int:
    """Start training, SIGKILL it once a checkpoint at `min_step` or later exists; return that step.
    While polling, every checkpoint-N seen must already be whole (written elsewhere, renamed in)."""
    p = subprocess.Popen(
        [sys.executable, "-m", "convsim", *map(str, argv)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            seen = [d for d in ckpt_dir.glob("checkpoint-*")] if ckpt_dir.is_dir() else []
            for d in seen:
                whole = (d / "trainer_state.json").exists()
                assert whole or not d.exists(), f"{d.name} visible before it was complete"
            done = [int(d.name.split("-")[1]) for d in seen if (d / "trainer_state.json").exists()]
            if done and max(done) >= min_step:
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL, f"training ended ({p.returncode}) before it could be killed"
    return max(done)


def test_kill_and_resume_ends_where_uninterrupted_ends(tmp_path, data_dir):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("logging_steps: 1\nsamples: 0\nmax_val_examples: 8\nlearning_rate: 0.003\n")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ref = json.loads(convsim(*train_args(data_dir, ref_dir, cfg)).stdout.strip().splitlines()[-1])
    killed_at = kill_after_checkpoint(train_args(data_dir, run_dir, cfg), run_dir / "checkpoints", 2 * SAVE)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "training"
    last = last_checkpoint(run_dir / "checkpoints")
    assert last is not None and 2 * SAVE <= int(last.name.split("-")[1]) < STEPS
    # as if killed while writing the next checkpoint in place (transformers' own way): a checkpoint-N
    # with weights but no trainer state, and a leftover staging dir; neither may be resumed from
    half = last.with_name(f"checkpoint-{int(last.name.split('-')[1]) + SAVE}")
    shutil.rmtree(half, ignore_errors=True)
    half.mkdir()
    shutil.copy(last / "adapter_model.safetensors", half)
    (run_dir / "checkpoints" / ".staging" / half.name).mkdir(parents=True, exist_ok=True)

    # the docstring's way to resume: no other flags; the run's config.yaml supplies them
    p = convsim("train", data_dir, "--out", run_dir, "--continue-training", "--json")
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert "incomplete checkpoint" in p.stderr

    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "done" and meta["resumed_from"] == last.name and got["steps"] == STEPS
    assert abs(got["train_loss"] - ref["train_loss"]) < 1e-3, (got, ref, killed_at)
    assert abs(got["eval_loss"] - ref["eval_loss"]) < 1e-3
    ref_losses, got_losses = losses(ref_dir), losses(run_dir)
    assert sorted(got_losses) == list(range(1, STEPS + 1))
    assert max(abs(ref_losses[s] - got_losses[s]) for s in ref_losses) < 1e-3
    a, b = (
        load_file(ref_dir / "adapter" / "adapter_model.safetensors"),
        load_file(run_dir / "adapter" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    left = sorted(d.name for d in (run_dir / "checkpoints").iterdir() if d.is_dir())
    assert left == [f"checkpoint-{STEPS - SAVE}", f"checkpoint-{STEPS}"]  # save_total_limit 2, no debris


def _fake_checkpoint(d: Path, step: int, whole=True):
    d.mkdir(parents=True)
    for f in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (d / f).write_bytes(b"x")
    if whole:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_incomplete_checkpoints_are_skipped_and_replaced(tmp_path):
    ck = tmp_path / "checkpoints"
    _fake_checkpoint(ck / "checkpoint-3", 3)
    _fake_checkpoint(ck / "checkpoint-6", 6)
    _fake_checkpoint(ck / "checkpoint-9", 9, whole=False)  # killed before trainer_state.json
    (ck / "checkpoint-12").mkdir()  # killed right after mkdir
    _fake_checkpoint(ck / "checkpoint-15", 99)  # state of another step: not ours
    assert last_checkpoint(ck).name == "checkpoint-6"
    assert not complete_checkpoint(ck / "checkpoint-9")
    clean_checkpoints(ck)
    assert sorted(p.name for p in ck.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    # a checkpoint-N left behind is replaced whole by the new one; only the newest `keep` remain
    _fake_checkpoint(ck / "checkpoint-9", 9, whole=False)
    _fake_checkpoint(ck / ".staging" / "checkpoint-9", 9)
    publish_checkpoint(ck / ".staging" / "checkpoint-9", ck / "checkpoint-9", keep=2)
    assert complete_checkpoint(ck / "checkpoint-9")
    assert sorted(p.name for p in ck.iterdir()) == [".staging", "checkpoint-6", "checkpoint-9"]
    assert last_checkpoint(tmp_path / "missing") is None


def test_keep_best_survives_kill_and_resume(tmp_path, data_dir):
    """--keep-best killed mid-run and resumed ends with the same kept weights as an uninterrupted run. A kept
    best newer than the checkpoint resumed from is dropped (the resumed run meets that evaluation again): one
    is planted with a loss nothing can beat, and must not survive."""
    cfg = tmp_path / "train.yaml"
    cfg.write_text("logging_steps: 1\nsamples: 0\nmax_val_examples: 8\nlearning_rate: 0.05\n")

    def args(out):
        return [
            "train",
            data_dir,
            "--out",
            out,
            "--model",
            "tiny-gemma3",
            "--max-steps",
            18,
            "--save-steps",
            SAVE,
            "--eval-steps",
            2,
            "--batch-size",
            4,
            "--seed",
            7,
            "--config",
            cfg,
            "--keep-best",
            "--json",
        ]

    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    convsim(*args(ref_dir))
    ref = json.loads((ref_dir / "run.json").read_text())
    kill_after_checkpoint(args(run_dir), run_dir / "checkpoints", 2 * SAVE)
    resume_step = int(last_checkpoint(run_dir / "checkpoints").name.split("-")[1])
    planted = {"step": resume_step + 1, "eval_loss": -1.0}
    assert (run_dir / "best" / "best.json").exists()
    (run_dir / "best" / "best.json").write_text(json.dumps(planted))
    convsim("train", data_dir, "--out", run_dir, "--continue-training", "--json")
    got = json.loads((run_dir / "run.json").read_text())
    assert got["kept_best"] != planted and got["kept_best"]["step"] == ref["kept_best"]["step"], (got, ref)
    assert abs(got["eval_loss"] - ref["eval_loss"]) < 1e-3
    a = load_file(ref_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
