"""The numbers behind the figures that need no model: pure functions of a run's saved files.

    words, notes = read_words(path)                      # the emotion word list
    curves = loss_curves(run_dir / "metrics.jsonl")      # {"train": [(step, loss)], "val": [...]}
    sizes = burst_sizes(convs)                           # speaker -> [messages in a row, ...]
    delays = reply_delays(convs)                         # speaker -> [seconds, ...]

Anything a run may lack (metrics, message times) comes back empty, and the caller skips that figure.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Sequence

from convsim.data.examples import bursts
from convsim.data.schema import Conversation, aware
from convsim.errors import UserError

DEFAULT_WORDS = Path(__file__).resolve().parent.parent / "assets" / "emotion-words.txt"


def read_words(path: str | Path | None = None) -> list[str]:
    """Words from a file (one a line, '#' comments, blanks ignored), de-duplicated in order."""
    p = Path(path) if path else DEFAULT_WORDS
    if not p.is_file():
        raise UserError(f"no word list at {p} (one word a line)")
    words: list[str] = []
    for line in p.read_text(encoding="utf-8").splitlines():
        w = line.split("#", 1)[0].strip()
        if w and w not in words:
            words.append(w)
    if len(words) < 2:
        raise UserError(f"{p}: needs at least two words (one a line), found {len(words)}")
    return words


def single_token_words(tokenizer, words: Sequence[str]) -> tuple[list[str], list[str]]:
    """(kept, dropped): a word is kept when " word" is one token, so its last-token state is the word's."""
    kept, dropped = [], []
    for w in words:
        ids = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        (kept if len(ids) == 1 else dropped).append(w)
    return kept, dropped


def loss_curves(metrics_path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Train and validation loss by step from the trainer's metrics.jsonl (the last row of a step wins,
    so a resumed run or the trainer's closing evaluation does not draw a step twice). Unreadable lines
    (a run still writing) are ignored; a missing file gives empty curves."""
    p = Path(metrics_path)
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    if not p.is_file():
        return {"train": [], "val": []}
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(row.get("loss"), (int, float)):
            train[step] = float(row["loss"])
        if isinstance(row.get("eval_loss"), (int, float)):
            val[step] = float(row["eval_loss"])
    return {"train": sorted(train.items()), "val": sorted(val.items())}


def speaker_order(convs: Sequence[Conversation], first: Sequence[str] = ()) -> list[str]:
    """`first` (the run's speakers, in their order) that occur, then everyone else by message count."""
    counts: dict[str, int] = {}
    for c in convs:
        for m in c.messages:
            counts[m.speaker] = counts.get(m.speaker, 0) + 1
    head = [s for s in first if s in counts]
    return head + sorted((s for s in counts if s not in head), key=lambda s: (-counts[s], s))


def message_texts(convs: Sequence[Conversation]) -> dict[str, list[str]]:
    """speaker -> the texts of their messages."""
    out: dict[str, list[str]] = {}
    for c in convs:
        for m in c.messages:
            out.setdefault(m.speaker, []).append(m.text)
    return out


def burst_sizes(convs: Sequence[Conversation]) -> dict[str, list[int]]:
    """speaker -> how many messages they sent in a row, one entry per burst."""
    out: dict[str, list[int]] = {}
    for c in convs:
        for s, e in bursts(c.messages):
            out.setdefault(c.messages[s].speaker, []).append(e - s)
    return out


def _time(value: str | None) -> datetime | None:
    return aware(value)  # offsets compared; no offset: UTC


def reply_delays(convs: Sequence[Conversation]) -> dict[str, list[float]]:
    """speaker -> seconds from the previous burst's last message (someone else's) to their first message
    of a burst; within a conversation, only where both times are known (negative gaps count as 0)."""
    out: dict[str, list[float]] = {}
    for c in convs:
        spans = bursts(c.messages)
        for (_, prev_end), (start, _) in zip(spans, spans[1:]):
            t0, t1 = _time(c.messages[prev_end - 1].time), _time(c.messages[start].time)
            if t0 is None or t1 is None:
                continue
            gap = (t1 - t0).total_seconds()
            out.setdefault(c.messages[start].speaker, []).append(max(0.0, gap))
    return out
