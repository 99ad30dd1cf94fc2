"""Final-layer hidden states for the model figures: emotion-word similarity matrices and message vectors.

    sims = emotion_similarities(model, tok, fmt, words, speaker="Ana")   # [n, n] cosine, fine-tuned
    with model.disable_adapter():
        base = emotion_similarities(model, tok, fmt, words)              # the same for the base model
    vecs = message_vectors(model, tok, texts)                            # [len(texts), hidden], mean-pooled

A word's vector is the final layer's state at the last real token of "i feel {w}" (optionally after a
speaker's token, rendered exactly as training renders a message: `[Ana]` + " i feel {w}"). A message's
vector is the mean of the final layer's states over its text tokens (never BOS, never padding). Batches
are right-padded, so padding never changes a real token's state.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from convsim.data.examples import PromptFormat, tag_ids

TEMPLATE = "i feel {w}"


def _lead(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _final_states(model, seqs: Sequence[Sequence[int]], pad_id: int):
    """Final-layer hidden states [B, T, H] (float32, CPU) and the attention mask [B, T] for right-padded seqs."""
    import torch

    device = next(model.parameters()).device
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        attn[r, : len(s)] = 1
    with torch.inference_mode():
        # logits_to_keep=1: the vocabulary-sized head runs on one position only; we need the states.
        out = model(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            output_hidden_states=True,
            logits_to_keep=1,
            use_cache=False,
        )
    return out.hidden_states[-1].float().cpu(), attn


def emotion_texts(
    tokenizer, fmt: PromptFormat, words: Sequence[str], speaker: str | None = None, template: str = TEMPLATE
) -> list[list[int]]:
    """Token ids of the template for each word: BOS [+ speaker tag] + text."""
    seqs = []
    for w in words:
        text = template.format(w=w)
        if speaker is None:
            body = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:  # as training renders a message: the tag, then the text with a leading space
            body = tag_ids(tokenizer, fmt, speaker) + tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        seqs.append(_lead(tokenizer) + body)
    return seqs


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    v = vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
    return np.clip(v @ v.T, -1.0, 1.0)


def emotion_similarities(
    model, tokenizer, fmt: PromptFormat, words: Sequence[str], speaker: str | None = None, template: str = TEMPLATE
) -> np.ndarray:
    """Cosine similarities [n, n] between the words' last-token final-layer states."""
    import torch

    seqs = emotion_texts(tokenizer, fmt, words, speaker, template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    states, attn = _final_states(model, seqs, pad)
    last = attn.sum(1) - 1
    vecs = states[torch.arange(len(seqs)), last].numpy()
    return cosine_matrix(vecs)


def message_vectors(
    model, tokenizer, texts: Sequence[str], batch_size: int = 32, max_tokens: int = 64, progress: bool = True
) -> np.ndarray:
    """Mean-pooled final-layer states of each text [len(texts), hidden]; texts are batched by length."""
    import torch
    from tqdm.auto import tqdm

    lead = _lead(tokenizer)
    bodies = tokenizer([" " + t.strip() for t in texts], add_special_tokens=False)["input_ids"]
    seqs = [lead + (b[:max_tokens] or [tokenizer.unk_token_id or 0]) for b in bodies]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = None
    bar = tqdm(total=len(seqs), desc="message activations", unit="msg", disable=not progress)
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        states, attn = _final_states(model, [seqs[i] for i in idx], pad)
        keep = attn.bool()
        keep[:, : len(lead)] = False  # BOS is the same in every message: it would only pull vectors together
        pooled = torch.where(keep.unsqueeze(-1), states, 0.0).sum(1) / keep.sum(1, keepdim=True).clamp_min(1)
        if out is None:
            out = np.zeros((len(seqs), pooled.shape[1]), dtype=np.float32)
        out[idx] = pooled.numpy()
        bar.update(len(idx))
    bar.close()
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)
