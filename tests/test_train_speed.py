"""The training speed-ups change speed only: compiled decoder layers give the eager losses and gradients;
activation checkpointing and compilation default to what pays off on each machine."""
import pytest
import torch

from convsim.config import TrainConfig
from convsim.train import build_model, compile_layers, decoder_layers, reply_loss, wants_checkpointing, wants_compile


class _Sized(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(int(n), device="meta"))


def test_checkpointing_only_for_big_models_unless_asked():
    assert not wants_checkpointing(TrainConfig(), _Sized(2.7e8))
    assert wants_checkpointing(TrainConfig(), _Sized(2e9))
    assert wants_checkpointing(TrainConfig(activation_checkpointing=True), _Sized(10))
    assert not wants_checkpointing(TrainConfig(activation_checkpointing=False), _Sized(2e9))


def test_compile_defaults(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("CONVSIM_COMPILE", raising=False)
    assert not wants_compile(TrainConfig(), "cpu")
    assert wants_compile(TrainConfig(), "cuda:0")
    assert wants_compile(TrainConfig(compile=True), "cpu")
    assert not wants_compile(TrainConfig(compile=False), "cuda")
    monkeypatch.setenv("CONVSIM_COMPILE", "0")
    assert not wants_compile(TrainConfig(), "cuda")
    monkeypatch.delenv("CONVSIM_COMPILE")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")       # FSDP wraps the layers itself
    assert not wants_compile(TrainConfig(), "cuda")


def _batch(ids, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, vocab - 10, (3, 12), generator=g)
    x[:, 4] = ids["Ana"]
    mask = torch.ones_like(x)
    mask[2, 9:] = 0                                            # a padded row
    labels = torch.full_like(x, -100)
    labels[:, 5:9] = x[:, 5:9]                                 # loss on a "reply" only
    return {"input_ids": x, "attention_mask": mask, "labels": labels}


def test_compiled_layers_give_the_eager_loss_and_gradients():
    torch.manual_seed(0)
    model, tok, spec, ids = build_model(TrainConfig(model="tiny-gemma3", lora_r=4), ["Ana", "Ben"], "cpu")
    with torch.no_grad():                                      # a trained-looking adapter, not zeros
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.train()

    def step(batch):
        model.zero_grad()
        loss = reply_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    batches = [_batch(ids, len(tok), s) for s in range(2)]
    batches[1] = {k: v[:, :10] for k, v in batches[1].items()}  # another length: dynamic shapes, no recompile
    eager = [step(b) for b in batches]
    keys_before = set(model.state_dict())
    assert compile_layers(model) == len(decoder_layers(model)) >= 1
    compiled = [step(b) for b in batches]
    assert set(model.state_dict()) == keys_before               # adapters save as before
    for (l1, g1), (l2, g2) in zip(eager, compiled):
        assert torch.allclose(l1, l2, atol=1e-5), (l1, l2)
        assert sorted(g1) == sorted(g2) and g1
        for k in g1:
            assert torch.allclose(g1[k], g2[k], atol=1e-5, rtol=1e-4), k


def test_a_failing_compile_falls_back_to_eager(monkeypatch, capsys):
    from convsim import train
    model, tok, spec, ids = build_model(TrainConfig(model="tiny-gemma3", lora_r=4), ["Ana", "Ben"], "cpu")

    def broken(m):
        raise RuntimeError("inductor says no\nmore detail")
    monkeypatch.setattr(train, "_probe", broken)
    assert compile_layers(model) == 0
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
    assert "inductor says no" in capsys.readouterr().err
    loss = reply_loss(model, _batch(ids, len(tok)))         # trains eagerly
    assert torch.isfinite(loss)
