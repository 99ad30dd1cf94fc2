"""Batched generation for the server: several prompts of one run decoded together, each row with its own
sampling settings, seed, token budget and burst rules, and each streaming its own text as it goes.

    rows = [Row(prompt_ids, Burst(tok, fmt, "Ana"), temperature=0, max_new_tokens=64, on_delta=print), ...]
    generate_rows(model, tok, rows, pad_id)      # fills row.ids, row.stop; then row.messages()

A row samples with its own `torch.Generator` (seeded from the request, or at random), so what a row gets
does not depend on which other rows share its batch; greedy rows take the argmax, as `generate` does.
Rows are left-padded to one width; a row is finished at its first stop or its own budget, and the batch
ends when every row is. Each row follows its `convsim.inference.bursts.Burst`, the rules
`convsim.inference.generate.reply` follows: no stop before `min_new_tokens`, the cut at the first stop, the
split on the speaker's own tag, the end where a message repeats the one before; streaming goes through the
same `BurstStream` as `stream_reply`, so the deltas join to the messages the non-streaming path returns.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from convsim.inference.bursts import Burst, BurstStream, NoEarlyStop, first_stop
from convsim.inference.generate import SampleConfig


@dataclass
class Row:
    """One sequence to generate, and (after `generate_rows`) what it got."""

    prompt: list[int]
    burst: Burst  # its speaker's rules: stops, own tag, how the ids become messages
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    min_new_tokens: int = SampleConfig.min_new_tokens  # no stop before this many tokens
    seed: int | None = None
    on_delta: Callable[[int, str], None] | None = None  # streaming: (message index, text delta)
    cancelled: Callable[[], bool] | None = None  # a gone client: the row stops early
    ids: list[int] = field(default_factory=list)  # generated ids, cut before the stop
    stop: list[int] | None = None  # the stop sequence that ended it (None: budget, or a stop in the text)

    @property
    def stops(self) -> list[list[int]]:
        return self.burst.stops

    def messages(self) -> list[str]:
        return self.burst.messages(self.ids)

    def ended(self) -> bool:
        """Whether the burst ended by itself rather than ran out of tokens: finish_reason "stop" or "length"."""
        return self.stop is not None or self.burst.ends(self.ids)


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
        for i, (r, tail) in enumerate(zip(self.rows, tails)):
            hit = any(len(tail) >= len(s) and tail[-len(s) :] == s for s in r.stops)
            if not hit and r.burst.texts and n > 0:  # plain-text tags: another speaker's tag as text
                hit = r.burst.stopped_by_text(input_ids[i, self.width :][-12:].tolist())
            done.append(hit or n >= r.max_new_tokens or bool(r.cancelled and r.cancelled()))
        return torch.tensor(done, device=input_ids.device)


class _RowStreamer(BaseStreamer):
    """Hands each step's tokens to the rows still running; a row stops listening at its first stop."""

    def __init__(self, tok, rows: list[Row]):
        self.rows, self.first = rows, True
        self.streams = [BurstStream(r.burst) if r.on_delta else None for r in rows]
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


def generate_rows(model, tok, rows: list[Row], pad_id: int, vocab: int | None = None, guard=None) -> list[Row]:
    """Generate every row in one left-padded batch; fills each row's `ids` and `stop`. `vocab`: the size of
    the rows' tokenizer, when the model's embedding is larger (other runs' speaker tokens); `guard`: the
    run's `nocopy.CopyIndex` (no training span completed), or None."""
    from convsim.inference import fastgen
    from convsim.inference.nocopy import NoCopy

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
            logits_processor=LogitsProcessorList(
                [
                    NoEarlyStop(
                        [r.burst.early_stops() for r in rows],
                        width,
                        [min(r.min_new_tokens, r.max_new_tokens) for r in rows],
                    ),
                    *([NoCopy(guard, width)] if guard is not None else []),
                    _RowSampler(rows, vocab),  # last: it picks the token from the scores the others left
                ]
            ),
            stopping_criteria=StoppingCriteriaList([_RowStops(rows, width)]),
            streamer=streamer,
        )
    for r, gen in zip(rows, out[:, width:].tolist()):
        gen = gen[: r.max_new_tokens]
        cut, r.stop = first_stop(gen, r.stops)
        r.ids = gen[:cut]
    return rows
