"""Tier 3: the real embedded Gemma 3 270M (converted once into the cache; about two minutes the first time)."""

import pytest
import torch

pytestmark = pytest.mark.real


def test_tokenizer_ids_of_fixed_prompt():
    from convsim.modeling.models import load

    _, tok = load("gemma-3-270m")
    assert tok("[FRIEND] hello there").input_ids == [2, 236840, 142572, 8516, 236842, 29104, 993]


def test_cache_gives_same_logits_as_gguf():
    from convsim.modeling.models import load, load_gguf

    cached, tok = load("gemma-3-270m", device="cpu")
    gguf, _ = load_gguf(torch.float32)
    x = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = cached(input_ids=x).logits, gguf(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert tok.decode(cached.generate(input_ids=x, max_new_tokens=6, do_sample=False)[0]).startswith(
        "<bos>The capital of France is"
    )


def test_checkpoints_hold_the_adapter_not_the_embedding(tmp_path, data_dir):
    """A trainer checkpoint of the embedded model holds the adapter (15 MB), not PEFT's copy of the whole
    resized embedding (1.36 GB before the fix), and a run resumes from it."""
    import json
    from safetensors import safe_open
    from conftest import cli

    run = tmp_path / "run"
    args = [
        "train",
        data_dir,
        "--out",
        run,
        "--batch-size",
        "2",
        "--save-steps",
        "1",
        "--eval-steps",
        "1000",
        "--max-val-examples",
        "2",
        "--json",
    ]
    cli(*args, "--max-steps", "1")
    ckpt = run / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors"
    assert ckpt.stat().st_size < 50e6, ckpt.stat().st_size
    with safe_open(str(ckpt), "pt") as f:
        assert not [k for k in f.keys() if "embed_tokens" in k and "trainable_tokens" not in k]
    cli(*args, "--max-steps", "2", "--continue-training")
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "done" and meta["resumed_from"] == "checkpoint-1" and meta["global_step"] == 2


def test_fast_generation_path_gives_plain_greedy_tokens(monkeypatch):
    """convsim.inference.fastgen's static cache (bucketed, kept on the model, reset between calls) on the real
    model: the same greedy tokens as plain `generate`, for two prompts in a row. On a GPU this is the compiled
    decode path; on the CPU (`CONVSIM_FAST_GENERATE=any`) the same cache without compiling."""
    from convsim.inference import fastgen
    from convsim.modeling.models import load

    model, tok = load("gemma-3-270m")
    device = next(model.parameters()).device
    if device.type != "cuda":
        monkeypatch.setenv("CONVSIM_FAST_GENERATE", "any")
    assert fastgen.enabled(model)
    for text in ("[Ana] are you coming tonight?\n[Ben]", "The capital of France is"):
        x = tok(text, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            with fastgen.disabled():
                want = model.generate(input_ids=x, max_new_tokens=32, do_sample=False)
            got = fastgen.generate(model, x, max_new_tokens=32, do_sample=False)
        assert torch.equal(got, want), tok.decode(got[0]) + " | " + tok.decode(want[0])
    assert not fastgen._broken
