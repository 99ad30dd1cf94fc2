"""A request's life inside the server: the `Job` a route hands to the worker thread (with the events it
gets back, to a thread queue or to the app's asyncio loop), and `fit_history`, which keeps the most recent
messages that fit the model's context.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from dataclasses import dataclass, field
from typing import Callable

from convsim.serve.loading import RunEntry


@dataclass
class Job:
    """One request for the worker: generate (`rows` > 0) or call `fn` with the model (attribution)."""

    entry: RunEntry | None = None
    speaker: str = ""
    history: list = field(default_factory=list)
    cfg: object = None  # convsim.inference.generate.SampleConfig
    n: int = 1
    stream: bool = False
    steer: tuple = ()  # ((vector name, strength), ...) sorted, no zeros
    include_usage: bool = False
    model_id: str = ""
    fn: Callable | None = None
    cancelled: bool = False
    batch: tuple = ()  # (batch number, rows in it), set by the worker
    stopped_by: list = field(default_factory=list)  # per row: the stop sequence that ended it, or None

    def __post_init__(self):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._loop = self._aq = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver events to an asyncio queue on `loop` (the app) instead of a thread queue."""
        self._loop, self._aq = loop, asyncio.Queue()

    def emit(self, event: tuple) -> None:
        if self._loop is None:
            self._q.put(event)
        else:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                self._loop.call_soon_threadsafe(self._aq.put_nowait, event)

    def wait(self, timeout: float | None = None) -> tuple:
        return self._q.get(timeout=timeout)

    async def next_event(self, alive: Callable[[], bool]) -> tuple:
        while True:
            try:
                return await asyncio.wait_for(self._aq.get(), 1.0)
            except asyncio.TimeoutError:
                if not alive():
                    return ("error", "the generation worker stopped")


def fit_history(tok, fmt, history, speaker: str, budget: int) -> list:
    """The most recent messages whose tokens fit `budget` with the prompt around them; a single message
    too long by itself keeps its end. Each message is tokenized at most once (bodies can be large)."""
    from convsim.data.examples import render, tag_ids, text_ids
    from convsim.data.schema import Message

    used = len(render(tok, fmt, [], speaker).input_ids)
    kept = []
    for m in reversed(history):
        text = m.text[-16 * budget :]  # no token is longer than 16 characters in practice
        ids = text_ids(tok, text)
        cost = len(tag_ids(tok, fmt, m.speaker)) + len(ids)
        if used + cost > budget:
            room = budget - used - len(tag_ids(tok, fmt, m.speaker)) - 8  # decode → encode may grow a little
            if not kept and room > 0:
                kept.append(Message(m.speaker, tok.decode(ids[-room:], skip_special_tokens=True).strip()))
            break
        kept.append(Message(m.speaker, text))
        used += cost
    return kept[::-1]
