"""iMessage and SMS from a Mac's Messages database (`~/Library/Messages/chat.db`, SQLite) → one
Conversation per chat.

    from convsim.data.importers import Report, imessage
    convs = imessage.parse(Path("chat.db").read_bytes(), "chat.db", Report(), wal=wal_bytes, me="Riya")

Tables read: `message` (text, attributedBody, handle_id, date, is_from_me, associated_message_type,
item_type, cache_has_attachments, date_retracted), `handle` (a person's phone number or e-mail),
`chat` (display_name, chat_identifier), `chat_message_join`, `chat_handle_join`. Columns an older
database lacks are treated as empty. Dates count from 2001-01-01 UTC, in seconds in old databases and
nanoseconds since macOS High Sierra. Since macOS Ventura many rows have `text` NULL and the text only
in `attributedBody`, an NSAttributedString in Apple's "typedstream" archive format: `typedstream_text`
reads its string. `is_from_me` rows are the owner, named `me` (the CLI's --me NAME; default "Me");
everyone else is their handle (a number or address: scrubbing turns it into <PHONE_n>, so name people
with --speaker "+15551234567=Ana"). Dropped and counted: tapbacks and other reactions
(associated_message_type 1000-3999: "reaction"), group events such as renames and joins (item_type other
than 0: "system"), attachments without text ("media"), unsent messages ("deleted").

The database is never opened where the user keeps it: the bytes (and the `-wal` file's, which holds the
newest messages until macOS checkpoints it) are written to a private temporary directory, opened there
so SQLite replays the WAL, and deleted afterwards.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from convsim.data.importers._text import as_bytes, utc_iso
from convsim.data.schema import Conversation, Message
from convsim.errors import UserError


class NotMessagesDatabase(UserError):
    """An SQLite file that is not a Messages database (a folder like ~/Library/Messages holds others too)."""


APPLE_EPOCH = 978307200  # 2001-01-01T00:00:00Z as a Unix time
OWNER = "Me"
_OPTIONAL = ("attributedBody", "associated_message_type", "item_type", "cache_has_attachments", "date_retracted")
_OBJ = "\ufffc"  # where an attachment sits in the text


def typedstream_text(blob: bytes) -> str | None:
    """The string inside an `attributedBody` blob, or None when there is none or it is unreadable.

    The archive starts `\\x04\\x0bstreamtyped`, then the class chain NSAttributedString → NSObject and the
    first NSString (or NSMutableString), whose value follows as `\\x84\\x01+` (a one-character type string,
    '+') and a length: one byte below 0x80, or 0x81 and two bytes, or 0x82 and four bytes, little-endian.
    """
    if not isinstance(blob, (bytes, bytearray)) or b"streamtyped" not in blob[:16]:
        return None
    at = blob.find(b"NSString")
    mutable = blob.find(b"NSMutableString")
    if at < 0 or (0 <= mutable < at):
        at = mutable
    if at < 0:
        return None
    i = blob.find(b"\x84\x01+", at, at + 40)
    if i < 0:
        return None
    i += 3
    if i >= len(blob):
        return None
    tag = blob[i]
    if tag == 0x81:
        n, i = int.from_bytes(blob[i + 1 : i + 3], "little"), i + 3
    elif tag == 0x82:
        n, i = int.from_bytes(blob[i + 1 : i + 5], "little"), i + 5
    elif tag < 0x80:
        n, i = tag, i + 1
    else:
        return None
    if i + n > len(blob):
        return None
    try:
        return bytes(blob[i : i + n]).decode("utf-8")
    except UnicodeDecodeError:
        return None


def apple_time(value) -> str | None:
    """An Apple-epoch date (seconds in old databases, nanoseconds in new ones) as ISO 8601 UTC."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        return None
    seconds = value / 1e9 if value > 1e11 else value
    try:
        return datetime.fromtimestamp(seconds + APPLE_EPOCH, timezone.utc).isoformat()
    except (OverflowError, OSError, ValueError):
        return None


def parse(
    data: bytes | str | Path, source: str, report, wal: bytes | None = None, me: str | None = None, **_options
) -> list[Conversation]:
    raw = as_bytes(data)
    if not raw.startswith(b"SQLite format 3\0"):
        raise UserError(f"{source}: not an SQLite database, so not an iMessage chat.db")
    tmp = tempfile.mkdtemp(prefix="convsim-imessage-")  # 0700: only this user can read the copy
    try:
        path = os.path.join(tmp, "chat.db")
        _write_private(path, raw)
        if wal:
            _write_private(path + "-wal", wal)
            report.notes["wal_bytes"] = len(wal)
        con = sqlite3.connect(f"file:{path}", uri=True)
        try:
            return _read(con, source, report, me or OWNER)
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise UserError(f"{source}: unreadable SQLite database ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _read(con: sqlite3.Connection, source: str, report, me: str) -> list[Conversation]:
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    missing = {"message", "handle"} - tables
    if missing:
        raise NotMessagesDatabase(
            f"{source}: an SQLite database without iMessage's {' and '.join(sorted(missing))} "
            "table(s); not a Messages chat.db"
        )
    cols = {r[1] for r in con.execute("PRAGMA table_info(message)")}
    for need in ("text", "handle_id", "date", "is_from_me"):
        if need not in cols:
            raise NotMessagesDatabase(f"{source}: its message table has no '{need}' column; not a Messages chat.db")
    pick = ", ".join(f"m.{c}" if c in cols else "NULL" for c in _OPTIONAL)
    handles = {r[0]: str(r[1]) for r in con.execute("SELECT ROWID, id FROM handle") if r[1] is not None}
    chats = _chats(con, tables, handles)
    joined = "chat_message_join" in tables
    sql = (
        f"SELECT {'j.chat_id' if joined else 'NULL'}, m.text, m.handle_id, m.date, m.is_from_me, {pick} "
        f"FROM message m {'LEFT JOIN chat_message_join j ON j.message_id = m.ROWID' if joined else ''} "
        "ORDER BY 1, m.date, m.ROWID"
    )
    dropped = report.dropped
    per_chat: dict[object, list[Message]] = {}
    read = 0
    typed = 0
    for chat_id, text, handle_id, date, from_me, body, assoc, item, attach, retracted in con.execute(sql):
        read += 1
        if isinstance(assoc, int) and 1000 <= assoc < 4000:
            dropped["reaction"] += 1
            continue
        if isinstance(item, int) and item != 0:
            dropped["system"] += 1
            continue
        if not isinstance(text, str) or not text.strip(_OBJ + " \n"):
            if body is not None:
                decoded = typedstream_text(body)
                if decoded is not None:
                    typed += 1
                    text = decoded
        text = text.replace(_OBJ, "").strip() if isinstance(text, str) else ""
        if not text:
            if isinstance(retracted, int) and retracted > 0:
                dropped["deleted"] += 1
            else:
                dropped["media" if attach else "empty"] += 1
            continue
        if from_me:
            speaker = me
        else:
            speaker = handles.get(handle_id)
            if speaker is None:
                dropped["no_sender"] += 1
                continue
        key = chat_id if chat_id is not None else f"handle {handle_id}"
        msgs = per_chat.get(key)
        if msgs is None:
            msgs = per_chat[key] = []
        if type(date) is int and 0 < date < 2**62:
            when = utc_iso((date // 1_000_000_000 if date > 10**11 else date) + APPLE_EPOCH)  # whole seconds
        else:
            when = apple_time(date)
        msgs.append(Message(speaker, text, when))
    report.read += read
    report.notes["text_from_attributedBody"] = typed
    notes = report.notes.setdefault("chats", {})
    out = []
    for key, msgs in per_chat.items():
        name = chats.get(key) or (key if isinstance(key, str) else f"chat {key}")
        name = name.replace("#", "_")
        notes[name] = notes.get(name, 0) + len(msgs)
        out.append(Conversation(id="", messages=msgs, source=f"imessage:{source.replace('#', '_')}#{name}"))
    return out


def _chats(con: sqlite3.Connection, tables: set, handles: dict) -> dict[int, str]:
    """chat ROWID → a name: its display_name, else its members' handles, else its chat_identifier."""
    members: dict[int, list[str]] = {}
    if "chat_handle_join" in tables:
        for chat_id, handle_id in con.execute(
            "SELECT chat_id, handle_id FROM chat_handle_join ORDER BY chat_id, handle_id"
        ):
            if handle_id in handles:
                members.setdefault(chat_id, []).append(handles[handle_id])
    names: dict[int, str] = {}
    if "chat" in tables:
        cols = {r[1] for r in con.execute("PRAGMA table_info(chat)")}
        disp = "display_name" if "display_name" in cols else "NULL"
        ident = "chat_identifier" if "chat_identifier" in cols else "NULL"
        for rowid, display, identifier in con.execute(f"SELECT ROWID, {disp}, {ident} FROM chat"):
            if isinstance(display, str) and display.strip():
                names[rowid] = display.strip()
            elif members.get(rowid):
                names[rowid] = ", ".join(members[rowid])
            elif isinstance(identifier, str) and identifier:
                names[rowid] = identifier
    return names
