"""Writes the iMessage fixtures in tests/data/exports/imessage/ with the tables and columns of a Mac's
`~/Library/Messages/chat.db` (macOS Ventura/Sonoma names; the old database has fewer columns, as before
High Sierra). People, numbers and text are invented.

    python tests/data/make/imessage.py

  old_mac_seconds.db     dates in seconds since 2001-01-01, text in `text`, no attributedBody column
  ventura_with_wal.zip   chat.db + chat.db-wal + chat.db-shm as copied from a running Mac: dates in
                         nanoseconds, most text only in attributedBody (typedstream), tapbacks, a named
                         group chat, a rename event, an attachment without text, an unsent message; the
                         last rows were committed to the WAL and never checkpointed into chat.db
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "exports" / "imessage"
EPOCH = 978307200

SCHEMA_NEW = """
CREATE TABLE handle (ROWID INTEGER PRIMARY KEY AUTOINCREMENT UNIQUE, id TEXT NOT NULL, country TEXT,
  service TEXT NOT NULL, uncanonicalized_id TEXT, person_centric_id TEXT, UNIQUE (id, service));
CREATE TABLE chat (ROWID INTEGER PRIMARY KEY AUTOINCREMENT, guid TEXT UNIQUE NOT NULL, style INTEGER,
  state INTEGER, account_id TEXT, properties BLOB, chat_identifier TEXT, service_name TEXT, room_name TEXT,
  account_login TEXT, is_archived INTEGER DEFAULT 0, last_addressed_handle TEXT, display_name TEXT,
  group_id TEXT, is_filtered INTEGER DEFAULT 0, successful_query INTEGER);
CREATE TABLE message (ROWID INTEGER PRIMARY KEY AUTOINCREMENT, guid TEXT UNIQUE NOT NULL, text TEXT,
  replace INTEGER DEFAULT 0, service_center TEXT, handle_id INTEGER DEFAULT 0, subject TEXT, country TEXT,
  attributedBody BLOB, version INTEGER DEFAULT 0, type INTEGER DEFAULT 0, service TEXT, account TEXT,
  account_guid TEXT, error INTEGER DEFAULT 0, date INTEGER, date_read INTEGER, date_delivered INTEGER,
  is_delivered INTEGER DEFAULT 0, is_finished INTEGER DEFAULT 0, is_emote INTEGER DEFAULT 0,
  is_from_me INTEGER DEFAULT 0, is_empty INTEGER DEFAULT 0, is_read INTEGER DEFAULT 0,
  is_system_message INTEGER DEFAULT 0, is_sent INTEGER DEFAULT 0, cache_has_attachments INTEGER DEFAULT 0,
  item_type INTEGER DEFAULT 0, other_handle INTEGER DEFAULT 0, group_title TEXT,
  group_action_type INTEGER DEFAULT 0, associated_message_guid TEXT, associated_message_type INTEGER DEFAULT 0,
  balloon_bundle_id TEXT, payload_data BLOB, expressive_send_style_id TEXT, reply_to_guid TEXT,
  thread_originator_guid TEXT, date_retracted INTEGER DEFAULT 0, date_edited INTEGER DEFAULT 0,
  part_count INTEGER DEFAULT 0);
CREATE TABLE chat_message_join (chat_id INTEGER REFERENCES chat (ROWID) ON DELETE CASCADE,
  message_id INTEGER REFERENCES message (ROWID) ON DELETE CASCADE, message_date INTEGER DEFAULT 0,
  PRIMARY KEY (chat_id, message_id));
CREATE TABLE chat_handle_join (chat_id INTEGER REFERENCES chat (ROWID) ON DELETE CASCADE,
  handle_id INTEGER REFERENCES handle (ROWID) ON DELETE CASCADE, UNIQUE(chat_id, handle_id));
CREATE TABLE attachment (ROWID INTEGER PRIMARY KEY AUTOINCREMENT, guid TEXT UNIQUE NOT NULL, filename TEXT,
  mime_type TEXT, transfer_name TEXT, total_bytes INTEGER DEFAULT 0);
CREATE TABLE message_attachment_join (message_id INTEGER REFERENCES message (ROWID) ON DELETE CASCADE,
  attachment_id INTEGER REFERENCES attachment (ROWID) ON DELETE CASCADE, UNIQUE(message_id, attachment_id));
CREATE INDEX chat_message_join_idx_message_date_id_chat_id ON chat_message_join(chat_id, message_date, message_id);
CREATE INDEX message_idx_handle ON message(handle_id, date);
"""

SCHEMA_OLD = """
CREATE TABLE handle (ROWID INTEGER PRIMARY KEY AUTOINCREMENT UNIQUE, id TEXT NOT NULL, country TEXT,
  service TEXT NOT NULL, uncanonicalized_id TEXT, UNIQUE (id, service));
CREATE TABLE chat (ROWID INTEGER PRIMARY KEY AUTOINCREMENT, guid TEXT UNIQUE NOT NULL, style INTEGER,
  state INTEGER, chat_identifier TEXT, service_name TEXT, room_name TEXT, display_name TEXT);
CREATE TABLE message (ROWID INTEGER PRIMARY KEY AUTOINCREMENT, guid TEXT UNIQUE NOT NULL, text TEXT,
  handle_id INTEGER DEFAULT 0, service TEXT, date INTEGER, is_from_me INTEGER DEFAULT 0,
  cache_has_attachments INTEGER DEFAULT 0);
CREATE TABLE chat_message_join (chat_id INTEGER, message_id INTEGER, PRIMARY KEY (chat_id, message_id));
CREATE TABLE chat_handle_join (chat_id INTEGER, handle_id INTEGER, UNIQUE(chat_id, handle_id));
"""


def typedstream(text: str) -> bytes:
    """An NSAttributedString archive laid out as Messages writes it: header, class chain, the string
    (length as one byte, or 0x81 + two bytes little-endian), then the attribute run dictionary."""
    raw = text.encode("utf-8")
    n = len(raw)
    length = bytes([n]) if n < 0x80 else b"\x81" + n.to_bytes(2, "little")
    head = (b"\x04\x0bstreamtyped\x81\xe8\x03\x84\x01@\x84\x84\x84\x12NSAttributedString\x00\x84\x84\x08NSObject"
            b"\x00\x85\x92\x84\x84\x84\x08NSString\x01\x94\x84\x01+")
    chars = len(text.encode("utf-16-le")) // 2
    tail = (b"\x86\x84\x02iI\x01" + bytes([min(chars, 0x7f)]) + b"\x92\x84\x84\x84\x0cNSDictionary\x00\x94\x84\x01i"
            b"\x01\x92\x84\x96\x96\x1d__kIMMessagePartAttributeName\x86\x92\x84\x84\x84\x08NSNumber\x00\x84\x84"
            b"\x07NSValue\x00\x94\x84\x01*\x84\x99\x99\x00\x86\x86\x86")
    return head + length + raw + tail


def apple(when: str, ns: bool) -> int:
    t = datetime.fromisoformat(when).replace(tzinfo=timezone.utc).timestamp() - EPOCH
    return int(t * 1_000_000_000) if ns else int(t)


def old_db(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("PRAGMA page_size = 1024")
    con.executescript(SCHEMA_OLD)
    con.execute("INSERT INTO handle VALUES (1, '+15555550142', 'us', 'SMS', '(555) 555-0142')")
    con.execute("INSERT INTO handle VALUES (2, 'dani.ortiz@example.com', 'us', 'iMessage', NULL)")
    con.execute("INSERT INTO chat VALUES (1, 'SMS;-;+15555550142', 45, 3, '+15555550142', 'SMS', NULL, '')")
    con.execute("INSERT INTO chat VALUES (2, 'iMessage;-;dani.ortiz@example.com', 45, 3, 'dani.ortiz@example.com', "
                "'iMessage', NULL, NULL)")
    con.executemany("INSERT INTO chat_handle_join VALUES (?, ?)", [(1, 1), (2, 2)])
    rows = [  # (chat, handle, from_me, when, text, attachments)
        (1, 1, 0, "2016-05-01T09:00:00", "are you up?", 0),
        (1, 1, 1, "2016-05-01T09:01:00", "yes, coffee in 10", 0),
        (1, 1, 0, "2016-05-01T09:01:30", "\ufffc", 1),
        (1, 1, 0, "2016-05-01T09:02:00", "ok! call me at 555-555-0199 when you're here", 0),
        (2, 2, 0, "2016-06-10T20:00:00", "did you finish the book?", 0),
        (2, 2, 1, "2016-06-10T20:05:00", "almost\nthe last chapter is wild", 0),
        (2, 2, 1, "2016-06-10T20:05:30", "", 0),
    ]
    for i, (chat, handle, me, when, text, att) in enumerate(rows, 1):
        con.execute("INSERT INTO message VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (i, f"OLD-{i}", text, handle, "SMS" if chat == 1 else "iMessage", apple(when, False), me, att))
        con.execute("INSERT INTO chat_message_join VALUES (?, ?)", (chat, i))
    con.commit()
    con.execute("VACUUM")
    con.close()


def new_db(folder: Path) -> None:
    path = folder / "chat.db"
    con = sqlite3.connect(path)
    con.execute("PRAGMA page_size = 1024")
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA wal_autocheckpoint = 0")  # macOS checkpoints now and then; a copy often has a full WAL
    con.executescript(SCHEMA_NEW)
    handles = [(1, "+447700900456", "gb", "iMessage"), (2, "+447700900789", "gb", "iMessage"),
               (3, "kai.lindqvist@example.com", "se", "iMessage")]
    con.executemany("INSERT INTO handle (ROWID, id, country, service) VALUES (?, ?, ?, ?)", handles)
    con.execute("INSERT INTO chat (ROWID, guid, style, chat_identifier, service_name, display_name) VALUES "
                "(1, 'iMessage;-;+447700900456', 45, '+447700900456', 'iMessage', '')")
    con.execute("INSERT INTO chat (ROWID, guid, style, chat_identifier, service_name, display_name) VALUES "
                "(2, 'iMessage;+;chat804412', 43, 'chat804412', 'iMessage', 'Climbing 🧗')")
    con.executemany("INSERT INTO chat_handle_join VALUES (?, ?)", [(1, 1), (2, 1), (2, 2), (2, 3)])
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the schema and handles are in chat.db itself

    def add(rowid, chat, handle, me, when, text=None, body=None, assoc=0, item=0, attach=0, retracted=0):
        con.execute("INSERT INTO message (ROWID, guid, text, handle_id, attributedBody, service, date, is_from_me, "
                    "associated_message_type, associated_message_guid, item_type, cache_has_attachments, "
                    "date_retracted) VALUES (?, ?, ?, ?, ?, 'iMessage', ?, ?, ?, ?, ?, ?, ?)",
                    (rowid, f"NEW-{rowid}", text, handle, None if body is None else typedstream(body),
                     apple(when, True), me, assoc, f"p:0/NEW-{rowid - 1}" if assoc else None, item, attach,
                     apple(when, True) if retracted else 0))
        con.execute("INSERT INTO chat_message_join VALUES (?, ?, ?)", (chat, rowid, apple(when, True)))

    long_text = "here is the plan for saturday: " + "meet at the wall at nine, bring chalk and water. " * 4
    add(1, 1, 1, 0, "2024-03-02T18:00:00", text="hey! climbing tomorrow?")           # text column, as before
    add(2, 1, 1, 1, "2024-03-02T18:01:00", body="yes!! 🧗‍♀️ where?")                    # Ventura: only attributedBody
    add(3, 1, 1, 0, "2024-03-02T18:01:30", body="Loved “yes!! 🧗‍♀️ where?”", assoc=2000)  # tapback
    add(4, 1, 1, 0, "2024-03-02T18:02:00", body=long_text)                            # length over 127: 0x81 form
    add(5, 1, 1, 1, "2024-03-02T18:03:00", text="\ufffc", attach=1)                   # a photo, no text
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # rows 1-5 are in chat.db; what follows stays in the WAL
    add(6, 2, 2, 0, "2024-03-03T09:00:00", item=2, body=None)                          # renamed the group
    add(7, 2, 2, 0, "2024-03-03T09:01:00", body="who has the rope?")
    add(8, 2, 3, 0, "2024-03-03T09:02:00", body="me, and my mail is kai.lindqvist@example.com")
    add(9, 2, 0, 1, "2024-03-03T09:03:00", body="great, see you both at 9")
    add(10, 2, 3, 0, "2024-03-03T09:03:30", body="Emphasized “great, see you both at 9”", assoc=2004)
    add(11, 2, 3, 0, "2024-03-03T09:04:00", assoc=3000)                                 # tapback removed
    add(12, 1, 1, 1, "2024-03-03T10:00:00", retracted=1)                                # unsent
    add(13, 1, 1, 0, "2024-03-03T10:05:00", body="ok last one: bring snacks")
    con.commit()
    # copy while the connection is open: that is what a user copying ~/Library/Messages gets
    for suffix in ("", "-wal", "-shm"):
        shutil.copyfile(str(path) + suffix, folder / ("copy" + suffix))
    con.close()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    old = OUT / "old_mac_seconds.db"
    old.unlink(missing_ok=True)
    old_db(old)
    with tempfile.TemporaryDirectory() as tmp:
        new_db(Path(tmp))
        zpath = OUT / "ventura_with_wal.zip"
        with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
            for suffix in ("", "-wal", "-shm"):
                z.write(Path(tmp) / ("copy" + suffix), "Messages/chat.db" + suffix)
    for p in sorted(OUT.iterdir()):
        print(p.name, os.path.getsize(p))


if __name__ == "__main__":
    main()
