"""Signal Desktop chats as exported by signal-export (`sigexport`, github.com/carderne/signal-export):
each chat's `data.json` → one Conversation.

    from convsim.data.importers import Report, signal
    convs = signal.parse(Path("Ana/data.json"), "signal/Ana/data.json", Report(), me="Riya")

Signal itself exports nothing readable; signal-export is the maintained tool people use. It writes
`<dest>/<chat name>/chat.md`, `index.html` and (by default) `data.json`: one JSON object a line,
`{"date": "2024-01-02T10:00:00", "sender": "Ana", "body": "hi  ", "quote": "", "sticker": null,
"reactions": [["Ben", "👍"]], "attachments": [{"name", "path"}], "deleted": false, ...}`. This reads
data.json (the markdown is the same messages for people; its body can be mistaken for a WhatsApp line).
The account owner is "Me" in that file; `me` (the CLI's --me NAME) renames them. The chat's name is the
folder's. Dropped and counted: deleted messages ("deleted"), calls ("system"), stickers and attachments
without text ("media"), messages without a sender ("no_sender"). Quotes of earlier messages are not
repeated; reactions are not messages. Times are the exporter's local time, as written.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from convsim.data.importers._text import as_text
from convsim.data.schema import Conversation, Message
from convsim.errors import UserError

OWNER = "Me"
_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\r\n]*").match


def looks_like(obj: Any) -> bool:
    return isinstance(obj, dict) and "sender" in obj and "body" in obj and "date" in obj


def parse(data: bytes | str | Path, source: str, report, me: str | None = None, **_options) -> list[Conversation]:
    text = as_text(data, source, report.notes)
    # One value after another, straight from the text: no copy of a big file is made to split it.
    decode = _DECODER.raw_decode
    space = _SPACE
    rows = []
    append_row = rows.append
    i = space(text, 1 if text.startswith("\ufeff") else 0).end()
    n = len(text)
    try:
        while i < n:
            obj, i = decode(text, i)
            append_row(obj)
            i = space(text, i).end()
    except json.JSONDecodeError as e:
        line = text.count("\n", 0, e.pos) + 1
        start = text.rfind("\n", 0, e.pos) + 1
        snippet = text[start : start + 60].split("\n", 1)[0]
        raise UserError(f"{source}:{line}: not a JSON line of signal-export's data.json ({snippet!r})") from None
    except RecursionError:
        raise UserError(f"{source}: JSON nested too deeply to be signal-export's data.json") from None
    if not rows:
        raise UserError(f"{source}: no messages in signal-export's data.json")
    if not looks_like(rows[0]):
        raise UserError(f"{source}: not signal-export's data.json (its lines have 'date', 'sender' and 'body')")
    dropped = report.dropped
    out: list[Message] = []
    append = out.append
    iso = datetime.fromisoformat
    for m in rows:
        try:
            body, sender, date = m["body"], m["sender"], m["date"]
        except (TypeError, KeyError, IndexError):
            dropped["malformed"] += 1
            continue
        if m.get("deleted") is True:
            dropped["deleted"] += 1
            continue
        if m.get("call") is True or m.get("missed") is True:
            dropped["system"] += 1
            continue
        body = body.strip() if type(body) is str else ""
        if not body:
            dropped["media" if m.get("sticker") or m.get("attachments") else "empty"] += 1
            continue
        if type(sender) is not str or sender == "No-Sender" or not sender.strip():
            dropped["no_sender"] += 1
            continue
        if sender == OWNER and me:
            sender = me
        # what signal-export writes (2024-02-10T19:00:12) is already the form convsim keeps
        when = None
        if type(date) is str and len(date) == 19 and date[10] == "T":
            try:
                iso(date)
                when = date
            except ValueError:
                pass
        else:
            when = _time(date)
        append(Message(sender, body, when))
    report.read += len(rows)
    chat = chat_name(source)
    report.notes.setdefault("chats", {})[chat] = len(out)
    return [Conversation(id="", messages=out, source=f"signal:{source.replace('#', '_')}#{chat}")] if out else []


def parse_obj(obj: Any, source: str, report, **options) -> list[Conversation]:
    """A data.json of one message is one JSON value; read it as its one line."""
    return parse(json.dumps(obj, ensure_ascii=False), source, report, **options)


def chat_name(source: str) -> str:
    """The chat is the folder signal-export wrote data.json into."""
    parts = source.replace("\\", "/").split("/")
    return parts[-2] if len(parts) >= 2 and parts[-2] else "Signal chat"


def _time(value: Any) -> str | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        return datetime.fromisoformat(value).isoformat()
    except ValueError:
        return None
