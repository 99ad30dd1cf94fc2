"""Discord exports made by DiscordChatExporter, CSV or JSON → one Conversation per channel.

    from convsim.data.importers import Report, discord
    convs = discord.parse(Path("general.csv").read_bytes(), "general.csv", Report())

CSV: the header `AuthorID,Author,Date,Content,Attachments,Reactions` (columns found by name; quoted
multi-line cells are one message). Dates: ISO 8601 (newer exporter versions) or `14-Sep-20 06:35 PM`
and a few other exporter/locale formats. JSON: `{"guild", "channel", "messages": [{"type", "timestamp",
"content", "author": {"name", "nickname"}, "attachments", "stickers", ...}]}`; the speaker is the
author's `nickname` (the display name) or else `name`.
Dropped and counted: system messages (joins, pins, calls, renames: "system"), attachments or stickers
without text ("media"), messages with no content at all ("empty").
A cell such as `=HYPERLINK(...)` (CSV formula injection) is kept as the literal text it is: nothing
here evaluates it and convsim never writes CSV.
"""

from __future__ import annotations

import csv
import io
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from convsim.data.importers._text import MARKS, as_text, load_json, short
from convsim.data.schema import Conversation, Message
from convsim.errors import UserError

_SYSTEM_TEXT = re.compile(
    r"(?:Joined the server\.|Pinned a message\.|Started a call(?: that lasted [^\n]*)?\.|Started a thread\.?"
    r"|Added [^\n]* to the group\.|Removed [^\n]* from the group\.|Left the group\.|Changed the channel name: [^\n]*"
    r"|Changed the channel icon\.|[^\n]{1,80} just boosted the server[^\n]*)\Z"
)
_USER_TYPES = {"Default", "Reply", "ChatInputCommand", "ContextMenuCommand", 0, 19, 20, 23}
_DATE_FORMATS = (
    "%d-%b-%y %I:%M %p",
    "%d-%b-%Y %I:%M %p",
    "%d-%b-%y %H:%M",
    "%m/%d/%Y %I:%M %p",
    "%m/%d/%Y %I:%M:%S %p",
    "%d/%m/%Y %H:%M",
    "%d/%m/%Y %H:%M:%S",
    "%d.%m.%Y %H:%M",
)
_CSV_FIELD_LIMIT = 64 * 1024 * 1024


def looks_like_csv(line: str) -> bool:
    cols = {c.strip().strip('"') for c in line.split(",")}
    return {"Author", "Date", "Content"} <= cols


def parse(data: bytes | str | Path, source: str, report, **options) -> list[Conversation]:
    text = as_text(data, source, report.notes)
    head = text.lstrip().lstrip("\ufeff")
    if head[:1] in ("{", "["):
        return parse_obj(load_json(head, source), source, report, **options)
    return parse_csv(text, source, report)


def parse_csv(text: str, source: str, report) -> list[Conversation]:
    old_limit = csv.field_size_limit()
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        rows = csv.reader(io.StringIO(text.lstrip("\ufeff"), newline=""), strict=True)
        header = next(rows, None)
        if header is None:
            raise UserError(f"{source}: empty CSV")
        col = {h.strip().strip(MARKS): i for i, h in enumerate(header)}
        missing = [c for c in ("Author", "Date", "Content") if c not in col]
        if missing:
            raise UserError(
                f"{source}: CSV without the DiscordChatExporter column(s) {', '.join(missing)} "
                f"(header: {short(','.join(header))!r})"
            )
        ia, idt, ic = col["Author"], col["Date"], col["Content"]
        iatt = col.get("Attachments")
        width = max(ia, idt, ic, iatt or 0) + 1
        dates: dict[str, str | None] = {}
        dropped = report.dropped
        out = []
        for row in rows:
            if not row:
                continue
            report.read += 1
            if len(row) < width:
                dropped["malformed"] += 1
                continue
            content = row[ic].strip()
            attachments = row[iatt].strip() if iatt is not None else ""
            author = row[ia]
            if not content:
                dropped["media" if attachments else "empty"] += 1
                continue
            if not attachments and _SYSTEM_TEXT.match(content):
                dropped["system"] += 1
                continue
            if not author.strip():
                dropped["no_sender"] += 1
                continue
            ds = row[idt]
            when = dates.get(ds, "")
            if when == "":
                when = dates[ds] = _time(ds)
            out.append(Message(author, content, when))
    except csv.Error as e:
        raise UserError(f"{source}: malformed CSV near line {rows.line_num} ({e})") from None
    finally:
        csv.field_size_limit(old_limit)
    return [Conversation(id="", messages=out, source=f"discord:{source}")] if out else []


def parse_obj(obj: Any, source: str, report, **_options) -> list[Conversation]:
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise UserError(f"{source}: not a DiscordChatExporter JSON export (expected an object with 'messages')")
    if not (
        "guild" in obj or "channel" in obj or any(isinstance(m, dict) and "author" in m for m in obj["messages"][:50])
    ):
        raise UserError(f"{source}: not a DiscordChatExporter JSON export (no 'guild', 'channel' or message 'author')")
    channel = obj.get("channel") if isinstance(obj.get("channel"), dict) else {}
    name = channel.get("name") if isinstance(channel.get("name"), str) else "channel"
    dropped = report.dropped
    out = []
    for m in obj["messages"]:
        report.read += 1
        if not isinstance(m, dict):
            dropped["malformed"] += 1
            continue
        if m.get("type", "Default") not in _USER_TYPES:
            dropped["system"] += 1
            continue
        content = m.get("content")
        content = content.strip() if isinstance(content, str) else ""
        if not content:
            media = any(isinstance(m.get(k), list) and m[k] for k in ("attachments", "stickers", "embeds"))
            dropped["media" if media else "empty"] += 1
            continue
        author = m.get("author") if isinstance(m.get("author"), dict) else {}
        speaker = next(
            (author[k] for k in ("nickname", "name") if isinstance(author.get(k), str) and author[k].strip()), None
        )
        if speaker is None:
            dropped["no_sender"] += 1
            continue
        out.append(Message(speaker, content, _time(m.get("timestamp"))))
    return [Conversation(id="", messages=out, source=f"discord:{source}#{name}")] if out else []


def _time(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip() or len(value) > 64:
        return None
    value = value.strip()
    try:
        return datetime.fromisoformat(value).isoformat()
    except ValueError:
        pass
    for fmt in _DATE_FORMATS:
        try:
            return datetime.strptime(value, fmt).isoformat()
        except ValueError:
            continue
    return None
