"""The conversation schema every stage reads: `DATA_DIR/conversations.jsonl`, one conversation a line.

    {"id": "c0001", "source": "whatsapp:chat.txt", "messages": [
        {"speaker": "Ana", "text": "hi!\\nsecond line", "time": "2024-01-02T10:00:00+00:00"}, ...]}

`time` is ISO 8601 (or null when the export has none). Messages are in order; a multi-line message is
one message. Speaker names are kept exactly as exported.

Times are compared as instants (`instant`: seconds since the epoch), never as strings: "10:30+02:00" is before
"09:00+00:00". A time without an offset (WhatsApp, some CSVs: the exporting phone's local time) is taken as
UTC everywhere, so naive times order among themselves as written and the same data always splits the same way
whatever the machine's time zone.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from convsim.errors import UserError, brief
from convsim.fsutil import atomic_path

CONVERSATIONS = "conversations.jsonl"


def speaker_token(name: str) -> str:
    """How a speaker is spelled in a rendered chat: `[Ana]` (one added special token per person)."""
    return f"[{name}]"


def aware(time: str | None) -> datetime | None:
    """An ISO 8601 time as an aware datetime (no offset: UTC); None when missing or not a time."""
    if not isinstance(time, str) or not time:
        return None
    try:
        d = datetime.fromisoformat(time)
    except ValueError:
        return None
    return d.replace(tzinfo=timezone.utc) if d.tzinfo is None else d


def instant(time: str | None) -> float | None:
    """An ISO 8601 time as seconds since the epoch (no offset: UTC); None when missing or not a time."""
    d = aware(time)
    return None if d is None else d.timestamp()


@dataclass
class Message:
    speaker: str
    text: str
    time: str | None = None

    def dt(self) -> datetime | None:
        return datetime.fromisoformat(self.time) if self.time else None


@dataclass
class Conversation:
    id: str
    messages: list[Message]
    source: str = ""

    @property
    def speakers(self) -> list[str]:
        seen: dict[str, None] = {}
        for m in self.messages:
            seen.setdefault(m.speaker, None)
        return list(seen)

    def to_json(self) -> dict:
        return {"id": self.id, "source": self.source, "messages": [asdict(m) for m in self.messages]}

    @staticmethod
    def from_json(obj: dict) -> "Conversation":
        """A record of conversations.jsonl; a `ValueError` says what is wrong with one that is not."""
        if not isinstance(obj, dict):
            raise ValueError(f"expected an object, not {type(obj).__name__}")
        msgs = obj["messages"]
        if not isinstance(msgs, list):
            raise ValueError("`messages` must be a list")
        out = []
        for m in msgs:
            if not isinstance(m, dict):
                raise ValueError(f"a message must be an object, not {type(m).__name__}")
            speaker, text, time = m["speaker"], m["text"], m.get("time")
            if not isinstance(speaker, (str, int)) or isinstance(speaker, bool) or not isinstance(text, str):
                raise ValueError("a message's speaker and text must be strings")
            if time is not None:
                try:
                    datetime.fromisoformat(time)
                except (TypeError, ValueError):
                    raise ValueError(f"`time` must be an ISO 8601 string or null, not {brief(time)}") from None
            out.append(Message(str(speaker), text, time))
        return Conversation(id=str(obj["id"]), source=str(obj.get("source", "")), messages=out)


_enc = getattr(json.encoder, "c_encode_basestring", None) or json.encoder.py_encode_basestring


def _line(c: Conversation, names: dict[str, str]) -> str:
    """`json.dumps(c.to_json(), ensure_ascii=False)`, built with the string encoder directly: several
    times faster on large imports, which write through here."""
    parts = []
    for m in c.messages:
        spk = names.get(m.speaker)
        if spk is None:
            spk = names[m.speaker] = '{"speaker": ' + _enc(m.speaker) + ', "text": '
        t = m.time
        parts.append(spk + _enc(m.text) + (', "time": null}' if t is None else ', "time": ' + _enc(t) + "}"))
    return '{"id": ' + _enc(c.id) + ', "source": ' + _enc(c.source) + ', "messages": [' + ", ".join(parts) + "]}\n"


def write_conversations(path: str | os.PathLike, convs: Iterable[Conversation]) -> int:
    """Write conversations.jsonl atomically, owner-only; returns the number of conversations."""
    names: dict[str, str] = {}
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for c in convs:
            f.write(_line(c, names))
            n += 1
    return n


def read_conversations(data_dir: str | os.PathLike) -> list[Conversation]:
    """Read DATA_DIR/conversations.jsonl (or a .jsonl path). Raises UserError on a missing or bad file."""
    p = Path(data_dir)
    f = p / CONVERSATIONS if p.is_dir() else p
    if not f.exists():
        raise UserError(f"no {CONVERSATIONS} in {p} (run `convsim import` first)")
    if not f.is_file():
        raise UserError(f"{f} is not a regular file")
    out = []
    with open(f, "rb") as fh:
        for i, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                out.append(Conversation.from_json(json.loads(raw.decode("utf-8"))))
            except UnicodeDecodeError:
                raise UserError(f"{f}:{i}: not UTF-8 text (binary or another encoding)") from None
            except RecursionError:
                raise UserError(f"{f}:{i}: JSON nested too deeply") from None
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{f}:{i}: not a conversation record ({str(e)[:200]})") from None
    return out


def speakers_of(convs: Iterable[Conversation]) -> list[str]:
    """All speakers, most messages first (ties by name)."""
    counts: dict[str, int] = {}
    for c in convs:
        for m in c.messages:
            counts[m.speaker] = counts.get(m.speaker, 0) + 1
    return sorted(counts, key=lambda s: (-counts[s], s))
