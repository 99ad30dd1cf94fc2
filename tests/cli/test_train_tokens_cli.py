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
