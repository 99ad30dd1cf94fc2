"""Google Chat from Google Takeout (`Google Chat/Groups/<DM or Space>/messages.json`) → one
Conversation per file.

    from convsim.data.importers import Report, googlechat
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
from datetime import datetime
from pathlib import Path
from typing import Any

from convsim.data.importers._text import as_text, load_json
from convsim.data.schema import Conversation, Message
from convsim.errors import UserError

_MONTHS = {
    m: i
    for i, m in enumerate(
        (
            "January",
            "February",
            "March",
            "April",
            "May",
            "June",
            "July",
            "August",
            "September",
            "October",
            "November",
            "December",
        ),
        1,
    )
}
_DAY = re.compile(r"(?:\w+, )?(\w+) (\d{1,2}), (\d{4})")
_CLOCK = re.compile(r"(\d{1,2}):(\d{2}):(\d{2})[\s\u202f\u00a0]*([AP]M)\s*(?:UTC|GMT)?")


def looks_like(obj: Any) -> bool:
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        return False
    first = next((m for m in obj["messages"][:20] if isinstance(m, dict)), None)
    return first is not None and "creator" in first and "created_date" in first


def parse(data: bytes | str | Path, source: str, report, **options) -> list[Conversation]:
    return parse_obj(load_json(as_text(data, source, report.notes), source), source, report, **options)


def parse_obj(obj: Any, source: str, report, group_info: bytes | None = None, **_options) -> list[Conversation]:
    if not looks_like(obj):
        raise UserError(
            f"{source}: not a Google Chat messages.json (expected 'messages' with 'creator' and 'created_date')"
        )
    dropped = report.dropped
    out: list[Message] = []
    days: dict[str, str | None] = {}
    clocks: dict[str, str | None] = {}
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
        out.append(Message(name, text, _time(ds, days, clocks) if type(ds) is str else None))
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
            members = (
                [m["name"] for m in info.get("members", []) if isinstance(m, dict) and isinstance(m.get("name"), str)]
                if isinstance(info.get("members"), list)
                else []
            )
            if members:
                return ", ".join(members).replace("#", "_")
    parts = source.replace("\\", "/").split("/")
    return parts[-2].replace("#", "_") if len(parts) >= 2 and parts[-2] else "Google Chat"


def _time(value: str, days: dict, clocks: dict) -> str | None:
    """ "Tuesday, January 2, 2024 at 10:00:00 AM UTC" → ISO 8601 UTC. A day's messages share the date
    and a clock time recurs, so each half is parsed once and remembered in `days` and `clocks`."""
    day, sep, clock = value.rpartition(" at ")
    if not sep:
        return None
    d = days.get(day, "")
    if d == "":
        d = days[day] = _day(day)
    c = clocks.get(clock, "")
    if c == "":
        c = clocks[clock] = _clock(clock)
    return None if d is None or c is None else d + c


def _day(s: str) -> str | None:
    m = _DAY.fullmatch(s.strip()[:60])
    if m is None:
        return None
    month, d, y = _MONTHS.get(m.group(1)), int(m.group(2)), int(m.group(3))
    if month is None or not 1 <= y <= 9999:
        return None
    try:
        datetime(y, month, d)
    except ValueError:
        return None
    return f"{y:04d}-{month:02d}-{d:02d}T"


def _clock(s: str) -> str | None:
    m = _CLOCK.fullmatch(s.strip()[:40])
    if m is None:
        return None
    h, mi, sec = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if not 1 <= h <= 12 or mi > 59 or sec > 59:
        return None
    h = h % 12 + (12 if m.group(4) == "PM" else 0)
    return f"{h:02d}:{mi:02d}:{sec:02d}+00:00"
