"""Speaker tokens: one added special token per person (`[Ana]`, `[FRIEND]`), whose embedding row starts
as the mean of reference tokens' rows (the pieces of the person's name plus the model row's reference
words) plus small noise, as the seed project did. Only those rows are trained (PEFT
`trainable_token_indices`), so adapters stay a few MB.

    ids = add_speaker_tokens(model, tok, ["Ana", "Ben"], seed=0)   # {"Ana": 262145, "Ben": 262146}
"""

from __future__ import annotations

from typing import Sequence

from convsim.data.schema import speaker_token
from convsim.modeling.layers import head_is_tied
from convsim.errors import UserError

__all__ = ["add_speaker_tokens", "reference_ids", "speaker_ids", "speaker_token"]


def reference_ids(tokenizer, name: str, words: Sequence[str] = ()) -> list[int]:
    """Token ids whose embeddings are averaged to initialise `name`'s speaker token."""
    ids: list[int] = []
    for text in [f" {name}", *(f" {w}" for w in words)]:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    specials = set(tokenizer.all_special_ids)
    return [i for i in ids if i not in specials] or [tokenizer.unk_token_id or 0]


def add_speaker_tokens(
    model,
    tokenizer,
    names: Sequence[str],
    references: dict[str, list[str]] | None = None,
    words: Sequence[str] = ("friend",),
    noise: float = 0.01,
    seed: int = 0,
) -> dict[str, int]:
    """Add `[name]` special tokens, grow the embeddings and initialise the new rows (input and, when untied,
    output). Deterministic for a given seed, so a run reloads to exactly the same starting rows."""
    import torch

    if not names:
        raise UserError("no speakers to add")
    references = references or {}
    tokens = [speaker_token(n) for n in names]
    refs = {
        n: reference_ids(tokenizer, " ".join(references.get(n, [n])), () if n in references else words) for n in names
    }
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    ids = {n: tokenizer.convert_tokens_to_ids(t) for n, t in zip(names, tokens)}
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    untied = not head_is_tied(model)
    with torch.no_grad():
        for n in names:
            r = torch.tensor(refs[n], device=emb.device)
            eps = (torch.randn(emb.shape[1], generator=gen) * noise).to(emb.device)
            emb[ids[n]] = (emb[r].float().mean(0) + eps).to(emb.dtype)
            if untied:
                out.weight[ids[n]] = (out.weight[r].float().mean(0) + eps).to(out.weight.dtype)
    return ids


def speaker_ids(tokenizer, names: Sequence[str]) -> dict[str, int]:
    """Ids of existing speaker tokens; UserError for a name the tokenizer does not know."""
    out = {}
    for n in names:
        t = speaker_token(n)
        i = tokenizer.convert_tokens_to_ids(t)
        if i is None or i == tokenizer.unk_token_id or t not in tokenizer.get_vocab():
            raise UserError(f"unknown speaker {n!r}")
        out[n] = i
    return out
