"""The reply-only loss, the one definition every stage uses: cross-entropy of each next token at the
positions whose label is not -100 (the reply), with the output head applied only at those positions
(on a large vocabulary the head dominates the compute) and the model's final logit soft-cap.

    losses, rows = token_losses(model, ids, labels)          # per token: the building block
    per_example_loss(model, ids, attn, labels)               # [batch] means (attribution's gradients)
    reply_nll(model, ids, mask)                              # (sum, count) for one example (eval, steering)
    reply_loss(model, batch)                                 # training: the trainer's mean over the batch
"""

from __future__ import annotations

import os

from convsim.modeling.layers import backbone, causal_lm, logit_softcap, unwrap


def _reply_hidden(model, input_ids, labels, attention_mask=None, position_ids=None):
    """(hidden states at the positions that predict a labelled token [n, H], their targets [n], the
    [B, T-1] mask of those positions)."""
    out = backbone(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    target = labels[:, 1:]
    mask = target != -100
    return out.last_hidden_state[:, :-1][mask], target[mask], mask


def _head_losses(model, hidden, target):
    import torch
    import torch.nn.functional as F

    base = causal_lm(model)
    logits = base.get_output_embeddings()(hidden).float()
    cap = logit_softcap(base)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, target, reduction="none")


def token_losses(model, input_ids, labels, attention_mask=None, position_ids=None):
    """(per-token losses [n] in float32, the batch row of each [n]) over the labelled positions."""
    import torch

    hidden, target, mask = _reply_hidden(model, input_ids, labels, attention_mask, position_ids)
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    return _head_losses(model, hidden, target), rows


def per_example_loss(model, input_ids, attention_mask, labels):
    """[batch] mean loss over each row's reply tokens (0 for a row without any)."""
    import torch

    losses, rows = token_losses(model, input_ids, labels, attention_mask)
    n = input_ids.shape[0]
    total = torch.zeros(n, device=losses.device).index_add_(0, rows, losses)
    return total / (labels[:, 1:] != -100).sum(1).clamp_min(1)


def reply_nll(model, ids: list[int], mask: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of the tokens of one example where `mask` is set (the first token,
    which nothing predicts, never counts), and their count."""
    import torch

    labels = [i if m and k > 0 else -100 for k, (i, m) in enumerate(zip(ids, mask))]
    if all(x == -100 for x in labels):
        return 0.0, 0
    dev = next(model.parameters()).device
    with torch.inference_mode():
        losses, _ = token_losses(model, torch.tensor([ids], device=dev), torch.tensor([labels], device=dev))
    return float(losses.sum()), int(losses.numel())


def _reply_loss_sum(base, input_ids, attention_mask, labels, position_ids=None):
    """Summed cross-entropy over label positions, the head applied only there. With padding-free batches
    (`position_ids` restarting at each packed example, no attention mask) each example attends only to
    itself, and an example's first position never carries a label (the collator masks it), so no loss
    crosses an example boundary."""
    import torch

    h, t, mask = _reply_hidden(base, input_ids, labels, attention_mask, position_ids)
    fused = _liger_loss(logit_softcap(base)) if h.is_cuda else None
    if fused is not None:  # fused head + cross-entropy in chunks: the logits never exist in memory
        from convsim.modeling.fastpeft import head_weight

        w, bias = head_weight(base.get_output_embeddings())
        dt = torch.bfloat16 if torch.is_autocast_enabled("cuda") else h.dtype
        return fused(w.to(dt), h.to(dt), t, None if bias is None else bias.to(dt)), mask.sum()
    return _head_losses(base, h, t).sum(), mask.sum()


_LIGER: dict = {}


def _liger_loss(cap):
    """Liger's fused linear cross-entropy (sum over tokens) when asked for with CONVSIM_LIGER=1 and
    liger-kernel is installed; else None (the plain head + cross-entropy over the reply positions only).
    Off by default because it was slower here: with the speaker rows trainable it differentiates the whole
    head weight every step, which cost more than the fused kernel saved (docs/PERFORMANCE.md). Worth trying for models whose head is frozen."""
    if os.environ.get("CONVSIM_LIGER", "0") != "1":
        return None
    if cap not in _LIGER:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            _LIGER[cap] = LigerFusedLinearCrossEntropyLoss(reduction="sum", softcap=cap)
        except Exception:
            _LIGER[cap] = None
    return _LIGER[cap]


def install_reply_loss(model):
    """Route training forwards (those given `labels` and `reply_loss_sum=True`) of the wrapped causal LM to
    `_reply_loss_sum`. The call still enters through the outermost module (PEFT, and DDP/FSDP under
    accelerate), so distributed gradient hooks fire as usual; generation and plain calls are untouched."""
    import types

    base = causal_lm(model)
    if getattr(base, "_convsim_reply_loss", False):
        return model
    plain = base.forward

    def forward(self, input_ids=None, attention_mask=None, labels=None, reply_loss_sum=False, **kw):
        if not reply_loss_sum or labels is None:
            return plain(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw)
        total, count = _reply_loss_sum(self, input_ids, attention_mask, labels, kw.get("position_ids"))
        return reply_loss_output(total, count)

    base.forward = types.MethodType(forward, base)
    base._convsim_reply_loss = True
    return model


_OUTPUT: list = []


def reply_loss_output(loss, count):
    """The training forward's output: summed loss and the number of tokens it covers, both as declared
    fields (accelerate's mixed-precision wrapper rebuilds outputs from their fields, dropping anything else)."""
    if not _OUTPUT:
        from dataclasses import dataclass
        import torch
        from transformers.utils import ModelOutput

        @dataclass
        class ReplyLossOutput(ModelOutput):
            loss: torch.Tensor | None = None
            count: torch.Tensor | None = None

        _OUTPUT.append(ReplyLossOutput)
    return _OUTPUT[0](loss=loss, count=count)


def reply_loss(model, inputs, num_items_in_batch=None):
    """Cross-entropy with the output head applied only where labels carry loss (mean over those tokens,
    or over `num_items_in_batch` when the trainer counts them across accumulation steps/devices)."""
    import torch

    install_reply_loss(unwrap(model))
    extra = {"position_ids": inputs["position_ids"]} if "position_ids" in inputs else {}  # padding-free
    out = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs.get("attention_mask"),
        labels=inputs["labels"],
        reply_loss_sum=True,
        **extra,
    )
    total = out.loss
    denom = num_items_in_batch if num_items_in_batch is not None else out.count.clamp(min=1)
    if torch.is_tensor(denom):
        denom = denom.to(total.device)
    return total / denom
