"""Facebook Messenger "Download your information" JSON (`messages/inbox/<chat>/message_1.json`, ...) →
one Conversation per file; `convsim import` joins the files of one chat (see `merge_split`).

    from convsim.data.importers import Report, messenger
    convs = messenger.parse(Path("message_1.json"), "inbox/ben_123/message_1.json", Report())

A file is `{"participants": [{"name"}], "messages": [{"sender_name", "timestamp_ms", "content",
"photos", "share", "reactions", ...}], "title", "thread_path"}`, messages newest first; a long chat is
split across message_1.json, message_2.json, ... (message_1 the newest). Facebook writes the text as
mojibake: each UTF-8 byte escaped as the code point of the same value ("Ã©" for "é", four such
characters for one emoji); `fix_mojibake` turns it back. Chats that were end-to-end encrypted come in a
separate export (Messenger's "secure storage"), one file per chat with camelCase keys
(`threadName`, `senderName`, `timestamp`, `text`, `isUnsent`); those files are read too. Instagram's export has the same shape (see
instagram.py). Dropped and counted: group events, calls and "You are now connected" notices ("system"),
photos/videos/stickers/files/links without text and "X sent a photo." notices ("media"), unsent
messages ("deleted"), reactions written as messages ("Liked a message", "Reacted ❤ to your message":
"reaction"). Reactions attached to a message are not messages and are ignored. Times are UTC.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from convsim.data.importers._text import as_text, load_json, short, utc_iso
from convsim.data.schema import Conversation, Message
from convsim.errors import UserError

APP = "messenger"
_MEDIA_KEYS = ("photos", "videos", "gifs", "audio_files", "files", "sticker", "share", "attachments")
_SYSTEM_TYPES = {"Call", "Subscribe", "Unsubscribe", "Payment", "Plan", "Poll", "Meeting"}
# Notices are whole messages ending in a full stop ("Ana left the group."); a sentence that merely
# mentions a group does not match.
_SYSTEM = re.compile(
    r"(?:[^\n]{1,120}? (?:named the group [^\n]{1,200}|changed the group photo|created the group(?: [^\n]{1,200})?"
    r"|added [^\n]{1,120} to the group|removed [^\n]{1,120} from the group|left the group"
    r"|set the nickname for [^\n]{1,120} to [^\n]{1,120}|set (?:his|her|their|your) (?:own )?nickname to [^\n]{1,120}"
    r"|cleared (?:the|your|his|her|their) nickname(?: for [^\n]{1,120})?|changed the (?:chat )?theme(?: to [^\n]{1,80})?"
    r"|set the (?:quick reaction|emoji) to [^\n]{1,20}|changed the emoji to [^\n]{1,20}|(?:un)?pinned a message"
    r"|joined the (?:video|voice) (?:chat|call)|started (?:a|sharing) (?:video|call|voice call|screen)|missed your (?:video )?call"
    r"|called you|started a (?:video )?call|is now an admin|changed the group name to [^\n]{1,200})"
    r"|You are now connected on Messenger|Say hi to your new Facebook friend(?:, [^\n]{1,120})?"
    r"|You missed a (?:video )?call from [^\n]{1,120}|The (?:video|voice) chat ended|The call ended|You called [^\n]{1,120})"
    r"\.?\Z"
)
_MEDIA_NOTICE = re.compile(
    r".{1,120}? sent (?:an? )?(?:attachment|photo|photos|video|videos|GIF|sticker|link"
    r"|voice message|audio clip|file|location|\d+ photos)\.?\Z|.{1,120}? shared a (?:story|post|reel)\.?\Z",
    re.S,
)
_REACTION = re.compile(
    r"(?:.{1,120}? )?(?:[Rr]eacted .{1,20} to (?:your|a|their) message|[Ll]iked a message)\s*\Z", re.S
)
_UNSENT = re.compile(r".{1,120}? unsent a message\.?\Z", re.S)
_HINT = re.compile(
    r"group|nickname|theme|emoji|pinned|call|chat ended|Messenger|friend|admin|video|voice|screen"
    r"| sent | shared a |eacted |iked a message|unsent"
).search


def _notice(text: str) -> str | None:
    """The drop reason of an app-written notice, or None for a message someone typed."""
    if _SYSTEM.match(text):
        return "system"
    if _REACTION.match(text):
        return "reaction"
    if _UNSENT.match(text):
        return "deleted"
    if _MEDIA_NOTICE.match(text):
        return "media"
    return None


def fix_mojibake(s: str) -> str:
    """Facebook's escaped UTF-8 back to text: "Ã©" → "é"; text that is not such mojibake comes back as is."""
    if s.isascii():
        return s
    try:
        return s.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return s


def looks_like(obj: Any) -> bool:
    """A Messenger/Instagram message file: `participants` and `messages` with `sender_name`/`timestamp_ms`
    (or, in the end-to-end encrypted chats' export, `senderName`/`timestamp`)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        return False
    if not isinstance(obj.get("participants"), list):
        return False
    first = next((m for m in obj["messages"][:20] if isinstance(m, dict)), None)
    if first is None:
        return "title" in obj or "thread_path" in obj or "threadName" in obj
    return "sender_name" in first or "timestamp_ms" in first or ("senderName" in first and "timestamp" in first)


def _is_e2ee(obj: dict) -> bool:
    return "threadName" in obj or any(isinstance(m, dict) and "senderName" in m for m in obj["messages"][:20])


def parse(data: bytes | str | Path, source: str, report, **options) -> list[Conversation]:
    return parse_obj(load_json(as_text(data, source, report.notes), source), source, report, **options)


def parse_obj(obj: Any, source: str, report, app: str = APP, **_options) -> list[Conversation]:
    if not looks_like(obj):
        raise UserError(
            f"{source}: not a {_label(app)} export file (expected 'participants' and 'messages' "
            "with 'sender_name' and 'timestamp_ms', as in messages/inbox/<chat>/message_1.json)"
        )
    if _is_e2ee(obj):
        return _parse_e2ee(obj, source, report, app)
    dropped = report.dropped
    out: list[Message] = []
    read = 0
    fix = fix_mojibake
    utc = timezone.utc
    stamp = datetime.fromtimestamp
    senders: dict = {}  # a chat has few senders: repair each name once
    for m in reversed(obj["messages"]):  # the file lists the newest first
        read += 1
        if not isinstance(m, dict):
            dropped["malformed"] += 1
            continue
        if m.get("is_unsent") is True:
            dropped["deleted"] += 1
            continue
        kind = m.get("type")
        if (isinstance(kind, str) and kind in _SYSTEM_TYPES) or "call_duration" in m:
            dropped["system"] += 1
            continue
        content = m.get("content")
        text = fix(content).strip() if isinstance(content, str) else ""
        if text:
            if len(text) < 400 and _HINT(text) is not None:  # the notices' words; most messages have none
                kind = _notice(text)
                if kind is not None:
                    dropped[kind] += 1
                    continue
        else:
            dropped["media" if any(m.get(k) for k in _MEDIA_KEYS) else "empty"] += 1
            continue
        sender = m.get("sender_name")
        name = senders.get(sender) if type(sender) is str else None
        if name is None:
            if not isinstance(sender, str) or not sender.strip():
                dropped["no_sender"] += 1
                continue
            name = senders[sender] = fix(sender)
        ms = m.get("timestamp_ms")
        when = None
        if type(ms) is int and 0 <= ms < 10**14:
            secs, milli = divmod(ms, 1000)
            when = utc_iso(secs, milli * 1000)
        elif isinstance(ms, float) and 0 <= ms < 10**14:
            when = stamp(ms / 1000, utc).isoformat()
        out.append(Message(name, text, when))
    report.read += read
    chat = chat_name(obj)
    report.notes.setdefault("chats", {})
    report.notes["chats"][chat] = report.notes["chats"].get(chat, 0) + len(out)
    return [Conversation(id="", messages=out, source=f"{app}:{thread_key(obj, source)}#{chat}")] if out else []


def _parse_e2ee(obj: dict, source: str, report, app: str) -> list[Conversation]:
    """Messenger's export of end-to-end encrypted chats ("Download secure storage data"): one file per
    chat, `{"participants": ["Ana", "Ben"], "threadName", "messages": [{"senderName", "timestamp" (ms),
    "text", "type": "text|media|link|placeholder", "media", "reactions", "isUnsent"}]}`, proper UTF-8."""
    dropped = report.dropped
    rows: list[tuple[int, Message]] = []
    for m in obj["messages"]:
        report.read += 1
        if not isinstance(m, dict):
            dropped["malformed"] += 1
            continue
        if m.get("isUnsent") is True:
            dropped["deleted"] += 1
            continue
        if m.get("type") == "placeholder":
            dropped["system"] += 1
            continue
        text = m.get("text")
        text = fix_mojibake(text).strip() if isinstance(text, str) else ""
        if not text:
            dropped["media" if m.get("media") else "empty"] += 1
            continue
        if len(text) < 400 and _HINT(text) is not None:
            kind = _notice(text)
            if kind is not None:
                dropped[kind] += 1
                continue
        sender = m.get("senderName")
        if not isinstance(sender, str) or not sender.strip():
            dropped["no_sender"] += 1
            continue
        ms = m.get("timestamp")
        ok = type(ms) is int and 0 <= ms < 10**14
        when = utc_iso(ms // 1000, ms % 1000 * 1000) if ok else None
        rows.append((ms if ok else 1 << 62, Message(fix_mojibake(sender), text, when)))
    rows.sort(key=lambda r: r[0])  # the order of the file is not promised; the times are
    out = [msg for _, msg in rows]
    title = obj.get("threadName")
    chat = fix_mojibake(title.strip()) if isinstance(title, str) and title.strip() else chat_name(obj)
    report.notes.setdefault("chats", {})
    report.notes["chats"][chat] = report.notes["chats"].get(chat, 0) + len(out)
    report.notes["export"] = "end-to-end encrypted chats"
    # one file is one whole chat here: the file, not its folder, keeps chats of the same name apart
    return [Conversation(id="", messages=out, source=f"{app}:{source.replace('#', '_')}#{chat}")] if out else []


def chat_name(obj: dict) -> str:
    title = obj.get("title")
    if isinstance(title, str) and title.strip():
        return fix_mojibake(title.strip())
    names = [
        fix_mojibake(p["name"] if isinstance(p, dict) else p)
        for p in obj.get("participants", [])
        if isinstance(p, str) or (isinstance(p, dict) and isinstance(p.get("name"), str))
    ]
    return ", ".join(names) or "chat"


def thread_key(obj: dict, source: str) -> str:
    """What the files of one chat share: the export's `thread_path` or else the folder they lie in."""
    folder = source.rsplit("/", 1)[0] if "/" in source else ""
    path = obj.get("thread_path")
    if isinstance(path, str) and path.strip() and not folder:
        return short(path.replace("#", "_"), 200)
    return (folder or "chat").replace("#", "_")


def _label(app: str) -> str:
    return "Instagram" if app == "instagram" else "Facebook Messenger"
