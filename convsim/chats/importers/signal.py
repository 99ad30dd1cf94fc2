"""Signal Desktop chats as exported by signal-export (`sigexport`, github.com/carderne/signal-export):
each chat's `data.json` → one Conversation.

    from convsim.chats.importers import Report, signal
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
from datetime import datetime
from pathlib import Path
from typing import Any

from convsim.chats.importers._text import as_text, short
from convsim.chats.schema import Conversation, Message
from convsim.errors import UserError

OWNER = "Me"


def looks_like(obj: Any) -> bool:
    return isinstance(obj, dict) and "sender" in obj and "body" in obj and "date" in obj


def parse(data: bytes | str | Path, source: str, report, me: str | None = None, **_options) -> list[Conversation]:
    text = as_text(data, source, report.notes)
    dropped = report.dropped
    out: list[Message] = []
    read = 0
    for i, line in enumerate(text.split("\n"), 1):
        line = line.strip().lstrip("\ufeff")
        if not line:
            continue
        try:
            m = json.loads(line)
        except (ValueError, RecursionError):
            raise UserError(f"{source}:{i}: not a JSON line of signal-export's data.json ({short(line, 60)!r})") from None
        read += 1
        if not looks_like(m):
            if i == 1 and read == 1:
                raise UserError(f"{source}: not signal-export's data.json (its lines have 'date', 'sender' and 'body')")
            dropped["malformed"] += 1
            continue
        if m.get("deleted") is True:
            dropped["deleted"] += 1
            continue
        if m.get("call") is True or m.get("missed") is True:
            dropped["system"] += 1
            continue
        body = m.get("body")
        body = body.strip() if isinstance(body, str) else ""
        if not body:
            dropped["media" if m.get("sticker") or m.get("attachments") else "empty"] += 1
            continue
        sender = m.get("sender")
        if not isinstance(sender, str) or not sender.strip() or sender == "No-Sender":
            dropped["no_sender"] += 1
            continue
        if sender == OWNER and me:
            sender = me
        out.append(Message(sender, body, _time(m.get("date"))))
    report.read += read
    if read == 0:
        raise UserError(f"{source}: no messages in signal-export's data.json")
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
