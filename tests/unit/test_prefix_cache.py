"""LoRA on the top K layers (`--lora-layers`) and the cached frozen prefix (`--cache-frozen-prefix`): the
cached path gives the uncached path's reply-only loss and LoRA gradients for the same batch and weights, on a
4-layer Gemma 3 whose top layers mix global and sliding-window attention (a window shorter than the batch);
LoRA modules sit on the top K layers only; nothing below them trains with the cache.

    pytest tests/unit/test_prefix_cache.py        # seconds
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from convsim.config import TrainConfig
from convsim.errors import UserError
from convsim.modeling import models
from convsim.modeling.layers import decoder_layers
from convsim.modeling.loss import reply_loss
from convsim.modeling.prefix import freeze_below, install_prefix_cache
from convsim.training.backends import build_model

LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


@pytest.fixture
def four_layers(monkeypatch):
    """tiny-gemma3 with 4 layers, global attention at layer 2 and a 4-token sliding window elsewhere."""
    spec = models.MODEL_TABLE["tiny-gemma3"]
    conf = {**spec.tiny_config, "num_hidden_layers": 4, "sliding_window": 4, "layer_types": LAYER_TYPES}
    monkeypatch.setitem(models.MODEL_TABLE, "tiny-gemma3", dataclasses.replace(spec, tiny_config=conf))
    return "tiny-gemma3"


def built(name, **cfg):
    torch.manual_seed(0)
    model, tok, spec, ids = build_model(TrainConfig(model=name, lora_r=4, **cfg), ["Ana", "Ben"], "cpu")
    with torch.no_grad():  # LoRA's B starts at zero; move every trained tensor off its start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.train()
    return model, ids


def padded(ids, rows):
    """A right-padded batch like the collator's: (input_ids, attention_mask, labels); loss on each row's last
    half."""
    width = max(len(r) for r in rows)
    x = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    m = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    y = torch.tensor(
        [[t if len(r) // 2 <= k < len(r) else -100 for k, t in enumerate(r + [0] * (width - len(r)))] for r in rows]
    )
    return {"input_ids": x, "attention_mask": m, "labels": y}


def examples(ids):
    a, b = ids["Ana"], ids["Ben"]
    return [
        [2, a, 100, 200, 300, 400, b, 500, 600, 700, 800, 900, a],
        [2, b, 11, 12, a, 13, 14, 15],
        [2, a, 21, 22, 23, b, 24, 25, 26, 27, 28],
    ]


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = reply_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cached_prefix_gives_the_same_loss_and_gradients(four_layers):
    model, ids = built(four_layers, lora_layers=2)
    first = len(decoder_layers(model)) - 2
    assert freeze_below(model, first)  # the speaker rows were trainable; now frozen, as the cache needs
    rows = examples(ids)
    batch = padded(ids, rows)
    loss0, grads0 = loss_and_grads(model, batch)
    assert grads0 and all(".layers.2." in n or ".layers.3." in n for n in grads0)

    cache = install_prefix_cache(model, first)
    loss_and_grads(model, padded(ids, rows[1:2]))  # cached alone, at its own width: batch-independent
    calls = []
    hook = decoder_layers(model)[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        loss1, grads1 = loss_and_grads(model, batch)  # builds the other two, then runs the top from the cache
        loss2, grads2 = loss_and_grads(model, batch)  # all cached: the lower layers do not run
    finally:
        hook.remove()
    assert len(cache.states) == 3 and len(calls) == 1
    for loss, grads in ((loss1, grads1), (loss2, grads2)):
        assert torch.allclose(loss, loss0, rtol=1e-5, atol=1e-6), (loss, loss0)
        assert sorted(grads) == sorted(grads0)
        for k in grads0:
            assert torch.allclose(grads[k], grads0[k], rtol=1e-4, atol=1e-6), k


def test_cache_is_only_for_training_forwards(four_layers):
    """Evaluation runs the plain forward (and gives the training forward's loss)."""
    model, ids = built(four_layers, lora_layers=1, cache_frozen_prefix=True)
    batch = padded(ids, examples(ids))
    train_loss = reply_loss(model, batch).detach()
    model.eval()
    with torch.no_grad():
        eval_loss = reply_loss(model, batch)
    assert torch.allclose(train_loss, eval_loss, rtol=1e-5)
    assert len(model.get_base_model().model._convsim_prefix_cache.states) == 3


def test_lora_only_on_the_top_layers(four_layers):
    model, _ = built(four_layers, lora_layers=3)
    adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert adapted == {"1", "2", "3"}
    full, _ = built(four_layers)
    assert {n.split(".layers.")[1].split(".")[0] for n, _ in full.named_modules() if n.endswith("lora_A")} == {
        "0",
        "1",
        "2",
        "3",
    }


def test_with_the_cache_nothing_below_the_top_layers_trains(four_layers):
    model, _ = built(four_layers, lora_layers=2, cache_frozen_prefix=True)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".layers.2." in n or ".layers.3." in n for n in trained)
    assert not any("trainable_tokens" in n for n in trained)
    speaker = [n for n, _ in model.named_parameters() if "trainable_tokens_delta" in n]
    assert speaker  # the rows are still in the adapter (saved, loaded as usual), at their initial values


def test_untied_head_llama():
    """tiny-llama (untied head): the cached path matches there too."""
    model, ids = built("tiny-llama", lora_layers=1)
    freeze_below(model, 1)
    batch = padded(ids, examples(ids))
    loss0, grads0 = loss_and_grads(model, batch)
    install_prefix_cache(model, 1)
    loss_and_grads(model, batch)
    loss1, grads1 = loss_and_grads(model, batch)
    assert torch.allclose(loss1, loss0, rtol=1e-5)
    assert sorted(grads1) == sorted(grads0)
    for k in grads0:
        assert torch.allclose(grads1[k], grads0[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize(
    "cfg, message",
    [
        (dict(lora_layers=3), "has 2 decoder layers; give 1 to 2"),
        (dict(lora_layers=0), "at least 1"),
        (dict(cache_frozen_prefix=True), "needs --lora-layers"),
        (dict(lora_layers=1, cache_frozen_prefix=True, packing=True), "--packing"),
    ],
)
def test_bad_settings_are_clear_errors(cfg, message):
    with pytest.raises(UserError, match=message):
        build_model(TrainConfig(model="tiny-gemma3", **cfg).validate(), ["Ana", "Ben"], "cpu")
