"""The model side of a training run, shared by the backends: which projections LoRA adapts, the speaker rows
that train, dtypes, and the speed settings (activation checkpointing, compiled decoder layers, length
grouping, padding-free batches) with the defaults that pay off on each machine.
"""

from __future__ import annotations

import os
import sys

from convsim.config import TrainConfig
from convsim.errors import UserError
from convsim.modeling.layers import decoder_layers
from convsim.modeling.loss import reply_loss


def lora_targets(cfg: TrainConfig, spec) -> list[str]:
    """The projections LoRA adapts: the model row's attention ones, and its MLP ones with --include-mlp."""
    return list(spec.attn_targets) + (list(spec.mlp_targets) if cfg.include_mlp else [])


def lora_layer_indices(cfg: TrainConfig, model) -> list[int] | None:
    """PEFT's `layers_to_transform` for --lora-layers K: the indices of the top K decoder layers (None: all
    layers). A clear error when K is more than the model has."""
    if cfg.lora_layers is None:
        return None
    n = len(decoder_layers(model))
    if not 1 <= cfg.lora_layers <= n:
        raise UserError(f"--lora-layers {cfg.lora_layers}: {cfg.model} has {n} decoder layers; give 1 to {n}")
    return list(range(n - cfg.lora_layers, n))


def speaker_rows(ids: dict, tied: bool) -> dict | None:
    """PEFT's `trainable_token_indices` for the speaker tokens: their input-embedding rows, and their
    output-head rows too when the head is not tied to the embedding. None without speaker tokens."""
    if not ids:
        return None
    rows = sorted(ids.values())
    return {"embed_tokens": rows} if tied else {"embed_tokens": rows, "lm_head": list(rows)}


def sharded_training() -> bool:
    """Launched by `accelerate launch` with an FSDP config (accelerate says so in the environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def gathered_trained_state(model):
    """Under FSDP2 the trained weights are sharded across the processes and `save_pretrained` on rank 0
    alone fails (it reads storage the shards do not have). This gathers the trainable weights whole onto
    rank 0's CPU (the frozen base stays sharded): a collective, so every process calls it, before rank 0
    saves with `save_pretrained(..., state_dict=this)` (the adapter's format is unchanged). Returns None
    when the model is not sharded (save as usual), and an empty dict on the other ranks."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    )


def frozen_dtype(cfg: TrainConfig, device: str) -> str:
    """The frozen base weights' dtype: as asked, else bfloat16 on a CUDA card that has it, on a CPU only
    where it computes in bf16 natively (`convsim.training.cpu`), and float32 elsewhere. bf16 autocast casts every matmul's weight to bf16 anyway, so holding the frozen weights in
    bf16 gives the matmuls the same inputs without re-casting 270M weights each step (and halves their
    memory); norms, embeddings and the residual stream then run in bf16 as in bf16 inference. Under FSDP
    float32, so each sharded unit holds one dtype."""
    if cfg.frozen_dtype:
        return cfg.frozen_dtype
    import torch

    if (
        device.startswith("cuda")
        and not sharded_training()
        and torch.cuda.is_available()
        and torch.cuda.is_bf16_supported()
    ):
        return "bfloat16"
    if device == "cpu" and not sharded_training():
        from convsim.training.cpu import cpu_dtype, cpu_has_native_bf16

        return cpu_dtype(None, cpu_has_native_bf16())
    return "float32"


def bf16_autocast(cfg: TrainConfig, device: str) -> bool:
    """Whether training runs under bf16 autocast: always on CUDA; on a CPU when its frozen weights are bf16
    (native bf16, or forced with --frozen-dtype bfloat16), and never in float32, where autocast would only
    add conversions around every matmul."""
    if device.startswith("cuda"):
        return True
    return device == "cpu" and frozen_dtype(cfg, device) == "bfloat16"


def cpu_precision(cfg: TrainConfig, device: str = "cpu") -> str:
    """The line saying which precision a CPU run trains in, and why."""
    from convsim.training.cpu import cpu_has_native_bf16, cpu_precision_line

    return cpu_precision_line(frozen_dtype(cfg, device), cpu_has_native_bf16(), forced=bool(cfg.frozen_dtype))


def trainable_in_float32(model) -> int:
    """Every trainable parameter (LoRA matrices, speaker-token rows) in float32, whatever the frozen
    weights' dtype: AdamW's small updates vanish in bf16 rounding. Returns how many were cast."""
    import torch

    n = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


CHECKPOINTING_FROM = 1e9  # parameters: below this, activations are small and recomputing them only costs time


def wants_checkpointing(cfg: TrainConfig, model) -> bool:
    """Activation checkpointing as asked, else only for models of 1B parameters or more: on Gemma 3 270M
    with chat-sized batches it costs a third more compute to save memory nobody needs."""
    if cfg.activation_checkpointing is not None:
        return cfg.activation_checkpointing
    return sum(p.numel() for p in model.parameters()) >= CHECKPOINTING_FROM


def wants_compile(cfg: TrainConfig, device: str) -> bool:
    """torch.compile as asked, else on CUDA (where a small model is bound by kernel launches, which
    compiled, fused layers cut), not under FSDP, and never on CPU (compiling costs more there than it
    saves). CONVSIM_COMPILE=0 turns the default off."""
    if cfg.compile is not None:
        return cfg.compile and _can_compile()
    if cfg.backend == "unsloth":  # Unsloth compiles its own kernels; not ours on top unless asked
        return False
    return (
        device.startswith("cuda")
        and not sharded_training()
        and _can_compile()  # FSDP wraps layers itself
        and os.environ.get("CONVSIM_COMPILE", "1") != "0"
    )


def wants_grouping(cfg: TrainConfig, device: str) -> bool:
    """Batches of similar lengths only when asked (--group-by-length). Random batches of chat examples are
    about half padding, but on a GPU grouping measured no faster, at twice the peak memory (the longest group
    sets it), and the grouped fine-tune's validation loss was higher (docs/PERFORMANCE.md). The grouping is
    seeded (resume replays it)."""
    return bool(cfg.group_by_length)


def wants_packing(cfg: TrainConfig) -> bool:
    """Padding-free batches (TRL's `padding_free`) only when asked (--packing). A batch keeps its examples,
    so the optimisation is the same as with padded batches; they are laid side by side in one row with
    positions restarting at each example, and transformers builds a block-diagonal causal mask from those
    positions (no attention across examples: tests/unit/test_packing.py). No compute goes to padding, but the
    attention kernels then see one long row with a dense mask, which cost more than the padding saved, on
    the GPU and on the CPU (docs/PERFORMANCE.md)."""
    return bool(cfg.packing)


def sampling_args(grouped: bool) -> dict:
    """The Trainer argument for length-grouped sampling, in this transformers version's spelling."""
    from trl import SFTConfig

    fields = getattr(SFTConfig, "__dataclass_fields__", {})
    if "train_sampling_strategy" in fields:
        return {"train_sampling_strategy": "group_by_length" if grouped else "random"}
    return {"group_by_length": grouped} if "group_by_length" in fields else {}


def _can_compile() -> bool:
    import torch

    return hasattr(torch, "compile") and sys.platform != "win32"


def compile_layers(model, probe: bool = True) -> int:
    """Compile each decoder layer in place (regional compilation). The layers share their code, so one
    graph serves them all; shapes are dynamic from the start, so batches of new lengths do not recompile.
    The module tree and the state dict stay as they were (adapters save as usual). With `probe`, one
    forward and backward pass on a fixed dummy batch compiles the graph now; if compiling fails, the layers
    go back to eager with a warning (training must not die of an optimisation). Returns the count compiled."""
    try:
        layers = decoder_layers(model)
    except ValueError:
        return 0
    for layer in layers:
        layer.compile(dynamic=True)
    if not probe:
        return len(layers)
    print(
        f"compiling the {len(layers)} decoder layers (about a minute the first time; --no-compile skips it)",
        file=sys.stderr,
        flush=True,
    )
    try:
        _probe(model)
    except Exception as e:  # noqa: BLE001 - any compiler failure means: train eagerly
        for layer in layers:
            layer._compiled_call_impl = None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        print(
            f"warning: torch.compile of the decoder layers failed ({type(e).__name__}: {first}); "
            "training without it (--no-compile skips the attempt)",
            file=sys.stderr,
        )
        return 0
    return len(layers)


def _probe(model) -> None:
    """One training-mode forward + backward of a fixed 2 x 16 batch (no RNG drawn, gradients cleared)."""
    import contextlib
    import torch

    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    x = (torch.arange(32, device=device).view(2, 16) % 64) + 10
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    bf16 = device.type == "cuda" or any(p.dtype == torch.bfloat16 for p in model.parameters())
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    was = model.training
    model.train()
    try:
        with cast:
            loss = reply_loss(model, batch)
        loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)


def eager():
    """Context: run compiled modules eagerly (generation inside training, whose shapes change each step)."""
    import contextlib
    import torch

    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance else contextlib.nullcontext()
