"""Google Chat from Google Takeout (`Google Chat/Groups/<DM or Space>/messages.json`) → one
Conversation per file.

    from convsim.chats.importers import Report, googlechat
    convs = googlechat.parse(Path("messages.json"), "Google Chat/Groups/DM abc/messages.json", Report())

A file is `{"messages": [{"creator": {"name", "email", "user_type"}, "created_date": "Tuesday, January
2, 2024 at 10:00:00 AM UTC", "text", "topic_id", "message_id", "attached_files", "annotations"}]}`,
oldest first; newer Takeouts put a narrow no-break space before AM/PM. Thread replies (same
`topic_id`) are messages in time order like any other. The chat is named by `group_info.json` beside
the file (`{"name", "members": [{"name", ...}]}`: a space's name, a DM's members; `convsim import`
passes it as `group_info`), or else by the folder ("DM abc", "Space xyz"). Dropped and counted: deleted messages
("deleted"), bot messages ("system"), attachments without text ("media"). Times are UTC.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from convsim.chats.importers._text import as_text, load_json
from convsim.chats.schema import Conversation, Message
from convsim.errors import UserError

_MONTHS = {m: i for i, m in enumerate(("January", "February", "March", "April", "May", "June", "July", "August",
                                       "September", "October", "November", "December"), 1)}
_DATE = re.compile(r"(?:\w+, )?(\w+) (\d{1,2}), (\d{4}) at (\d{1,2}):(\d{2}):(\d{2})[\s\u202f\u00a0]*([AP]M)\s*(UTC|GMT)?\Z")


def looks_like(obj: Any) -> bool:
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        return False
    first = next((m for m in obj["messages"][:20] if isinstance(m, dict)), None)
    return first is not None and "creator" in first and "created_date" in first


def parse(data: bytes | str | Path, source: str, report, **options) -> list[Conversation]:
    return parse_obj(load_json(as_text(data, source, report.notes), source), source, report, **options)


def parse_obj(obj: Any, source: str, report, group_info: bytes | None = None, **_options) -> list[Conversation]:
    if not looks_like(obj):
        raise UserError(f"{source}: not a Google Chat messages.json (expected 'messages' with 'creator' and "
                        "'created_date')")
    dropped = report.dropped
    out: list[Message] = []
    times: dict[str, str | None] = {}
    for m in obj["messages"]:
        report.read += 1
        if not isinstance(m, dict):
            dropped["malformed"] += 1
            continue
        if "deletion_metadata" in m or "deleted_date" in m:
            dropped["deleted"] += 1
            continue
        creator = m.get("creator") if isinstance(m.get("creator"), dict) else {}
        if creator.get("user_type") == "Bot":
            dropped["system"] += 1
            continue
        text = m.get("text")
        text = text.strip() if isinstance(text, str) else ""
        if not text:
            dropped["media" if m.get("attached_files") or m.get("annotations") else "empty"] += 1
            continue
        name = creator.get("name")
        if not isinstance(name, str) or not name.strip():
            name = creator.get("email")
        if not isinstance(name, str) or not name.strip():
            dropped["no_sender"] += 1
            continue
        ds = m.get("created_date")
        when = None
        if isinstance(ds, str):
            when = times.get(ds, "")
            if when == "":
                when = times[ds] = _time(ds)
        out.append(Message(name, text, when))
    chat = chat_name(source, group_info)
    report.notes.setdefault("chats", {})[chat] = len(out)
    return [Conversation(id="", messages=out, source=f"googlechat:{source.replace('#', '_')}#{chat}")] if out else []


def chat_name(source: str, group_info: bytes | None = None) -> str:
    """The space's name or the DM's members from group_info.json; else the folder's name."""
    if group_info:
        try:
            info = json.loads(group_info.decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            info = None
        if isinstance(info, dict):
            if isinstance(info.get("name"), str) and info["name"].strip():
                return info["name"].strip().replace("#", "_")
            members = [m["name"] for m in info.get("members", []) if isinstance(m, dict) and isinstance(m.get("name"), str)] \
                if isinstance(info.get("members"), list) else []
            if members:
                return ", ".join(members).replace("#", "_")
    parts = source.replace("\\", "/").split("/")
    return parts[-2].replace("#", "_") if len(parts) >= 2 and parts[-2] else "Google Chat"


def _time(value: str) -> str | None:
    m = _DATE.match(value.strip()[:80])
    if m is None:
        return None
    month = _MONTHS.get(m.group(1))
    y, d = int(m.group(3)), int(m.group(2))
    h, mi, s = int(m.group(4)), int(m.group(5)), int(m.group(6))
    if month is None or not 1 <= h <= 12 or mi > 59 or s > 59 or not 1 <= d <= 31 or not 1 <= y <= 9999:
        return None
    if d > 28:  # the only days that need the calendar (30 February, 31 April)
        try:
            datetime(y, month, d, tzinfo=timezone.utc)
        except ValueError:
            return None
    h = h % 12 + (12 if m.group(7) == "PM" else 0)
    return f"{y:04d}-{month:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}+00:00"
