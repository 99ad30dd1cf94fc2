"""convsim's own `conversations.jsonl` (see `convsim.data.schema`) → conversations, checked line by line.

    from convsim.data.importers import Report, jsonl
    convs = jsonl.parse(Path("data/conversations.jsonl"), "conversations.jsonl", Report())

Re-importing a data dir's file (e.g. to merge aliases, re-scrub or re-split sessions) goes through the
same cleaning as any export. Also accepts a JSON list of conversation objects. A line that is not a
conversation is an error naming the line; a message with an unreadable `time` keeps `time: null`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from convsim.data.importers._text import as_text, short
from convsim.data.schema import Conversation, Message
from convsim.errors import UserError


def parse(data: bytes | str | Path, source: str, report, **options) -> list[Conversation]:
    text = as_text(data, source, report.notes)
    out = []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            raise UserError(f"{source}:{i}: not a JSON line ({short(line.strip(), 40)!r})") from None
        for conv in obj if isinstance(obj, list) else [obj]:
            out.extend(_conversation(conv, f"{source}:{i}", report))
    return out


def parse_obj(obj: Any, source: str, report, **_options) -> list[Conversation]:
    out = []
    for conv in obj if isinstance(obj, list) else [obj]:
        out.extend(_conversation(conv, source, report))
    return out


def _conversation(obj: Any, where: str, report) -> list[Conversation]:
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise UserError(f"{where}: not a conversation record (expected an object with a 'messages' list)")
    msgs = []
    for m in obj["messages"]:
        report.read += 1
        if not isinstance(m, dict) or not isinstance(m.get("speaker"), str) or not isinstance(m.get("text"), str):
            raise UserError(f"{where}: a message without a string 'speaker' and 'text': {short(m, 60)}")
        t = m.get("time")
        if t is not None:
            try:
                t = datetime.fromisoformat(t).isoformat() if isinstance(t, str) and len(t) <= 64 else None
            except ValueError:
                t = None
            if t is None:
                report.notes["unreadable_times"] = report.notes.get("unreadable_times", 0) + 1
        msgs.append(Message(m["speaker"], m["text"], t))
    source = obj.get("source") if isinstance(obj.get("source"), str) else ""
    return [Conversation(id=str(obj.get("id", "")), messages=msgs, source=source or f"jsonl:{where}")] if msgs else []
