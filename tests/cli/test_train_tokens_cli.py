"""`convsim train --train-tokens N`: the run trains the steps that N tokens make, and says so."""

import json

from conftest import cli


def test_train_tokens_sets_the_steps(data_dir, tmp_path):
    out = tmp_path / "r"
    p = cli(
        *("train", data_dir, "--out", out, "--model", "tiny-llama", "--train-tokens", "3000"),
        *("--batch-size", "4", "--context-size", "4", "--eval-steps", "1000", "--save-steps", "1000"),
    )
    line = next(ln for ln in p.stderr.splitlines() if ln.startswith("training on about 3,000 tokens"))
    steps = int(line.split(": ")[1].split()[0])
    assert steps >= 2 and json.loads((out / "run.json").read_text())["global_step"] == steps
    assert "train_tokens: 3000" in (out / "config.yaml").read_text()


def test_cpu_recipe_sizes_the_work_by_a_probe_and_says_so(data_dir, tmp_path):
    out = tmp_path / "cpu"
    p = cli(
        *("train", data_dir, "--out", out, "--model", "tiny-llama", "--recipe", "cpu", "--cpu-minutes", "0.001"),
        *("--save-steps", "1000"),
    )
    lines = p.stderr.splitlines()
    assert any(ln.startswith("CPU recipe: 8 messages of context, batches of 8") for ln in lines)
    work = next(ln for ln in lines if ln.startswith("CPU recipe work: "))
    tokens = int(work.split("CPU recipe work: ")[1].split(" tokens")[0].replace(",", ""))
    steps = int(
        next(ln for ln in lines if ln.startswith(f"training on about {tokens:,} tokens")).split(": ")[1].split()[0]
    )
    meta = json.loads((out / "run.json").read_text())
    assert meta["global_step"] == steps and meta["context_size"] == 8
    saved = (out / "config.yaml").read_text()
    assert f"train_tokens: {tokens}" in saved and "recipe: cpu" in saved  # a resumed run keeps the same work
