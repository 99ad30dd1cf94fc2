"""Hidden states of a decoder model: capture them with hooks, pool them into one vector per text.

    from convsim.modeling.activations import record_activations, embed_texts
    with record_activations(model, [-1]) as acts:      # hooks on decoder_layers(model)[-1]
        model(**batch)
    acts[-1]                                             # [batch, seq, hidden], output of the last layer
    vecs = embed_texts(model, tok, ["hi", "see you"], layer=-1, pool="mean")   # float32 [2, hidden]

Pooling strategies are small functions `Pool(hidden [B,T,H], mask [B,T]) -> [B,H]` in `POOLS`; the
mask marks the tokens that count (real text tokens: never padding, never BOS).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from convsim.modeling.layers import decoder_layers

Pool = Callable[[Tensor, Tensor], Tensor]


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean over the positions where `mask` is set (float32)."""
    keep = mask.bool().unsqueeze(-1)
    # where(), not multiply: padded positions may hold NaN (fully masked attention rows) and NaN*0 = NaN.
    summed = torch.where(keep, hidden.float(), 0.0).sum(1)
    return summed / keep.sum(1).clamp_min(1).float()


def last_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """The last position where `mask` is set: right for left and right padding alike (float32)."""
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), pos, -1).max(1).values.clamp_min(0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()


POOLS: dict[str, Pool] = {"mean": mean_pool, "last": last_pool}


def layer_output(output) -> Tensor:
    # Decoder layers return a tensor in transformers 5 and a tuple (hidden, ...) in older releases.
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def record_activations(model, layers: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """Yield a dict layer → output of that decoder layer ([batch, seq, hidden], detached).

    Keys are the indices as given (negative ones count from the end: -1 is the last layer). Each forward
    pass inside the block replaces the entries. The hooks are removed on leaving, exception or not.
    """
    blocks = decoder_layers(model)
    acts: dict[int, Tensor] = {}
    handles = []
    try:
        for i in layers:
            block = blocks[i]  # IndexError for a layer the model doesn't have, before any forward pass

            def hook(_module, _inputs, output, key=i):
                acts[key] = layer_output(output).detach()

            handles.append(block.register_forward_hook(hook))
        yield acts
    finally:
        for h in handles:
            h.remove()


class _StopForward(Exception):
    """Raised by a hook to skip the layers (and the vocabulary-sized head) after the one we need."""


@contextmanager
def _stop_after(block) -> Iterator[None]:
    def hook(_module, _inputs, _output):
        raise _StopForward

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _leading_special_ids(tokenizer) -> list[int]:
    """Token ids the tokenizer puts before a text on its own (usually just BOS)."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def _pad_batch(seqs: list[list[int]], pooled: list[list[bool]], pad_id: int, side: str):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    pool_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, (s, p) in enumerate(zip(seqs, pooled)):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[r, sl] = torch.tensor(s, dtype=torch.long)
        attn[r, sl] = 1
        pool_mask[r, sl] = torch.tensor(p, dtype=torch.bool)
    return ids, attn, pool_mask


def embed_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    layer: int = -1,
    pool: str | Pool = "mean",
    batch_size: int = 32,
    prefix_ids: Sequence[int] | None = None,
    pool_prefix: bool = False,
    max_tokens: int | None = 512,
    padding_side: str | None = None,
    progress: bool = False,
) -> np.ndarray:
    """One pooled hidden-state vector per text: float32 [len(texts), hidden].

    Each text is tokenised as `[leading specials (BOS)] + prefix_ids + text tokens[:max_tokens]`.
    Pooling covers the text tokens only (and `prefix_ids` too when `pool_prefix`); never BOS or padding.
    An empty text falls back to pooling over its whole sequence. Texts are batched by length, so a
    vector does not depend on which other texts share its batch.
    """
    from tqdm.auto import tqdm

    pool_fn = POOLS[pool] if isinstance(pool, str) else pool
    side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lead = _leading_special_ids(tokenizer)
    prefix = list(prefix_ids or [])
    block = decoder_layers(model)[layer]
    device = next(model.parameters()).device

    bodies = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if len(texts) else []
    if max_tokens is not None:
        bodies = [b[:max_tokens] for b in bodies]
    seqs = [lead + prefix + b for b in bodies]
    pooled = [[False] * len(lead) + [pool_prefix] * len(prefix) + [True] * len(b) for b in bodies]
    pooled = [p if any(p) else [True] * len(p) for p in pooled]

    out: np.ndarray | None = None
    order = np.argsort([len(s) for s in seqs], kind="stable")  # similar lengths together: less padding
    bar = tqdm(
        total=len(seqs),
        desc=f"embedding (layer {layer}, {pool if isinstance(pool, str) else 'pool'})",
        unit="msg",
        disable=not progress,
    )
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                ids, attn, pmask = _pad_batch([seqs[i] for i in idx], [pooled[i] for i in idx], pad_id, side)
                # Positions count real tokens only, so left padding cannot shift them. (RoPE models would
                # not mind a constant shift; models with absolute position embeddings would.)
                positions = (attn.cumsum(-1) - 1).clamp_min(0)
                with record_activations(model, [layer]) as acts, _stop_after(block):
                    try:
                        model(
                            input_ids=ids.to(device),
                            attention_mask=attn.to(device),
                            position_ids=positions.to(device),
                            use_cache=False,
                        )
                    except _StopForward:
                        pass
                vecs = pool_fn(acts[layer], pmask.to(device)).float().cpu().numpy()
                if out is None:
                    out = np.empty((len(seqs), vecs.shape[1]), dtype=np.float32)
                out[idx] = vecs
                bar.update(len(idx))
    finally:
        bar.close()
    if out is None:
        hidden = getattr(getattr(model, "config", None), "hidden_size", 0) or 0
        return np.zeros((0, hidden), dtype=np.float32)
    return out
