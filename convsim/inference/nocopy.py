"""No verbatim copying: generation never completes a span of `SPAN` tokens that occurs inside one of the run's
training messages. A fine-tuned clone otherwise recites whole lines of the chats it learnt from, which is a
privacy risk (the messages of everyone in the chat) as much as a fidelity one (people rarely repeat themselves
word for word).

    index = CopyIndex.from_texts(tok, [m.text for c in run_.split("train") for m in c.messages])
    reply(model, tok, fmt, history, "Ana", cfg, guard=index)        # NoCopy joins the logits processors

The index maps the first SPAN - 1 tokens of every training span (by hash) to the tokens that followed them;
at each step, a row whose last SPAN - 1 tokens are such a prefix may not pick those tokens. Messages are
tokenized as convsim renders them (`text_ids`), so a generated message lines up with the training ones;
spans never cross messages. `convsim eval`'s copy ruler counts spans of 8 *words*, and a word is at least one
token, so with SPAN = 8 no reply holds a copied span by that ruler's count (up to spelling the same words in
other tokens, e.g. other capitals).
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import LogitsProcessor

SPAN = 8


class CopyIndex:
    """Which next tokens would complete a training span, by the hash of the SPAN - 1 tokens before them."""

    def __init__(self, span: int = SPAN):
        if span < 2:
            raise ValueError("a copy span is at least 2 tokens")
        self.span = span
        self.next: dict[int, set[int]] = {}

    @classmethod
    def from_ids(cls, messages: Sequence[Sequence[int]], span: int = SPAN) -> "CopyIndex":
        index = cls(span)
        for ids in messages:
            for i in range(len(ids) - span + 1):
                index.next.setdefault(hash(tuple(ids[i : i + span - 1])), set()).add(ids[i + span - 1])
        return index

    @classmethod
    def from_texts(cls, tok, texts: Sequence[str], span: int = SPAN) -> "CopyIndex":
        """Each text tokenized as a rendered message (one batched tokenizer call)."""
        texts = [" " + t.strip() + "\n" for t in texts if t.strip()]
        if not texts:
            return cls(span)
        ids = tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return cls.from_ids(ids, span)

    def banned(self, tail: Sequence[int]) -> set[int]:
        """The tokens that may not follow `tail` (its last SPAN - 1 tokens matter)."""
        k = self.span - 1
        if len(tail) < k:
            return set()
        return self.next.get(hash(tuple(tail[-k:])), set())

    def copies(self, ids: Sequence[int]) -> bool:
        """Does `ids` hold a training span? (what the guard prevents; for tests and checks)"""
        k = self.span - 1
        return any(ids[i + k] in self.banned(ids[i : i + k]) for i in range(len(ids) - k))

    def __len__(self) -> int:
        return len(self.next)


class NoCopy(LogitsProcessor):
    """Sets to -inf every token that would complete a training span, counting only generated tokens (those
    after `prompt_len`): a reply may quote the conversation it answers, never the training data."""

    def __init__(self, index: CopyIndex, prompt_len: int):
        self.index, self.prompt_len = index, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        k = self.index.span - 1
        if input_ids.shape[1] - self.prompt_len < k or not self.index.next:
            return scores
        for row, tail in enumerate(input_ids[:, -k:].tolist()):
            ban = self.index.banned(tail)
            if ban:
                scores[row, sorted(ban)] = float("-inf")
        return scores


def for_run(run_, tok, span: int = SPAN) -> CopyIndex:
    """The guard of a run: every message of its training split (its extra data included)."""
    return CopyIndex.from_texts(tok, [m.text for c in run_.split("train") for m in c.messages], span)
