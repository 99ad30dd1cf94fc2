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
import sys
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


def connect(path: str | os.PathLike) -> sqlite3.Connection:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    new = not p.exists()
    if new:  # create owner-only before sqlite writes anything
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o600))
    os.chmod(p, 0o600)
    db = sqlite3.connect(p, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")   # a kill mid-write never corrupts the database
    db.executescript(SCHEMA)
    return db


def save_session(path, kind: str, messages, model: str, adapter: str, sampling: dict, steering: str | None,
                 generated: set[int] = frozenset()) -> int:
    """Write one conversation in a single transaction; returns its session id."""
    db = connect(path)
    try:
        with db:
            cur = db.execute("INSERT INTO sessions (started, kind, model, adapter, sampling, steering) VALUES (?,?,?,?,?,?)",
                             (now(), kind, model, adapter, json.dumps(sampling), steering))
            sid = cur.lastrowid
            db.executemany("INSERT INTO messages VALUES (?,?,?,?,?,?)",
                           [(sid, i, m.speaker, m.text, m.time or now(), int(i in generated))
                            for i, m in enumerate(messages)])
        return sid
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
    db = connect(path)
    sessions = db.execute("SELECT id, started, kind, model, adapter, sampling, steering FROM sessions ORDER BY id").fetchall()
    for sid, started, kind, model, adapter, sampling, steer in sessions:
        msgs = db.execute("SELECT speaker, text, time, generated FROM messages WHERE session=? ORDER BY idx",
                          (sid,)).fetchall()
        if args.export == "jsonl":
            print(json.dumps({"id": f"session-{sid}", "source": f"convsim {kind}", "started": started, "model": model,
                              "adapter": adapter, "sampling": json.loads(sampling or "{}"), "steering": steer,
                              "messages": [{"speaker": s, "text": t, "time": tm, "generated": bool(g)}
                                           for s, t, tm, g in msgs]}, ensure_ascii=False))
        elif args.export == "txt":
            print(f"# session {sid} ({kind}, {started})")
            for s, t, _, _ in msgs:
                print(f"[{s}] {t}")
            print()
        else:
            print(f"{sid:>4}  {started}  {kind:<8} {len(msgs):>4} messages  steer={steer or '-'}")
    db.close()
    return 0
