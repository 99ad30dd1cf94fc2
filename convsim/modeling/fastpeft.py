"""A faster, exactly equivalent forward for PEFT's trainable speaker-token rows.

PEFT's `TrainableTokensLayer` rebuilds the whole embedding matrix on every forward
(`weight.index_copy(...)`: 262k x 640 floats for Gemma 3, twice when the head is tied) and so
back-propagates a dense gradient for all 262k rows to train a handful. Here the frozen matrix is used
as is and only the trained rows are swapped in: input embeddings are replaced at the positions holding
a speaker token; output logits are replaced in the speaker tokens' columns. Same numbers, a fraction of
the memory traffic. `tests/unit/test_fastpeft.py` checks logits and gradients against PEFT's own forward.

    patch_trainable_tokens(peft_model)   # in place, per instance; returns how many layers were patched

Under FSDP2 a tied head needs one more thing: `show_tied_weights(peft_model)` (see there).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _fast_forward(self, x, *args, **kwargs):
    active = [a for a in self.active_adapters if a in self.token_indices] if not self.disable_adapters else []
    if self.merged or not active:
        return self._convsim_original_forward(x, *args, **kwargs)
    base = self.base_layer
    for name in active:
        idx = torch.as_tensor(self.token_indices[name], device=base.weight.device)
        delta = self.trainable_tokens_delta[name]
        if isinstance(base, torch.nn.Embedding):
            out = base(x, *args, **kwargs)  # includes any embedding scale (Gemma)
            hit = (x[..., None] == idx).any(-1)
            if hit.any():
                pos = (x[hit][:, None] == idx).float().argmax(-1)
                rows = delta[pos].to(out.dtype)
                scale = self._get_embed_scale() if hasattr(self, "_get_embed_scale") else None
                if scale is not None:
                    rows = rows * scale.to(out.dtype)
                out = out.masked_scatter(hit[..., None], rows)
            return out
        if isinstance(base, torch.nn.Linear):
            out = F.linear(x, base.weight, base.bias)
            cols = F.linear(x, delta.to(x.dtype))
            return (
                out.index_copy(-1, idx, cols)
                if out.dim() == 2
                else out.reshape(-1, out.shape[-1])
                .index_copy(-1, idx, cols.reshape(-1, cols.shape[-1]))
                .view(out.shape)
            )
    return self._convsim_original_forward(x, *args, **kwargs)


def patch_trainable_tokens(model) -> int:
    """Swap PEFT's TrainableTokensLayer forward for the equivalent fast one on every such layer."""
    try:
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    except ImportError:
        return 0
    n = 0
    for mod in model.modules():
        if isinstance(mod, TrainableTokensLayer) and not hasattr(mod, "_convsim_original_forward"):
            if (
                len(mod.active_adapters) != 1
                or mod.tied_adapter is not None
                and not hasattr(mod, "trainable_tokens_delta")
            ):
                continue
            mod._convsim_original_forward = mod.forward
            mod.forward = types.MethodType(_fast_forward, mod)
            n += 1
    return n


def head_weight(head):
    """(weight, bias) that the output head `head` multiplies by, with the trained speaker rows in place: what
    a fused linear + cross-entropy kernel (Liger) must be given instead of calling the module. Gradients reach
    the trainable-token delta through `index_copy`."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from peft.utils.other import TrainableTokensWrapper

    if isinstance(head, TrainableTokensWrapper):
        head = head.token_adapter  # not `head.weight`: see show_tied_weights
    if not isinstance(head, TrainableTokensLayer):
        return head.weight, getattr(head, "bias", None)
    base = head.base_layer
    active = [a for a in head.active_adapters if a in head.token_indices] if not head.disable_adapters else []
    w = base.weight
    if not head.merged:
        for name in active:
            idx = torch.as_tensor(head.token_indices[name], device=w.device)
            w = w.index_copy(0, idx, head.trainable_tokens_delta[name].to(w.dtype))
    return w, getattr(base, "bias", None)


def _stored_weight(self, name, modules):
    if name == "weight":
        return self.token_adapter.base_layer.weight
    return type(self)._getattr_wrapped(self, name, modules)


def show_tied_weights(model) -> int:
    """Make a tied embedding and head visible as tied to FSDP2 (accelerate's `fsdp2_prepare_model`).

    PEFT wraps both the input embedding and the head tied to it in a `TrainableTokensWrapper` whose
    `.weight` is a new merged matrix on every access, so accelerate's test `input.weight is output.weight`
    fails; it then shards the embedding and the head as two FSDP units, and the one matrix they share is
    sharded twice (a TypeError in `DeviceMesh._concatenate`). Here, on the wrappers whose layers share a
    weight, `.weight` is the stored (base) Parameter itself, so accelerate shards embedding and head as one
    unit, with the speaker-token rows they share. Forward, gradients and the saved adapter are unchanged:
    they never read the wrapper's `.weight` (`head_weight` builds the merged matrix from the layer itself).
    Returns how many wrappers were changed (0: nothing tied)."""
    try:
        from peft.utils.other import TrainableTokensWrapper
    except ImportError:
        return 0
    by_weight: dict[int, list] = {}
    for mod in model.modules():
        if isinstance(mod, TrainableTokensWrapper):
            by_weight.setdefault(id(mod.token_adapter.base_layer.weight), []).append(mod)
    n = 0
    for group in by_weight.values():
        for mod in group if len(group) > 1 else ():
            if "_getattr_wrapped" not in mod.__dict__:
                mod._getattr_wrapped = types.MethodType(_stored_weight, mod)
                n += 1
    return n
