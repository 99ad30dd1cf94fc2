"""Saved conversations: a SQLite database (default RUN_DIR/conversations.sqlite, owner-only) with each
session's messages, model and adapter, sampling settings and steering; `convsim history` lists and
exports them.

    convsim history runs/me                     # list sessions
    convsim history runs/me --export jsonl > all.jsonl
"""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from convsim.errors import UserError

HELP = "List and export conversations saved by chat/converse --save."
EXAMPLES = """
  convsim history runs/me
  convsim history runs/me --export txt
  convsim history runs/me --export jsonl --db other.sqlite
"""
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (id INTEGER PRIMARY KEY, started TEXT, kind TEXT, model TEXT, adapter TEXT,
                                     sampling TEXT, steering TEXT);
CREATE TABLE IF NOT EXISTS messages (session INTEGER REFERENCES sessions(id), idx INTEGER, speaker TEXT, text TEXT,
                                     time TEXT, generated INTEGER, PRIMARY KEY (session, idx));
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


SQLITE_MAGIC = b"SQLite format 3\0"


def _check_is_db(p: Path) -> None:
    """A `UserError` unless `p` is an SQLite database (or an empty file sqlite may initialise)."""
    if not p.is_file():
        raise UserError(f"{p} is not a regular file")
    with open(p, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if head and head != SQLITE_MAGIC:
        raise UserError(f"{p} is not a convsim conversation database (not SQLite)")


def connect(path: str | os.PathLike) -> sqlite3.Connection:
    """Open (creating owner-only, with owner-only new parent directories) the conversation database.
    WAL journal: a process killed mid-transaction leaves the database as it was before it."""
    from convsim.fsutil import make_parents

    p = Path(path)
    make_parents(p)
    if not p.exists():  # create owner-only before sqlite writes anything
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o600))
    _check_is_db(p)
    os.chmod(p, 0o600)
    try:
        db = sqlite3.connect(p, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")  # a kill mid-write never corrupts the database
        db.executescript(SCHEMA)
    except sqlite3.DatabaseError as e:
        raise UserError(f"{p}: cannot use this conversation database ({e})") from None
    for side in ("-wal", "-shm"):  # sqlite copies the database's mode; make sure
        q = p.with_name(p.name + side)
        if q.exists():
            os.chmod(q, 0o600)
    return db


def open_readonly(path: str | os.PathLike) -> sqlite3.Connection:
    """Open an existing conversation database without changing it; a `UserError` if it is not one."""
    p = Path(path)
    _check_is_db(p)
    try:
        db = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise UserError(f"{p}: not a readable conversation database ({e})") from None
    if not {"sessions", "messages"} <= tables:
        db.close()
        raise UserError(f"{p}: an SQLite database without convsim's sessions and messages tables")
    return db


def save_session(
    path,
    kind: str,
    messages,
    model: str,
    adapter: str,
    sampling: dict,
    steering: str | None,
    generated: set[int] = frozenset(),
) -> int:
    """Write one conversation in a single transaction; returns its session id."""
    db = connect(path)
    try:
        with db:  # one transaction: a kill leaves the session wholly saved or not at all
            cur = db.execute(
                "INSERT INTO sessions (started, kind, model, adapter, sampling, steering) VALUES (?,?,?,?,?,?)",
                (now(), kind, model, adapter, json.dumps(sampling), steering),
            )
            sid = cur.lastrowid
            db.executemany(
                "INSERT INTO messages VALUES (?,?,?,?,?,?)",
                [(sid, i, m.speaker, m.text, m.time or now(), int(i in generated)) for i, m in enumerate(messages)],
            )
        return sid
    except sqlite3.DatabaseError as e:
        raise UserError(f"{path}: cannot save the conversation ({e})") from None
    finally:
        db.close()


def add_arguments(p):
    p.add_argument("run_dir")
    p.add_argument("--db", help="database path (default RUN_DIR/conversations.sqlite)")
    p.add_argument("--export", choices=["jsonl", "txt"], help="print every saved conversation in this format")


def run(args):
    path = Path(args.db) if args.db else Path(args.run_dir) / "conversations.sqlite"
    if not path.exists():
        raise UserError(f"no saved conversations at {path} (use --save in chat or converse)")
    db = open_readonly(path)
    try:
        _list(db, args)
    except (sqlite3.DatabaseError, ValueError) as e:
        raise UserError(f"{path}: damaged conversation database ({e})") from None
    finally:
        db.close()
    return 0


def _list(db, args) -> None:
    sessions = db.execute(
        "SELECT id, started, kind, model, adapter, sampling, steering FROM sessions ORDER BY id"
    ).fetchall()
    for sid, started, kind, model, adapter, sampling, steer in sessions:
        msgs = db.execute(
            "SELECT speaker, text, time, generated FROM messages WHERE session=? ORDER BY idx", (sid,)
        ).fetchall()
        if args.export == "jsonl":
            print(
                json.dumps(
                    {
                        "id": f"session-{sid}",
                        "source": f"convsim {kind}",
                        "started": started,
                        "model": model,
                        "adapter": adapter,
                        "sampling": json.loads(sampling or "{}"),
                        "steering": steer,
                        "messages": [
                            {"speaker": s, "text": t, "time": tm, "generated": bool(g)} for s, t, tm, g in msgs
                        ],
                    },
                    ensure_ascii=False,
                )
            )
        elif args.export == "txt":
            print(f"# session {sid} ({kind}, {started})")
            for s, t, _, _ in msgs:
                print(f"[{s}] {t}")
            print()
        else:
            print(f"{sid:>4}  {started}  {kind:<8} {len(msgs):>4} messages  steer={steer or '-'}")
