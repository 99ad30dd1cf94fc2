"""The training speed-ups change speed only: compiled decoder layers give the eager losses and gradients;
activation checkpointing and compilation default to what pays off on each machine."""

import pytest
import torch

from conftest import tiny_trained_model

from convsim.config import TrainConfig
from convsim.modeling.loss import reply_loss
from convsim.training.backends import build_model
from convsim.training.model import compile_layers, decoder_layers, wants_checkpointing, wants_compile


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
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # FSDP wraps the layers itself
    assert not wants_compile(TrainConfig(), "cuda")


def _batch(ids, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, vocab - 10, (3, 12), generator=g)
    x[:, 4] = ids["Ana"]
    mask = torch.ones_like(x)
    mask[2, 9:] = 0  # a padded row
    labels = torch.full_like(x, -100)
    labels[:, 5:9] = x[:, 5:9]  # loss on a "reply" only
    return {"input_ids": x, "attention_mask": mask, "labels": labels}


def test_compiled_layers_give_the_eager_loss_and_gradients():
    model, tok, ids = tiny_trained_model()
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
    assert set(model.state_dict()) == keys_before  # adapters save as before
    for (l1, g1), (l2, g2) in zip(eager, compiled):
        assert torch.allclose(l1, l2, atol=1e-5), (l1, l2)
        assert sorted(g1) == sorted(g2) and g1
        for k in g1:
            assert torch.allclose(g1[k], g2[k], atol=1e-5, rtol=1e-4), k


def test_a_failing_compile_falls_back_to_eager(monkeypatch, capsys):
    from convsim.training import model as training_model

    model, tok, spec, ids = build_model(TrainConfig(model="tiny-gemma3", lora_r=4), ["Ana", "Ben"], "cpu")

    def broken(m):
        raise RuntimeError("inductor says no\nmore detail")

    monkeypatch.setattr(training_model, "_probe", broken)
    assert compile_layers(model) == 0
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
    assert "inductor says no" in capsys.readouterr().err
    loss = reply_loss(model, _batch(ids, len(tok)))  # trains eagerly
    assert torch.isfinite(loss)


def test_frozen_weights_dtype_defaults(monkeypatch):
    from convsim.training.model import frozen_dtype

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setattr("convsim.training.cpu.cpu_has_native_bf16", lambda: False)
    assert frozen_dtype(TrainConfig(), "cpu") == "float32"
    assert frozen_dtype(TrainConfig(frozen_dtype="bfloat16"), "cpu") == "bfloat16"
    assert frozen_dtype(TrainConfig(frozen_dtype="float32"), "cuda") == "float32"
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert frozen_dtype(TrainConfig(), "cuda") == "bfloat16"
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # one dtype per sharded unit
        assert frozen_dtype(TrainConfig(), "cuda") == "float32"


def test_bf16_frozen_weights_train_float32_parameters_to_the_same_loss():
    """Frozen weights in bf16: every trainable tensor is still float32 (AdamW updates survive), the frozen
    ones are bf16, and the loss is the float32 model's within bf16 rounding."""
    losses = {}
    for dt in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model, tok, spec, ids = build_model(
            TrainConfig(model="tiny-gemma3", lora_r=4, frozen_dtype=dt), ["Ana", "Ben"], "cpu"
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)
        assert all(p.dtype == getattr(torch, dt) for p in frozen if p.is_floating_point())
        model.train()
        loss = reply_loss(model, _batch(ids, model.config.vocab_size))
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
        losses[dt] = float(loss)
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)


def test_length_grouping_defaults_and_argument():
    from convsim.training.model import sampling_args, wants_grouping

    assert not wants_grouping(TrainConfig(), "cpu") and not wants_grouping(TrainConfig(), "cuda:0")
    assert wants_grouping(TrainConfig(group_by_length=True), "cpu")
    assert not wants_grouping(TrainConfig(group_by_length=False), "cuda")
    from trl import SFTConfig

    on = SFTConfig(output_dir="/tmp/x", use_cpu=True, bf16=False, **sampling_args(True))
    off = SFTConfig(output_dir="/tmp/x", use_cpu=True, bf16=False, **sampling_args(False))
    assert getattr(on, "train_sampling_strategy", None) == "group_by_length" or getattr(on, "group_by_length", False)
    assert getattr(off, "train_sampling_strategy", "random") == "random" and not getattr(off, "group_by_length", False)


def test_cudnn_attention_off_while_training_and_restored(monkeypatch):
    """On CUDA, training runs without cuDNN's SDPA backend (host-bound there) and puts the flag back after,
    also when training fails; on a machine without CUDA nothing is touched."""
    from convsim.training.recipe import fused_attention_kernels

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with fused_attention_kernels():
        assert torch.backends.cuda.cudnn_sdp_enabled() == before or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        with pytest.raises(RuntimeError):
            with fused_attention_kernels():
                assert not torch.backends.cuda.cudnn_sdp_enabled()
                raise RuntimeError("training failed")
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
