"""`convsim train --lora-layers K [--cache-frozen-prefix]` end to end on tiny-gemma3: bad values end with one
`error:` line and exit 2 before anything is written; a cached run over two epochs trains, saves an adapter
whose LoRA sits on the top layer only and whose speaker rows kept their initial values, and reloads.

    pytest tests/cli/test_lora_layers.py
"""

from __future__ import annotations

import json
import re

import pytest
from safetensors.torch import load_file

from conftest import cli

BASE = ["--model", "tiny-gemma3", "--batch-size", "8", "--eval-steps", "1000", "--save-steps", "1000", "--json"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora-layers", "3"], "--lora-layers 3: tiny-gemma3 has 2 decoder layers; give 1 to 2"),
        (["--lora-layers", "0"], "--lora-layers must be at least 1, not 0"),
        (
            ["--cache-frozen-prefix"],
            "--cache-frozen-prefix needs --lora-layers K (the layers below the top K are cached)",
        ),
    ],
)
def test_bad_lora_layers_are_clear_errors(data_dir, tmp_path, flags, message):
    p = cli("train", data_dir, "--out", tmp_path / "run", *BASE, "--max-steps", "2", *flags, check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()


def test_cached_run_trains_the_top_layer_only(data_dir, tmp_path):
    out = tmp_path / "run"
    p = cli("train", data_dir, "--out", out, *BASE, "--epochs", "2", "--lora-layers", "1", "--cache-frozen-prefix")
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["steps"] > 2 and summary["train_loss"] > 0
    cached = re.search(r"cached frozen prefix: ([\d,]+) examples", p.stderr)
    assert cached and 0 < int(cached[1].replace(",", "")) <= summary["examples"]["train"]  # same tokens: one entry
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["layers_to_transform"] == [1]
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(".layers.1." in k for k in weights if "lora_" in k)
    rows = [k for k in weights if "trainable_tokens" in k]
    assert rows  # the speaker rows travel with the adapter, at their initial values (frozen with the cache)
    help_text = cli("train", "--help").stdout
    assert "--cache-frozen-prefix" in help_text and "--lora-layers" in help_text
    cli("chat", out, "--as", "Ana", "--max-new-tokens", "4", input="hi\n/quit\n")  # reloads with plain PEFT
