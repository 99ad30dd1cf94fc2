"""In-context baselines: the prompt a base model gets instead of fine-tuning — a short description naming
the people plus the target person's own training exchanges most similar to the context (TF-IDF
retrieval), filling a token budget, then the context. Used by `compare`, `eval` and `--retrieve`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from convsim.data.examples import Example, PromptFormat, render, tag_ids, text_ids
from convsim.data.schema import Message


def plain(fmt: PromptFormat) -> PromptFormat:
    """The same format with plain-text tags, for a base model that never saw the speaker tokens."""
    return replace(fmt, special_tokens=False)


class Retriever:
    """TF-IDF over training exchanges (context + reply) of each speaker."""

    def __init__(self, examples: Sequence[Example]):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.examples = list(examples)
        docs = [" ".join(m.text for m in e.context[-3:]) for e in self.examples] or ["empty"]
        self.vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=1, sublinear_tf=True)
        self.matrix = self.vec.fit_transform(docs)

    def top(self, context: Sequence[Message], speaker: str, k: int = 50, exclude: Sequence[str] = ()) -> list[Example]:
        if not self.examples:
            return []
        q = self.vec.transform([" ".join(m.text for m in list(context)[-3:])])
        scores = (self.matrix @ q.T).toarray().ravel()
        banned = {t.strip() for t in exclude}
        out = []
        for i in scores.argsort()[::-1]:
            e = self.examples[int(i)]
            if e.speaker != speaker or any(m.text.strip() in banned for m in e.reply + e.context):
                continue
            out.append(e)
            if len(out) >= k:
                break
        return out


def description(fmt: PromptFormat, speaker: str) -> str:
    people = " and ".join(fmt.speakers)
    return (
        f"Chat messages between {people}. Below are earlier exchanges showing how {speaker} writes, "
        f"then the current conversation; continue it as {speaker}.\n\n"
    )


def incontext_prompt(
    tok,
    fmt: PromptFormat,
    context: Sequence[Message],
    speaker: str,
    retrieved: Sequence[Example],
    budget: int,
    describe: bool = True,
) -> list[int]:
    """Prompt ids: [bos] description, retrieved exchanges (as many as fit `budget` tokens), context, tag."""
    base = render(tok, fmt, context, speaker).input_ids
    head = base[:1] if base and base[0] == tok.bos_token_id else []
    body = base[len(head) :]
    prefix = (
        tok(description(fmt, speaker), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if describe
        else []
    )
    for e in retrieved:
        ids = []
        for m in list(e.context[-3:]) + list(e.reply):
            ids += tag_ids(tok, fmt, m.speaker) + text_ids(tok, m.text)
        ids += tok("\n", add_special_tokens=False)["input_ids"]
        if len(head) + len(prefix) + len(ids) + len(body) > budget:
            break
        prefix += ids
    return head + prefix + body
