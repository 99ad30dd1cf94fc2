"""`convsim train` on a CPU says in its first lines which precision it trains in (tiny model, this machine)."""

from __future__ import annotations

import json

from convsim.training.cpu import cpu_has_native_bf16
from tests.conftest import cli

TRAIN = ["--model", "tiny-llama", "--max-steps", "2", "--batch-size", "4", "--eval-steps", "50", "--json"]


def _first_lines(stderr: str, n: int = 5) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()][:n]


def test_train_prints_the_cpu_precision(data_dir, tmp_path):
    p = cli("train", data_dir, "--out", tmp_path / "auto", *TRAIN)
    want = "CPU: bf16 (native bf16" if cpu_has_native_bf16() else "CPU: fp32 (no native bf16"
    assert any(ln.startswith(want) for ln in _first_lines(p.stderr)), p.stderr[:2000]
    meta = json.loads((tmp_path / "auto" / "run.json").read_text())
    assert meta["frozen_dtype"] == ("bfloat16" if cpu_has_native_bf16() else "float32")


def test_forced_bf16_on_cpu_trains_and_says_so(data_dir, tmp_path):
    p = cli("train", data_dir, "--out", tmp_path / "bf16", *TRAIN, "--frozen-dtype", "bfloat16")
    assert any(ln.startswith("CPU: bf16 (forced by --frozen-dtype bfloat16") for ln in _first_lines(p.stderr))
    assert json.loads((tmp_path / "bf16" / "run.json").read_text())["frozen_dtype"] == "bfloat16"
    assert json.loads(p.stdout.strip().splitlines()[-1])["train_loss"] > 0
