"""The reply-only loss: cross-entropy of the next token at the positions whose labels are not -100 (the
reply), with the output head applied only there. Training routes its forwards here (`reply_loss`);
evaluation, steering and attribution call `reply_nll` (per example) on the same function.
"""
from __future__ import annotations

import os


def _reply_loss_sum(base, input_ids, attention_mask, labels, position_ids=None):
    """Summed cross-entropy over label positions, the head applied only there. With padding-free batches
    (`position_ids` restarting at each packed example, no attention mask) each example attends only to
    itself, and an example's first position never carries a label (the collator masks it), so no loss
    crosses an example boundary."""
    import torch
    import torch.nn.functional as F
    backbone = getattr(base, base.base_model_prefix)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state[:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    h, t = hidden[mask], target[mask]
    cap = getattr(base.config, "final_logit_softcapping", None)
    fused = _liger_loss(cap) if h.is_cuda else None
    if fused is not None:       # fused head + cross-entropy in chunks: the logits never exist in memory
        from convsim.modeling.fastpeft import head_weight
        w, bias = head_weight(base.get_output_embeddings())
        dt = torch.bfloat16 if torch.is_autocast_enabled("cuda") else h.dtype
        return fused(w.to(dt), h.to(dt), t, None if bias is None else bias.to(dt)), mask.sum()
    logits = base.get_output_embeddings()(h).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, t, reduction="sum"), mask.sum()


_LIGER: dict = {}


def _liger_loss(cap):
    """Liger's fused linear cross-entropy (sum over tokens) when asked for with CONVSIM_LIGER=1 and
    liger-kernel is installed; else None (the plain head + cross-entropy over the reply positions only).
    Off by default because it was slower here: with the speaker rows trainable it differentiates the whole
    262k x 640 head weight every step; measured on an H200, compiled layers without it 47.6k tokens/s, with
    it 13.7k (bench/results/train-speed-gpu-compiled-only.json). Worth trying for models whose head is frozen."""
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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
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
    install_reply_loss(_unwrap(model))
    extra = {"position_ids": inputs["position_ids"]} if "position_ids" in inputs else {}   # padding-free
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                labels=inputs["labels"], reply_loss_sum=True, **extra)
    total = out.loss
    denom = num_items_in_batch if num_items_in_batch is not None else out.count.clamp(min=1)
    if torch.is_tensor(denom):
        denom = denom.to(total.device)
    return total / denom


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "get_base_model"):
        model = model.module          # DDP / FSDP wrappers
    return model
