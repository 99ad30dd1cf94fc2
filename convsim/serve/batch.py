"""Batched generation for the server: several prompts of one run decoded together, each row with its own
sampling settings, seed, token budget and stop sequences, and each streaming its own text as it goes.

    rows = [Row(prompt_ids, stops, tag, temperature=0, max_new_tokens=64, on_delta=print), ...]
    generate_rows(model, tok, rows, pad_id)      # fills row.ids, row.stop; then row.messages(tok)

A row samples with its own `torch.Generator` (seeded from the request, or at random), so what a row gets
does not depend on which other rows share its batch; greedy rows take the argmax, as `generate` does.
Rows are left-padded to one width; a row is finished at its first stop sequence or its own budget, and the
batch ends when every row is. A burst is cut as `convsim.inference.generate.reply` cuts it: at the first
stop, split on the speaker's own tag, and ended where a message repeats the one before (`without_repeats`).
Streaming follows the same rules: no stop sequence or speaker tag, whole or partial, is ever shown, a message
that might still turn out to repeat the one before is held back until it differs, and the deltas join to
the messages that the non-streaming path returns.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from convsim.inference.bursts import without_repeats


def first_stop(ids: list[int], stops: list[list[int]]) -> tuple[int, list[int] | None]:
    """(index of the first stop sequence in ids, that sequence), or (len(ids), None)."""
    for i in range(len(ids)):
        for s in stops:
            if ids[i : i + len(s)] == s:
                return i, s
    return len(ids), None


def split_on(tok, ids: list[int], tag: list[int]) -> list[str]:
    """Generated ids (stop already cut) → messages, split on the speaker's own tag; empty ones dropped
    (`without_repeats` then ends the burst where a message repeats the one before)."""
    parts, cur, i = [], [], 0
    while i < len(ids):
        if tag and ids[i : i + len(tag)] == tag:
            parts.append(cur)
            cur, i = [], i + len(tag)
        else:
            cur.append(ids[i])
            i += 1
    parts.append(cur)
    texts = [tok.decode(p, skip_special_tokens=True).strip() for p in parts]
    return [t for t in texts if t]


class TextStream:
    """Incremental text of one row: feed it the ids as they come, get (message index, delta) pairs."""

    def __init__(self, tok, stops: list[list[int]], tag: list[int]):
        self.tok, self.stops, self.tag = tok, stops, tag
        self.holdback = max(len(s) for s in stops + [tag]) - 1
        self.gen: list[int] = []
        self.index, self.shown, self.consumed = 0, "", 0
        self.previous: str | None = None  # the last whole message shown, casefolded
        self.ended = False  # a message repeated the one before: the burst is over

    def _repeats(self, text: str) -> bool:
        return self.previous is not None and text.casefold() == self.previous

    def _may_repeat(self, text: str) -> bool:
        """Whether `text`, still growing, could yet become a repeat of the previous message."""
        return self.previous is not None and self.previous.startswith(text.casefold())

    def _text(self, upto: int) -> str:
        return self.tok.decode(self.gen[self.consumed : upto], skip_special_tokens=True)

    def feed(self, new: list[int], finished: bool = False) -> list[tuple[int, str]]:
        if self.ended:
            return []
        self.gen.extend(new)
        out = []
        cut, stop = first_stop(self.gen, self.stops)
        done = finished or stop is not None
        safe = cut if done else max(self.consumed, cut - self.holdback)
        tag = self.tag
        while tag:  # message breaks inside the safe region
            pos = next(
                (i for i in range(self.consumed, safe - len(tag) + 1) if self.gen[i : i + len(tag)] == tag), None
            )
            if pos is None:
                break
            text = self._text(pos).strip()
            if text and self._repeats(text):
                self.ended = True
                return out
            if text[len(self.shown) :]:
                out.append((self.index, text[len(self.shown) :]))
            if text:
                self.index += 1
                self.previous = text.casefold()
            self.consumed, self.shown = pos + len(tag), ""
        text = self._text(safe).lstrip()
        if done:
            text = text.rstrip()
        if text.endswith("\ufffd"):  # half a character: wait for the rest
            text = text.rstrip("\ufffd")
        if not done:
            text = text.rstrip()  # trailing space may end the message; show it with what follows
        if done and text and self._repeats(text):
            self.ended = True
            return out
        if not done and not self.shown and self._may_repeat(text):
            return out  # nothing of a possible repeat is shown until it differs
        if len(text) > len(self.shown) and text.startswith(self.shown):
            out.append((self.index, text[len(self.shown) :]))
            self.shown = text
        return out


@dataclass
class Row:
    """One sequence to generate, and (after `generate_rows`) what it got."""

    prompt: list[int]
    stops: list[list[int]]  # any of these ends the row (other speakers' tags, eos, ...)
    tag: list[int]  # the speaker's own tag: separates the messages of a burst
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    seed: int | None = None
    on_delta: Callable[[int, str], None] | None = None  # streaming: (message index, text delta)
    cancelled: Callable[[], bool] | None = None  # a gone client: the row stops early
    ids: list[int] = field(default_factory=list)  # generated ids, cut before the stop
    stop: list[int] | None = None  # the stop sequence that ended it (None: budget)

    def messages(self, tok) -> list[str]:
        return without_repeats(split_on(tok, self.ids, self.tag))

    def ended(self, tok) -> bool:
        """Whether the burst ended (a stop sequence, or a message repeating the one before) rather than ran
        out of tokens: OpenAI's finish_reason "stop" against "length"."""
        if self.stop is not None:
            return True
        whole = split_on(tok, self.ids, self.tag)
        return len(without_repeats(whole)) < len(whole)


class _RowSampler(LogitsProcessor):
    """Picks each row's next token itself (greedy or temperature + top-p with the row's own generator) and
    hands `generate` scores whose argmax is that token."""

    def __init__(self, rows: list[Row], vocab: int | None = None):
        self.rows, self.vocab = rows, vocab
        self.generators: list[torch.Generator | None] = [None] * len(rows)

    def _generator(self, i: int, device) -> torch.Generator:
        g = self.generators[i]
        if g is None:
            seed = self.rows[i].seed
            g = torch.Generator(device=device)
            g.manual_seed(seed % (1 << 63) if seed is not None else secrets.randbits(63))
            self.generators[i] = g
        return g

    def __call__(self, input_ids, scores):
        if self.vocab is not None and scores.shape[-1] > self.vocab:  # rows another run's tokens use
            scores = scores.clone()
            scores[:, self.vocab :] = float("-inf")
        choice = scores.argmax(dim=-1)
        for i, r in enumerate(self.rows):
            if not r.temperature or r.temperature <= 0:
                continue
            logits = scores[i].float() / r.temperature
            probs = torch.softmax(logits, dim=-1)
            if r.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < r.top_p  # always keeps the most likely token
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            choice[i] = torch.multinomial(probs, 1, generator=self._generator(i, probs.device))[0]
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0], device=scores.device), choice] = 0.0
        return out


class _RowStops(StoppingCriteria):
    """A row is done at its first stop sequence, at its own budget, or when its client has gone."""

    def __init__(self, rows: list[Row], width: int):
        self.rows, self.width = rows, width

    def __call__(self, input_ids, scores, **kwargs):
        n = input_ids.shape[1] - self.width
        w = max(len(s) for r in self.rows for s in r.stops)
        tails = input_ids[:, -min(n, w) :].tolist() if n > 0 else [[] for _ in self.rows]
        done = []
        for r, tail in zip(self.rows, tails):
            hit = any(len(tail) >= len(s) and tail[-len(s) :] == s for s in r.stops)
            done.append(hit or n >= r.max_new_tokens or bool(r.cancelled and r.cancelled()))
        return torch.tensor(done, device=input_ids.device)


class _RowStreamer(BaseStreamer):
    """Hands each step's tokens to the rows still running; a row stops listening at its first stop."""

    def __init__(self, tok, rows: list[Row]):
        self.rows, self.first = rows, True
        self.streams = [TextStream(tok, r.stops, r.tag) if r.on_delta else None for r in rows]
        self.gen: list[list[int]] = [[] for _ in rows]
        self.done = [False] * len(rows)
        self.window = max(len(s) for r in rows for s in r.stops)

    def put(self, value):
        if self.first:  # the prompt
            self.first = False
            return
        for i, t in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            r = self.rows[i]
            self.gen[i].append(t)
            _, stop = first_stop(self.gen[i][-self.window :], r.stops)
            self.done[i] = stop is not None or len(self.gen[i]) >= r.max_new_tokens
            if self.streams[i] is not None:
                for index, delta in self.streams[i].feed([t], finished=self.done[i]):
                    r.on_delta(index, delta)

    def end(self):
        for i, s in enumerate(self.streams):
            if s is not None and not self.done[i]:
                self.done[i] = True
                for index, delta in s.feed([], finished=True):
                    self.rows[i].on_delta(index, delta)


def generate_rows(model, tok, rows: list[Row], pad_id: int, vocab: int | None = None) -> list[Row]:
    """Generate every row in one left-padded batch; fills each row's `ids` and `stop`. `vocab`: the size of
    the rows' tokenizer, when the model's embedding is larger (other runs' speaker tokens)."""
    from convsim.inference import fastgen

    dev = next(model.parameters()).device
    width = max(len(r.prompt) for r in rows)
    x = torch.tensor([[pad_id] * (width - len(r.prompt)) + r.prompt for r in rows], device=dev)
    mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows], device=dev)
    streamer = _RowStreamer(tok, rows)
    with torch.inference_mode():
        out = fastgen.generate(
            model,
            x,
            attention_mask=mask,
            max_new_tokens=max(r.max_new_tokens for r in rows),
            pad_token_id=pad_id,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=LogitsProcessorList([_RowSampler(rows, vocab)]),
            stopping_criteria=StoppingCriteriaList([_RowStops(rows, width)]),
            streamer=streamer,
        )
    for r, gen in zip(rows, out[:, width:].tolist()):
        gen = gen[: r.max_new_tokens]
        cut, r.stop = first_stop(gen, r.stops)
        r.ids = gen[:cut]
    return rows
