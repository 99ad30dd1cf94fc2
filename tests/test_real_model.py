"""Tier 3: the real embedded Gemma 3 270M (converted once into the cache; about two minutes the first time)."""
import pytest
import torch

pytestmark = pytest.mark.real


def test_tokenizer_ids_of_fixed_prompt():
    from convsim.models import load
    _, tok = load("gemma-3-270m")
    assert tok("[FRIEND] hello there").input_ids == [2, 236840, 142572, 8516, 236842, 29104, 993]


def test_cache_gives_same_logits_as_gguf():
    from convsim.models import load, load_gguf
    cached, tok = load("gemma-3-270m", device="cpu")
    gguf, _ = load_gguf(torch.float32)
    x = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = cached(input_ids=x).logits, gguf(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert tok.decode(cached.generate(input_ids=x, max_new_tokens=6, do_sample=False)[0]).startswith(
        "<bos>The capital of France is")
