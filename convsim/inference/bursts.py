"""The rules of a reply burst, in one place for every generation path (`generate.reply`, `stream_reply`,
the in-context baselines and the server's batched rows): what ends a burst, what is held off at its start,
and how generated ids become the messages a person sees.

    b = Burst(tok, fmt, "Ana")
    model.generate(..., logits_processor=[NoEarlyStop(b.early_stops(), prompt_len, 2)],
                   stopping_criteria=[StopOnSequences(b.stops, prompt_len)])
    b.messages(generated_ids)                     # ["hey", "what's up?"]
    stream = BurstStream(b); stream.feed([id])    # [(message index, text delta), ...] while generating

A burst ends at the first stop (another speaker's tag, end of text or of turn, padding; with plain-text
tags also another speaker's tag as text). It splits into messages on the speaker's own tag, drops empty
ones and a trailing partial speaker tag, and ends where a message repeats the one before. No stop is
allowed before the first `min_new_tokens` tokens. Streaming shows nothing these rules could take back,
and its deltas join to exactly `Burst.messages`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers import LogitsProcessor, StoppingCriteria

from convsim.data.examples import PromptFormat, end_of_turn_id, tag_ids
from convsim.data.schema import speaker_token


def stop_sequences(tok, fmt: PromptFormat, speaker: str) -> list[list[int]]:
    """Token sequences that end `speaker`'s burst: another speaker's tag, end of text or turn, padding."""
    stops = [tag_ids(tok, fmt, s) for s in fmt.speakers if s != speaker]
    stops += [[tok.eos_token_id], [end_of_turn_id(tok)]]
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        stops.append([tok.pad_token_id])
    return stops


def first_stop(ids: list[int], stops: Sequence[Sequence[int]]) -> tuple[int, list[int] | None]:
    """(index of the first stop sequence in ids, that sequence), or (len(ids), None)."""
    stops = [list(s) for s in stops if s]
    for i in range(len(ids)):
        for s in stops:
            if ids[i : i + len(s)] == s:
                return i, s
    return len(ids), None


def _find(ids: list[int], seq: list[int], start: int = 0, end: int | None = None) -> int | None:
    end = len(ids) if end is None else end
    return next((i for i in range(start, end - len(seq) + 1) if ids[i : i + len(seq)] == seq), None) if seq else None


def split_messages(tok, ids: list[int], tag: list[int]) -> list[str]:
    """Generated ids (stop already cut) → messages, split on the speaker's own tag ids; empty ones dropped."""
    parts, start = [], 0
    while (pos := _find(ids, tag, start)) is not None:
        parts.append(ids[start:pos])
        start = pos + len(tag)
    parts.append(ids[start:])
    texts = [tok.decode(p, skip_special_tokens=True).strip() for p in parts]
    return [t for t in texts if t]


def without_repeats(messages: list[str]) -> list[str]:
    """A burst ends where a message repeats the one before it: a model that starts looping has nothing
    more to say, and a person rarely sends the same message twice in a row."""
    out: list[str] = []
    for m in messages:
        if out and m.strip().casefold() == out[-1].strip().casefold():
            break
        out.append(m)
    return out


def without_partial_tag(text: str, tags: Sequence[str]) -> str:
    """`text` without a speaker tag that generation cut short at its end (`... [5` of `[549cc1d1]`): with
    plain-text tags the length limit can fall inside the next tag, whose start is not the person's text."""
    i = text.rfind("[")
    if i >= 0:
        tail = text[i:]
        at_line_start = i == 0 or text[i - 1] in " \n"
        if at_line_start and any(t.startswith(tail) and t != tail for t in tags):
            return text[:i].rstrip()
    return text


def empty_note(speaker: str) -> str:
    """The line shown instead of an empty reply: why it is empty and what to try."""
    return (
        f"note: {speaker}'s reply came out empty (the model wrote only spaces or stopped at once); "
        "try another --seed or a higher --temperature; a model trained for few steps often does this"
    )


@dataclass(eq=False)
class Burst:
    """`speaker`'s reply burst under one tokenizer and prompt format: its stops and how it splits."""

    tok: Any
    fmt: PromptFormat
    speaker: str
    stops: list[list[int]] = field(init=False)  # token sequences that end it
    tag: list[int] = field(init=False)  # the speaker's own tag: separates its messages
    texts: list[str] = field(init=False)  # plain-text tags: other speakers' tags as text, which end it too
    tags: list[str] = field(init=False)  # every speaker's tag as text

    def __post_init__(self):
        self.stops = stop_sequences(self.tok, self.fmt, self.speaker)
        self.tag = tag_ids(self.tok, self.fmt, self.speaker)
        self.tags = [speaker_token(s) for s in self.fmt.speakers]
        own = speaker_token(self.speaker)
        self.texts = [] if self.fmt.special_tokens else [t for t in self.tags if t != own]

    def early_stops(self) -> list[int]:
        """First tokens forbidden before `min_new_tokens`: of every stop, and of the speaker's own tag (which
        would open an empty message)."""
        return [s[0] for s in self.stops if s] + self.tag[:1]

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _text_cut(self, text: str) -> tuple[str, bool]:
        """`text` up to the first other speaker's tag text, and whether there was one."""
        at = min((i for i in (text.find(t) for t in self.texts) if i >= 0), default=-1)
        return (text[:at], True) if at >= 0 else (text, False)

    def messages(self, ids: list[int]) -> list[str]:
        """Generated ids → the burst's messages."""
        return without_repeats(self._split(ids)[0])

    def ends(self, ids: list[int]) -> bool:
        """Whether the burst in `ids` ended by itself (a stop, or a message repeating the one before) rather
        than ran out of tokens: OpenAI's finish_reason "stop" against "length"."""
        parts, stopped = self._split(ids)
        return stopped or len(without_repeats(parts)) < len(parts)

    def _split(self, ids: list[int]) -> tuple[list[str], bool]:
        """(every message, empty ones dropped, before the repeat rule; whether a stop ended the burst)."""
        cut, stop = first_stop(ids, self.stops)
        cut_ids = ids[:cut]
        if self.fmt.special_tokens:
            return split_messages(self.tok, cut_ids, self.tag), stop is not None
        text, hit = self._text_cut(self._decode(cut_ids))
        text = without_partial_tag(text, self.tags)
        own = speaker_token(self.speaker)
        return [m.strip() for m in text.split(own) if m.strip()], stop is not None or hit

    def stopped_by_text(self, ids: list[int]) -> bool:
        """With plain-text tags: whether another speaker's tag is in the text of `ids`."""
        return bool(self.texts) and self._text_cut(self._decode(ids))[1]


class NoEarlyStop(LogitsProcessor):
    """Forbids `banned` tokens (`Burst.early_stops`) until `k` tokens have been generated: a burst that stops
    at once is an empty reply. `banned` and `k` hold for every row, or are given per row (lists)."""

    def __init__(self, banned: Sequence[int] | Sequence[Sequence[int]], prompt_len: int, k: int | Sequence[int]):
        per_row = not isinstance(k, int)
        rows = list(banned) if per_row else [banned]
        self.banned = [sorted({int(b) for b in r if b is not None and b >= 0}) for r in rows]
        self.k = list(k) if per_row else [k]
        self.per_row, self.prompt_len = per_row, prompt_len

    def __call__(self, input_ids, scores):
        n = input_ids.shape[1] - self.prompt_len
        if n >= max(self.k, default=0):
            return scores
        scores = scores.clone()
        for i, (banned, k) in enumerate(zip(self.banned, self.k)):
            ban = [b for b in banned if b < scores.shape[1]]
            if n < k and ban:
                scores[i if self.per_row else slice(None), ban] = float("-inf")
        return scores


class StopOnSequences(StoppingCriteria):
    """True for a row once its generated tail ends with any stop sequence."""

    def __init__(self, stops: Sequence[Sequence[int]], prompt_len: int):
        self.stops = [list(s) for s in stops if len(s)]
        self.prompt_len = prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        gen = input_ids[:, self.prompt_len :]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for s in self.stops:
            if gen.shape[1] >= len(s):
                done |= (gen[:, -len(s) :] == torch.tensor(s, device=gen.device)).all(dim=1)
        return done


class StopOnText(StoppingCriteria):
    """For plain-text speaker tags: True once the decoded tail contains any of `texts`."""

    def __init__(self, tok, texts: Sequence[str], prompt_len: int):
        self.tok, self.texts, self.prompt_len = tok, list(texts), prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        tails = self.tok.batch_decode(input_ids[:, self.prompt_len :][:, -12:])
        return torch.tensor([any(t in tail for t in self.texts) for tail in tails], device=input_ids.device)


class BurstStream:
    """A burst's text while it is generated: `feed` the new ids, get (message index, text delta) pairs.

    Nothing is shown that the burst's rules could still take back: a stop or a speaker tag, whole or partial
    (the last ids, and with plain-text tags a trailing `[...` that may grow into a tag, wait), half a
    character, trailing spaces, or a message that may yet turn out to repeat the one before. Once the burst
    is over (a stop, a repeat, or `finished`), the deltas of each index join to `burst.messages(ids)`."""

    def __init__(self, burst: Burst):
        self.burst = burst
        self.holdback = max(len(s) for s in burst.stops + [burst.tag]) - 1
        self.ids: list[int] = []
        self.shown: list[str] = []
        self.over = False
        self._closed: list[str] = []  # special tags: the messages before `_start`, final
        self._start = 0

    def feed(self, new: Sequence[int], finished: bool = False) -> list[tuple[int, str]]:
        if self.over:
            return []
        b = self.burst
        self.ids.extend(new)
        cut, stop = first_stop(self.ids, b.stops)
        if finished or stop is not None or b.stopped_by_text(self.ids[:cut]):
            self.over = True
            return self._show(b.messages(self.ids))
        closed, open_ = self._view(self.ids[: max(0, cut - self.holdback)])
        closed = [m for m in closed if m]
        kept = without_repeats(closed)
        if len(kept) < len(closed):  # a message repeated the one before: the burst is over
            self.over = True
            return self._show(kept)
        may_repeat = kept and kept[-1].casefold().startswith(open_.casefold())
        return self._show(kept + [open_] if open_ and not may_repeat else kept)

    def _view(self, ids: list[int]) -> tuple[list[str], str]:
        """(the finished messages, the text of the one still being written) of ids that no stop can cut."""
        b = self.burst
        if b.fmt.special_tokens:
            while (pos := _find(ids, b.tag, self._start)) is not None:
                self._closed.append(b._decode(ids[self._start : pos]).strip())
                self._start = pos + len(b.tag)
            return self._closed, b._decode(ids[self._start :]).rstrip("\ufffd").strip()
        text = b._decode(ids).rstrip("\ufffd")
        i = text.rfind("[")
        if i >= 0 and any(t.startswith(text[i:]) for t in b.tags):
            text = text[:i]  # may grow into a speaker tag
        parts = text.split(speaker_token(b.speaker))
        return [p.strip() for p in parts[:-1]], parts[-1].strip()

    def _show(self, messages: list[str]) -> list[tuple[int, str]]:
        out = []
        for i, m in enumerate(messages):
            if i == len(self.shown):
                self.shown.append("")
            old = self.shown[i]
            if len(m) > len(old) and m.startswith(old):
                out.append((i, m[len(old) :]))
                self.shown[i] = m
        return out
