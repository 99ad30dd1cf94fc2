"""Hooks and pooling on tiny random models: `pytest tests/unit/test_activations.py` (a few seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convsim.modeling.activations import POOLS, embed_texts, last_pool, mean_pool, record_activations
from convsim.modeling.layers import decoder_layers
from convsim.modeling.models import load

SHORT = "hi"
LONG = "this message is a good deal longer than the other one, so it forces padding in a batch"


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma3"])
def tiny(request):
    return load(request.param, device="cpu")


def hooks(model) -> list[set]:
    return [set(block._forward_hooks) for block in decoder_layers(model)]


# ---------------------------------------------------------------- pooling functions


def test_mean_pool_ignores_masked_positions_even_nan():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    hidden[0, 0] = float("nan")  # padding may hold NaN: it must not leak
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    out = mean_pool(hidden, mask)
    torch.testing.assert_close(out[0], hidden[0, 1:].mean(0))
    torch.testing.assert_close(out[1], hidden[1, :2].mean(0))


def test_last_pool_left_and_right_padding():
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1],  # left padded: last real token is position 4
            [1, 1, 1, 0, 0],  # right padded: position 2
            [0, 1, 1, 0, 0],
        ]
    )  # BOS excluded and right padded: position 2
    out = last_pool(hidden, mask)
    torch.testing.assert_close(out, torch.stack([hidden[0, 4], hidden[1, 2], hidden[2, 2]]))
    assert set(POOLS) == {"mean", "last"}


# ---------------------------------------------------------------- record_activations


def test_record_activations_matches_hidden_states(tiny):
    model, tok = tiny
    batch = tok([LONG], return_tensors="pt")
    with torch.inference_mode():
        model(**batch, output_hidden_states=True)  # transformers adds hooks of its own the first time
        before = hooks(model)
        with record_activations(model, [0, -1]) as acts:
            out = model(**batch, output_hidden_states=True)
        with record_activations(model, [len(decoder_layers(model)) - 1]) as last:
            model(**batch)
    assert acts[0].shape == (1, batch["input_ids"].shape[1], model.config.hidden_size)
    torch.testing.assert_close(acts[0], out.hidden_states[1])  # hidden_states[0] is the embedding
    torch.testing.assert_close(acts[-1], next(iter(last.values())))  # -1 is the last decoder layer
    assert hooks(model) == before


def test_hooks_removed_after_exception(tiny):
    model, tok = tiny
    before = hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with record_activations(model, [0, 1]):
            assert [len(h) for h in hooks(model)] == [len(h) + 1 for h in before]
            model(**tok(["x"], return_tensors="pt"))
            raise RuntimeError("boom")
    assert hooks(model) == before
    with pytest.raises(IndexError):
        with record_activations(model, [0, 99]):
            pass
    assert hooks(model) == before


def test_record_activations_on_peft_model():
    from peft import LoraConfig, get_peft_model

    model, tok = load("tiny-llama", device="cpu")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = hooks(peft_model)
    with record_activations(peft_model, [-1]) as acts:
        peft_model(**tok(["hello there"], return_tensors="pt"))
    assert acts[-1].shape[-1] == model.config.hidden_size
    assert hooks(peft_model) == before
    vecs = embed_texts(peft_model, tok, [SHORT, LONG])
    assert vecs.shape == (2, model.config.hidden_size) and np.isfinite(vecs).all()
    assert hooks(peft_model) == before


# ---------------------------------------------------------------- embed_texts


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pool", ["mean", "last"])
def test_pooling_ignores_padding(tiny, side, pool):
    model, tok = tiny
    alone = embed_texts(model, tok, [SHORT], pool=pool, padding_side=side)
    batched = embed_texts(model, tok, [LONG, SHORT, ""], pool=pool, padding_side=side, batch_size=8)
    assert batched.shape == (3, model.config.hidden_size) and batched.dtype == np.float32
    np.testing.assert_allclose(batched[1], alone[0], atol=1e-4, rtol=1e-4)
    assert np.isfinite(batched).all()  # the empty text falls back to its BOS


def test_batching_and_order_do_not_change_vectors(tiny):
    model, tok = tiny
    before = hooks(model)
    texts = [LONG, SHORT, "a third one", "ok", LONG + " again"]
    one_batch = embed_texts(model, tok, texts, batch_size=64)
    small_batches = embed_texts(model, tok, texts, batch_size=2, progress=True)
    np.testing.assert_allclose(one_batch, small_batches, atol=1e-4, rtol=1e-4)
    assert hooks(model) == before


def test_prefix_ids_pooled_or_not(tiny):
    model, tok = tiny
    speaker = tok("Ana", add_special_tokens=False)["input_ids"]
    plain = embed_texts(model, tok, [SHORT])
    excluded = embed_texts(model, tok, [SHORT], prefix_ids=speaker)
    included = embed_texts(model, tok, [SHORT], prefix_ids=speaker, pool_prefix=True)
    # The prefix changes the context either way; pooling over it changes the vector again.
    assert not np.allclose(plain, excluded) and not np.allclose(excluded, included)
    # Excluded from pooling = the mean over exactly the text positions of the full sequence.
    ids = [tok.bos_token_id] + speaker + tok(SHORT, add_special_tokens=False)["input_ids"]
    with torch.inference_mode(), record_activations(model, [-1]) as acts:
        model(input_ids=torch.tensor([ids]))
    expect = acts[-1][0, 1 + len(speaker) :].mean(0).numpy()
    np.testing.assert_allclose(excluded[0], expect, atol=1e-5, rtol=1e-4)


def test_empty_input(tiny):
    model, tok = tiny
    assert embed_texts(model, tok, []).shape == (0, model.config.hidden_size)
