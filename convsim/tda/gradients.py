"""Per-example gradients of the LoRA parameters, randomly projected: the `gradients` attribution method.

    from convsim.tda.gradients import GradientSketch, lora_gradients
    sketch = GradientSketch.for_model(model, dim=2048, seed=0)
    vecs = lora_gradients(model, tok, fmt, examples, sketch)     # float32 [len(examples), 2048]

An example is `(context, speaker, texts)`: the loss is that of `texts` (one message, or a burst) spoken
by `speaker` after `context`, rendered with the run's `PromptFormat`, on the reply tokens only (as in
training). Its gradient with respect to every LoRA matrix is a TRAK/LoGra-style fingerprint of what the
example asks of the adapter; two examples whose gradients point the same way pull the adapter the same
way. The trainable speaker-token rows are left out: they say who speaks, not what is said.

Why it is fast: one batched forward and backward gives every example's gradient exactly. For a LoRA
layer y = B(A x), the gradient of one example's loss is a sum over its own tokens, dA = Σ_t g_a,t x_tᵀ and
dB = Σ_t g_y,t a_tᵀ, so hooks keep each module's input and output gradient per row of the batch and an
einsum does the rest (padding rows carry zero output gradient). `tests/cli/test_tda_cli.py` checks this
against autograd on single examples.

The projection is a seeded count sketch (a sparse Johnson-Lindenstrauss map): coordinate i of the
concatenated gradient is added, with a random sign, to one of `dim` buckets. Inner products are
preserved in expectation; it costs one `index_add_` per module and no dense matrix, whatever the number
of LoRA parameters.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from convsim.data.examples import PromptFormat, render
from convsim.data.schema import Message
from convsim.modeling.loss import per_example_loss

GradExample = tuple[Sequence[Message], str, Sequence[str]]  # (context, speaker, reply texts)


def lora_pairs(model) -> list[tuple[str, torch.nn.Linear, torch.nn.Linear]]:
    """(name, lora_A, lora_B) of every active LoRA linear layer, in a fixed order."""
    from peft.tuners.lora import LoraLayer

    pairs = []
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        for adapter in mod.active_adapters:
            a, b = (
                mod.lora_A[adapter] if adapter in mod.lora_A else None,
                mod.lora_B[adapter] if adapter in mod.lora_B else None,
            )
            if isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear):
                pairs.append((f"{name}.{adapter}", a, b))
    if not pairs:
        raise ValueError("the model has no LoRA layers: the gradients method needs a trained adapter")
    return sorted(pairs, key=lambda p: p[0])


@dataclass
class GradientSketch:
    """The seeded count-sketch projection, one (bucket, sign) per LoRA parameter."""

    dim: int
    seed: int
    names: list[str]
    buckets: list[torch.Tensor]  # per module: A's then B's flattened parameters → bucket
    signs: list[torch.Tensor]
    n_params: int

    @classmethod
    def for_model(cls, model, dim: int = 2048, seed: int = 0) -> "GradientSketch":
        pairs = lora_pairs(model)
        device = pairs[0][1].weight.device
        names, buckets, signs, total = [], [], [], 0
        for name, a, b in pairs:
            n = a.weight.numel() + b.weight.numel()
            # Each module gets its own stream, keyed by its name, so the map does not depend on which
            # other modules exist (e.g. with or without MLP targets).
            g = torch.Generator().manual_seed(seed * 1_000_003 + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
            buckets.append(torch.randint(0, dim, (n,), generator=g).to(device))
            signs.append((torch.randint(0, 2, (n,), generator=g).float() * 2 - 1).to(device))
            names.append(name)
            total += n
        return cls(dim, seed, names, buckets, signs, total)

    def describe(self) -> str:
        return f"count sketch of {self.n_params:,} LoRA parameters ({len(self.names)} layers) to {self.dim}"


class _Taps:
    """Forward hooks on lora_A/lora_B keeping inputs and (via tensor hooks) output gradients."""

    def __init__(self, pairs):
        self.pairs = pairs
        self.x: dict[int, torch.Tensor] = {}
        self.a: dict[int, torch.Tensor] = {}
        self.ga: dict[int, torch.Tensor] = {}
        self.gy: dict[int, torch.Tensor] = {}
        self.handles = []

    def __enter__(self):
        for i, (_, a, b) in enumerate(self.pairs):
            self.handles.append(a.register_forward_hook(self._hook_a(i)))
            self.handles.append(b.register_forward_hook(self._hook_b(i)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook_a(self, i):
        def hook(_mod, inputs, output):
            self.x[i] = inputs[0].detach()
            self.a[i] = output.detach()
            if output.requires_grad:
                output.register_hook(lambda g: self.ga.__setitem__(i, g.detach()))

        return hook

    def _hook_b(self, i):
        def hook(_mod, _inputs, output):
            if output.requires_grad:
                output.register_hook(lambda g: self.gy.__setitem__(i, g.detach()))

        return hook


class _LoraTrainable:
    """Context manager: LoRA weights require grad inside (a loaded adapter is frozen), restored after."""

    def __init__(self, pairs):
        self.weights = [w for _, a, b in pairs for w in (a.weight, b.weight)]

    def __enter__(self):
        self.before = [w.requires_grad for w in self.weights]
        for w in self.weights:
            w.requires_grad_(True)
        return self.weights

    def __exit__(self, *exc):
        for w, r in zip(self.weights, self.before):
            w.requires_grad_(r)


def render_grad_example(tok, fmt: PromptFormat, ex: GradExample, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside the reply) for one example."""
    context, speaker, texts = ex
    reply = [Message(speaker, t) for t in texts if t.strip()]
    r = render(tok, fmt, context, speaker, reply, terminate=False, max_len=max_len)
    return r.input_ids, [i if m else -100 for i, m in zip(r.input_ids, r.loss_mask)]


def lora_gradients(
    model,
    tok,
    fmt: PromptFormat,
    examples: Sequence[GradExample],
    sketch: GradientSketch,
    batch_size: int = 8,
    max_len: int = 512,
    raw: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Projected per-example LoRA gradients, float32 `[len(examples), sketch.dim]` (not normalised).

    `raw`: return the unprojected concatenated gradients instead (for tests). An example with an empty
    reply has no loss and a zero gradient. `on_batch(n)` is called after each batch (progress)."""
    pairs = lora_pairs(model)
    device = pairs[0][1].weight.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rendered = [render_grad_example(tok, fmt, ex, max_len) for ex in examples]
    order = np.argsort([len(r[0]) for r in rendered], kind="stable")  # similar lengths: less padding
    width_out = sketch.n_params if raw else sketch.dim
    out = np.zeros((len(examples), width_out), dtype=np.float32)
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model as it is
    try:
        with _LoraTrainable(pairs) as weights, torch.enable_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(rendered[i][0]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                labels = torch.full((len(idx), width), -100, dtype=torch.long)
                attn = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):  # right padding: real tokens never see the padding
                    seq, lab = rendered[i]
                    ids[r, : len(seq)] = torch.tensor(seq)
                    labels[r, : len(lab)] = torch.tensor(lab)
                    attn[r, : len(seq)] = 1
                ids, labels, attn = ids.to(device), labels.to(device), attn.to(device)
                if not (labels != -100).any():
                    if on_batch:
                        on_batch(len(idx))
                    continue
                with _Taps(pairs) as taps:
                    loss = per_example_loss(model, ids, attn, labels)
                    torch.autograd.grad(loss.sum(), weights, allow_unused=True)
                vec = torch.zeros((len(idx), width_out), device=device, dtype=torch.float32)
                offset = 0
                for m in range(len(pairs)):
                    if m not in taps.ga or m not in taps.gy:
                        continue
                    x, a = taps.x[m].float(), taps.a[m].float()
                    d_a = torch.einsum("btr,bti->bri", taps.ga[m].float(), x).flatten(1)
                    d_b = torch.einsum("bto,btr->bor", taps.gy[m].float(), a).flatten(1)
                    flat = torch.cat([d_a, d_b], 1)
                    if raw:
                        vec[:, offset : offset + flat.shape[1]] = flat
                        offset += flat.shape[1]
                    else:
                        vec.index_add_(1, sketch.buckets[m], flat * sketch.signs[m])
                out[idx] = vec.cpu().numpy()
                if on_batch:
                    on_batch(len(idx))
    finally:
        model.train(was_training)
    return out
