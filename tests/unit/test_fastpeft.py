"""The fast trainable-token forward gives PEFT's own logits and gradients (tied and untied heads)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from convsim.modeling.fastpeft import patch_trainable_tokens
from convsim.modeling.models import load
from convsim.modeling.speakers import add_speaker_tokens


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-llama"])
def test_fast_forward_matches_peft(name):
    model, tok = load(name, device="cpu")
    ids = add_speaker_tokens(model, tok, ["Ana", "Ben"])
    tt = {"embed_tokens": sorted(ids.values())}
    if not model.config.tie_word_embeddings:
        tt["lm_head"] = sorted(ids.values())
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=tt))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(torch.randn_like(p))
    x = torch.tensor([[2, ids["Ana"], 55, 66, ids["Ben"], 77]])
    pm.train()

    def run():
        pm.zero_grad()
        logits = pm(input_ids=x).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}

    l1, g1 = run()
    assert patch_trainable_tokens(pm) >= 1
    l2, g2 = run()
    assert torch.allclose(l1, l2, atol=1e-4)
    assert sorted(g1) == sorted(g2)
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-5), k


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-llama"])
def test_head_weight_is_what_the_head_multiplies_by(name):
    """The weight handed to a fused head + cross-entropy kernel (Liger on CUDA) gives the head's own logits,
    speaker columns included, and passes gradients to the speaker rows."""
    from convsim.modeling.fastpeft import head_weight

    model, tok = load(name, device="cpu")
    ids = add_speaker_tokens(model, tok, ["Ana", "Ben"])
    tt = {"embed_tokens": sorted(ids.values())}
    if not model.config.tie_word_embeddings:
        tt["lm_head"] = sorted(ids.values())
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=tt))
    patch_trainable_tokens(pm)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(torch.randn_like(p))
    head = pm.get_base_model().get_output_embeddings()
    h = torch.randn(5, model.config.hidden_size)
    w, b = head_weight(head)
    assert torch.allclose(torch.nn.functional.linear(h, w, b), head(h), atol=1e-5)
    torch.nn.functional.linear(h, w, b)[:, sorted(ids.values())].sum().backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in pm.named_parameters() if "trainable_tokens_delta" in n
    )
