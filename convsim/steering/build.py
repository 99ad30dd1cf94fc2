"""Building steering vectors from a model's hidden states: phrases with weights, contrastive pairs, or a
run's own messages (by sentiment, or one speaker against the others), pooled over each text's own tokens
(`modeling.activations`' pooling; BOS, a speaker-token prefix and padding never count).

    v = from_phrases(model, tok, {"i feel happy": 0.25, "i feel sad": -0.25}, layers=-5)
"""

from __future__ import annotations

from typing import Sequence

import torch

from convsim.errors import UserError
from convsim.modeling.activations import POOLS, Pool, layer_output
from convsim.modeling.layers import backbone, decoder_layers
from convsim.steering.vectors import SteeringVector, model_shape, new_vector, residual_norms, resolve_layers


def encode_phrase(tok, text: str, prefix: Sequence[int] = ()) -> tuple[list[int], int]:
    """(ids, start): BOS + prefix + the phrase; `start` is where the phrase's own tokens begin."""
    head = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + list(prefix)
    body = tok((" " + text.strip()) if prefix else text.strip(), add_special_tokens=False)["input_ids"]
    return head + body, len(head)


@torch.no_grad()
def pooled_states(
    model,
    tok,
    texts: Sequence[str],
    layers: Sequence[int],
    pool: str | Pool = "mean",
    prefix: Sequence[int] | Sequence[Sequence[int]] = (),
    batch_size: int = 16,
) -> dict[int, torch.Tensor]:
    """For each absolute layer, [len(texts), hidden] activations at that layer's output, pooled over each
    text's own tokens. `prefix` is one token list for all texts or one per text."""
    if not texts:
        raise UserError("no texts to build a steering vector from")
    pool_fn = POOLS[pool] if isinstance(pool, str) else pool
    per_text = bool(prefix) and isinstance(prefix[0], (list, tuple))
    mods = decoder_layers(model)
    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    for i in range(0, len(texts), batch_size):
        enc = [
            encode_phrase(tok, t, prefix[i + j] if per_text else prefix)
            for j, t in enumerate(texts[i : i + batch_size])
        ]
        T = max(len(ids) for ids, _ in enc)
        ids = torch.full((len(enc), T), pad, dtype=torch.long)
        attn = torch.zeros((len(enc), T), dtype=torch.long)
        pool_mask = torch.zeros((len(enc), T), dtype=torch.bool)
        for j, (row, start) in enumerate(enc):
            ids[j, : len(row)] = torch.tensor(row)
            attn[j, : len(row)] = 1
            pool_mask[j, start : len(row)] = True
            if start >= len(row):  # an empty phrase: pool its last context token instead
                pool_mask[j, len(row) - 1] = True
        got: dict[int, torch.Tensor] = {}
        handles = [
            mods[l].register_forward_hook(lambda m, a, o, l=l: got.__setitem__(l, layer_output(o).detach()))
            for l in layers
        ]
        try:
            backbone(model)(input_ids=ids.to(dev), attention_mask=attn.to(dev), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        for l in layers:
            out[l].append(pool_fn(got[l].float(), pool_mask.to(dev)).cpu())
    return {l: torch.cat(v) for l, v in out.items()}


def speaker_prefix(tok, fmt, speaker: str | None) -> list[int]:
    """The speaker's tag ids (the optional phrase prefix), or nothing."""
    if not speaker:
        return []
    from convsim.data.examples import tag_ids

    if speaker not in fmt.speakers:
        raise UserError(f"unknown speaker {speaker!r}; this run knows {', '.join(fmt.speakers)}")
    return tag_ids(tok, fmt, speaker)


# ----------------------------------------------------------------------------- building


def from_phrases(
    model,
    tok,
    weights: dict[str, float],
    layers: int | Sequence[int] = -5,
    pos_alpha: float = 1.0,
    neg_alpha: float = 1.0,
    pool: str = "mean",
    prefix: Sequence[int] = (),
    **meta,
) -> SteeringVector:
    """The seed's recipe: each phrase's pooled activation times |weight|; positive and negative phrases
    averaged separately; vector = pos_alpha * mean(pos) - neg_alpha * mean(neg). No normalisation."""
    pos = [(p, w) for p, w in weights.items() if w > 0]
    neg = [(p, w) for p, w in weights.items() if w < 0]
    if not pos and not neg:
        raise UserError("the phrases need non-zero weights (positive pulls toward, negative away)")
    absl = resolve_layers(layers, model_shape(model)[1])
    texts = [p for p, _ in pos + neg]
    acts = pooled_states(model, tok, texts, absl, pool, prefix)
    scale = torch.tensor([abs(float(w)) for _, w in pos + neg])[:, None]
    dirs = {}
    for l, a in acts.items():
        a = a * scale
        v = torch.zeros(a.shape[1])
        if pos:
            v = v + pos_alpha * a[: len(pos)].mean(0)
        if neg:
            v = v - neg_alpha * a[len(pos) :].mean(0)
        dirs[l] = v
    info = {
        "phrases": {p: float(w) for p, w in weights.items()},
        "pos_alpha": pos_alpha,
        "neg_alpha": neg_alpha,
        "pool": pool if isinstance(pool, str) else "custom",
        "prefix_ids": list(prefix),
        "residual_norm": residual_norms(acts),
    }
    return new_vector(model, dirs, "phrases", info, **meta)


def from_pairs(
    model,
    tok,
    pairs: Sequence[tuple[str, str]],
    layers: int | Sequence[int] = -5,
    method: str = "mean",
    pool: str = "mean",
    prefix: Sequence[int] = (),
    **meta,
) -> SteeringVector:
    """Contrastive pairs (toward, away): the mean of the differences, or ("pca") the first principal
    component of the differences (uncentred, so the shared shift counts), sign-aligned with their mean
    and scaled to the differences' mean projection on it."""
    if not pairs:
        raise UserError("no contrastive pairs given")
    if method not in ("mean", "pca"):
        raise UserError(f"unknown pairs method {method!r}: use mean or pca")
    absl = resolve_layers(layers, model_shape(model)[1])
    pos = pooled_states(model, tok, [p for p, _ in pairs], absl, pool, prefix)
    neg = pooled_states(model, tok, [n for _, n in pairs], absl, pool, prefix)
    dirs = {l: aggregate(pos[l] - neg[l], method) for l in absl}
    return new_vector(
        model,
        dirs,
        f"pairs-{method}",
        {"pairs": len(pairs), "pool": pool, "prefix_ids": list(prefix), "residual_norm": residual_norms(pos, neg)},
        **meta,
    )


def aggregate(diffs: torch.Tensor, method: str = "mean") -> torch.Tensor:
    """[N, H] differences -> one [H] direction."""
    mean = diffs.mean(0)
    if method == "mean" or diffs.shape[0] < 2:
        return mean
    _, _, vh = torch.linalg.svd(diffs.double(), full_matrices=False)
    pc = vh[0].float()
    if torch.dot(pc, mean) < 0:
        pc = -pc
    return pc * (diffs @ pc).mean()


def from_texts(
    model,
    tok,
    positive: Sequence[str],
    negative: Sequence[str],
    layers: int | Sequence[int] = -5,
    pool: str = "mean",
    prefix_pos=(),
    prefix_neg=(),
    method: str = "texts",
    info: dict | None = None,
    **meta,
) -> SteeringVector:
    """Two unpaired sets of texts: mean(positive) - mean(negative) activations."""
    if not positive or not negative:
        raise UserError(f"need texts on both sides (got {len(positive)} positive, {len(negative)} negative)")
    absl = resolve_layers(layers, model_shape(model)[1])
    p = pooled_states(model, tok, list(positive), absl, pool, prefix_pos)
    n = pooled_states(model, tok, list(negative), absl, pool, prefix_neg)
    dirs = {l: p[l].mean(0) - n[l].mean(0) for l in absl}
    return new_vector(
        model,
        dirs,
        method,
        {
            "positive": len(positive),
            "negative": len(negative),
            "pool": pool,
            "residual_norm": residual_norms(p, n),
            **(info or {}),
        },
        **meta,
    )


def vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment_texts(messages: Sequence, k: int = 64, margin: float = 0.05) -> tuple[list, list]:
    """The `k` most positive and `k` most negative messages by VADER compound score (ties by order);
    only messages clearly on their side (|compound| > margin) count."""
    an = vader()
    scored = [(an.polarity_scores(m.text)["compound"], i, m) for i, m in enumerate(messages)]
    pos = sorted((s for s in scored if s[0] > margin), key=lambda s: (-s[0], s[1]))[:k]
    neg = sorted((s for s in scored if s[0] < -margin), key=lambda s: (s[0], s[1]))[:k]
    return [m for _, _, m in pos], [m for _, _, m in neg]


def from_sentiment(model, tok, fmt, messages: Sequence, k: int = 64, layers=-5, pool="mean", **meta) -> SteeringVector:
    """A person's own happy-minus-sad direction: their most positive vs most negative messages by VADER,
    each read after its author's speaker tag."""
    pos, neg = sentiment_texts(messages, k)
    if len(pos) < 2 or len(neg) < 2:
        raise UserError(
            f"too few clearly positive ({len(pos)}) or negative ({len(neg)}) messages to build a "
            "sentiment vector; use --phrases or --pairs"
        )
    return from_texts(
        model,
        tok,
        [m.text for m in pos],
        [m.text for m in neg],
        layers,
        pool,
        [speaker_prefix(tok, fmt, m.speaker) for m in pos],
        [speaker_prefix(tok, fmt, m.speaker) for m in neg],
        "sentiment",
        {"k": k, "speakers": sorted({m.speaker for m in pos + neg})},
        **meta,
    )


def from_speakers(
    model, tok, fmt, messages: Sequence, speaker: str, other: str, k: int = 256, layers=-5, pool="mean", **meta
) -> SteeringVector:
    """Toward `speaker`'s way of writing, away from `other`'s: mean activation of up to `k` messages
    each (the text alone, no tag, so the direction is about what they write)."""
    a = [m.text for m in messages if m.speaker == speaker][:k]
    b = [m.text for m in messages if m.speaker == other][:k]
    return from_texts(
        model, tok, a, b, layers, pool, (), (), "speakers", {"toward": speaker, "away": other, "k": k}, **meta
    )


# ----------------------------------------------------------------------------- the seed's API


def generate_steering_vector(
    model,
    tokenizer,
    steer_dict: dict[str, float],
    pos_alpha: float = 1.0,
    neg_alpha: float = 1.0,
    layer_from_last: int = -5,
    prefix: Sequence[int] = (),
    pool: str = "mean",
) -> SteeringVector:
    """The seed's function name: `from_phrases` at one layer counted from the last."""
    return from_phrases(model, tokenizer, steer_dict, layer_from_last, pos_alpha, neg_alpha, pool, prefix)
