"""Telegram Desktop JSON exports (`result.json`) → one Conversation per chat (sessions split later).

    from convsim.data.importers import Report, telegram
    convs = telegram.parse(Path("result.json"), "result.json", Report(), chats=["Ana"])

Reads a one-chat export (`{"name", "type", "id", "messages": [...]}`) and a whole-account export
(`{"chats": {"list": [chat, ...]}, "left_chats": {...}, ...}`); `chats` (the CLI's repeatable
`--chat NAME`, a chat's name or id) picks chats, and an unknown one is an error listing what exists.
Message text may be a string or a list of strings and entity objects (`{"type": "bold", "text": ...}`);
they are joined. Dropped and counted: service messages (joins, calls, pins: "system"), media without a
caption (photos, stickers, files, voice, polls, locations: "media"). Speakers are the `from` names as
exported; a deleted account (`from: null`) is "Deleted Account". Times are the export's local `date`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from convsim.data.importers._text import as_text, load_json, short
from convsim.data.schema import Conversation, Message
from convsim.errors import UserError

_MEDIA_KEYS = (
    "photo",
    "file",
    "media_type",
    "sticker_emoji",
    "contact_information",
    "location_information",
    "poll",
    "game",
    "invoice",
    "place_name",
)


def parse(data: bytes | str | Path, source: str, report, **options) -> list[Conversation]:
    return parse_obj(load_json(as_text(data, source, report.notes), source), source, report, **options)


def parse_obj(obj: Any, source: str, report, chats: list[str] | None = None, **_options) -> list[Conversation]:
    if not isinstance(obj, dict):
        raise UserError(f"{source}: not a Telegram export (expected a JSON object)")
    if isinstance(obj.get("chats"), dict):
        found = [c for key in ("chats", "left_chats") for c in _list(obj.get(key)) if isinstance(c, dict)]
        if not found:
            raise UserError(f"{source}: Telegram account export without chats (export with 'Personal chats' ticked)")
    elif isinstance(obj.get("messages"), list):
        found = [obj]
    else:
        raise UserError(f"{source}: not a Telegram export (no 'messages' list and no 'chats')")

    if chats:
        wanted = {str(c) for c in chats}
        picked = [c for c in found if _chat_name(c) in wanted or str(c.get("id")) in wanted]
        missing = wanted - {_chat_name(c) for c in picked} - {str(c.get("id")) for c in picked}
        if missing:
            names = ", ".join(repr(_chat_name(c)) for c in found[:15])
            raise UserError(
                f"{source}: no chat named {', '.join(map(repr, sorted(missing)))}; "
                f"chats here: {names}{' ...' if len(found) > 15 else ''}"
            )
        keep = {id(c) for c in picked}
        for c in found:
            if id(c) not in keep:
                n = len(_list(c.get("messages")))
                report.read += n
                report.dropped["chat_not_selected"] += n
        found = picked

    per_chat = report.notes.setdefault("chats", {})
    ids = report.notes.setdefault("chat_ids", {})  # so `convsim import --chat ID` can pick a chat by its id
    out = []
    for chat in found:
        msgs = _chat(chat, report)
        name = _chat_name(chat)
        if chat.get("id") is not None:
            ids[name] = short(str(chat.get("id")), 40)
        per_chat[name] = per_chat.get(name, 0) + len(msgs)
        if msgs:
            out.append(Conversation(id="", messages=msgs, source=f"telegram:{source}#{name}"))
    return out


def _chat(chat: dict, report) -> list[Message]:
    dropped = report.dropped
    out = []
    for m in _list(chat.get("messages")):
        report.read += 1
        if not isinstance(m, dict):
            dropped["malformed"] += 1
            continue
        if m.get("type", "message") != "message":
            dropped["system"] += 1
            continue
        text = _text(m.get("text")).strip()
        if not text:
            dropped["media" if any(k in m for k in _MEDIA_KEYS) else "empty"] += 1
            continue
        sender = m.get("from")
        if sender is None:
            sender = "Deleted Account" if "from" in m else str(m.get("from_id") or "")
        if not isinstance(sender, str) or not sender.strip():
            dropped["no_sender"] += 1
            continue
        out.append(Message(sender, text, _time(m.get("date"))))
    return out


def _chat_name(chat: dict) -> str:
    name = chat.get("name")
    if isinstance(name, str) and name:
        return name
    kind = chat.get("type")
    return "Saved Messages" if kind == "saved_messages" else f"chat {short(chat.get('id', '?'), 24)}"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for p in value:
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict) and isinstance(p.get("text"), str):
                parts.append(p["text"])
        return "".join(parts)
    return ""


def _time(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).isoformat()
    except ValueError:
        return None


def _list(value: Any) -> list:
    if isinstance(value, dict):
        value = value.get("list")
    return value if isinstance(value, list) else []
