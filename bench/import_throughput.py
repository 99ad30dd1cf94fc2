"""Import throughput: synthetic exports of every chat app through `convsim import`, the CLI's own code path.

    python bench/import_throughput.py                      # 1,000,000 messages per format; writes bench/results/import.json
    python bench/import_throughput.py --messages 100000 --no-save
    python bench/import_throughput.py --formats whatsapp,messenger,imessage

Generates, in a temporary directory, the same synthetic chat (two main speakers and a few others,
multi-line messages, media notices, system events, some e-mails, phone numbers and URLs to scrub,
silences that split sessions) in each app's export format: a WhatsApp Android .txt (24-hour clock,
day-first dates), a Telegram account result.json, a DiscordChatExporter CSV, Messenger and Instagram
inbox folders (message_N.json of 10,000 messages, newest first, mojibake), an iMessage chat.db (SQLite,
nanosecond dates, half the text only in attributedBody, tapbacks), a Slack workspace folder (one JSON
file per channel and day), signal-export data.json files, a Google Chat Takeout messages.json, and a
LINE .txt. Then it times `convsim.cli.main(["import", ...])` on each in this process: reading, parsing,
cleaning, scrubbing, session split and writing conversations.jsonl and import.json. Side by side in
the same run: WhatsApp with --no-scrub, and the floor of just reading, decoding and splitting the
WhatsApp file into lines; each format's time (the best of --repeat imports) is also given as a ratio
to WhatsApp's. The goals: 1M
messages in under 30 s on a 2-core CPU for every format, and none slower than 2x WhatsApp.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import platform
import random
import shutil
import sqlite3
import subprocess
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from convsim.cli import main as convsim_main

GOAL_S = 30.0
WORDS = (
    "ok yes no lol haha sure maybe tomorrow tonight dinner coffee work later what why how "
    "really nice great cool love that idea see you soon home train late sorry thanks"
).split()
SPEAKERS = ["Ana López", "Ben", "Ana López", "Ben", "Ana López", "Ben", "Caro 🌻", "李雷"]


def generate(path: Path, n: int, seed: int = 0) -> None:
    """The WhatsApp export (the reference every other format is compared with)."""
    rng = random.Random(seed)
    t = datetime(2021, 1, 1, 9, 0)
    lines = []
    for i in range(n):
        t += timedelta(seconds=rng.choice((5, 20, 45, 90, 300)) if rng.random() > 0.002 else 4 * 3600)
        head = f"{t.day:02d}/{t.month:02d}/{t.year}, {t.hour:02d}:{t.minute:02d} - "
        r = rng.random()
        if r < 0.005:
            lines.append(head + "Ben added Caro 🌻")
            continue
        who = rng.choice(SPEAKERS)
        if r < 0.025:
            text = "<Media omitted>"
        elif r < 0.03:
            text = f"mail me at user{rng.randrange(500)}@example.com or call +44 7700 {rng.randrange(900000, 999999)}"
        elif r < 0.035:
            text = f"look https://example.org/p/{rng.randrange(10000)}"
        else:
            text = " ".join(rng.choices(WORDS, k=rng.randint(1, 14)))
            if r > 0.97:
                text += "\n" + " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))
        lines.append(f"{head}{who}: {text}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def chat(n: int, seed: int = 0):
    """The synthetic chat as (time, speaker, kind, text) with kind text/media/system, like `generate`."""
    rng = random.Random(seed)
    t = datetime(2021, 1, 1, 9, 0, tzinfo=timezone.utc)
    for _ in range(n):
        t += timedelta(seconds=rng.choice((5, 20, 45, 90, 300)) if rng.random() > 0.002 else 4 * 3600)
        r = rng.random()
        who = rng.choice(SPEAKERS)
        if r < 0.005:
            yield t, who, "system", ""
        elif r < 0.025:
            yield t, who, "media", ""
        elif r < 0.03:
            yield (
                t,
                who,
                "text",
                f"mail me at user{rng.randrange(500)}@example.com or call +44 7700 {rng.randrange(900000, 999999)}",
            )
        elif r < 0.035:
            yield t, who, "text", f"look https://example.org/p/{rng.randrange(10000)}"
        else:
            text = " ".join(rng.choices(WORDS, k=rng.randint(1, 14)))
            if r > 0.97:
                text += "\n" + " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))
            yield t, who, "text", text


def gen_telegram(d: Path, n: int) -> Path:
    msgs = []
    for i, (t, who, kind, text) in enumerate(chat(n)):
        when = t.replace(tzinfo=None).isoformat()
        if kind == "system":
            msgs.append(
                {"id": i, "type": "service", "date": when, "actor": who, "action": "invite_members", "text": ""}
            )
        elif kind == "media":
            msgs.append({"id": i, "type": "message", "date": when, "from": who, "photo": "photos/p.jpg", "text": ""})
        else:
            msgs.append({"id": i, "type": "message", "date": when, "from": who, "from_id": "user1", "text": text})
    path = d / "result.json"
    path.write_text(
        json.dumps(
            {"chats": {"list": [{"name": "Ben", "type": "personal_chat", "id": 1, "messages": msgs}]}},
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    return path


def gen_discord(d: Path, n: int) -> Path:
    path = d / "general.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["AuthorID", "Author", "Date", "Content", "Attachments", "Reactions"])
        for t, who, kind, text in chat(n):
            if kind == "system":
                w.writerow(["1", who, t.isoformat(), "Joined the server.", "", ""])
            else:
                w.writerow(["1", who, t.isoformat(), text, "https://cdn/x.png" if kind == "media" else "", ""])
    return path


def _facebook(d: Path, n: int, top: str) -> Path:
    inbox = d / top / "messages" / "inbox" / "ben_10223"
    inbox.mkdir(parents=True)
    moji = {}
    rows = []
    for t, who, kind, text in chat(n):
        name = moji.get(who) or moji.setdefault(who, who.encode("utf-8").decode("latin-1"))
        m = {"sender_name": name, "timestamp_ms": int(t.timestamp() * 1000), "is_geoblocked_for_viewer": False}
        if kind == "system":
            m["content"] = f"{name} named the group Trip."
        elif kind == "media":
            m["photos"] = [{"uri": "messages/inbox/ben_10223/photos/1.jpg", "creation_timestamp": 1}]
        else:
            m["content"] = text.encode("utf-8").decode("latin-1")
        rows.append(m)
    rows.reverse()  # newest first, message_1.json the newest
    for i in range(0, len(rows), 10_000):
        part = {
            "participants": [{"name": "Ben"}, {"name": "Ana L\u00c3\u00b3pez"}],
            "messages": rows[i : i + 10_000],
            "title": "Ben",
            "thread_path": "inbox/ben_10223",
        }
        (inbox / f"message_{i // 10_000 + 1}.json").write_text(json.dumps(part), encoding="ascii")
    return d / top


def gen_messenger(d: Path, n: int) -> Path:
    return _facebook(d, n, "your_facebook_activity")


def gen_instagram(d: Path, n: int) -> Path:
    return _facebook(d, n, "your_instagram_activity")


def _typedstream(text: str) -> bytes:
    raw = text.encode("utf-8")
    k = len(raw)
    return (
        b"\x04\x0bstreamtyped\x81\xe8\x03\x84\x01@\x84\x84\x84\x12NSAttributedString\x00\x84\x84\x08NSObject"
        b"\x00\x85\x92\x84\x84\x84\x08NSString\x01\x94\x84\x01+"
        + (bytes([k]) if k < 0x80 else b"\x81" + k.to_bytes(2, "little"))
        + raw
        + b"\x86\x84\x02iI\x01\x05\x92\x86"
    )


def gen_imessage(d: Path, n: int) -> Path:
    path = d / "chat.db"
    con = sqlite3.connect(path)
    con.executescript(
        "CREATE TABLE handle (ROWID INTEGER PRIMARY KEY, id TEXT);"
        "CREATE TABLE chat (ROWID INTEGER PRIMARY KEY, display_name TEXT, chat_identifier TEXT);"
        "CREATE TABLE chat_handle_join (chat_id INTEGER, handle_id INTEGER);"
        "CREATE TABLE chat_message_join (chat_id INTEGER, message_id INTEGER, message_date INTEGER);"
        "CREATE TABLE message (ROWID INTEGER PRIMARY KEY, text TEXT, attributedBody BLOB, handle_id INTEGER,"
        " date INTEGER, is_from_me INTEGER, associated_message_type INTEGER, item_type INTEGER,"
        " cache_has_attachments INTEGER, date_retracted INTEGER)"
    )
    handles = {who: i for i, who in enumerate(dict.fromkeys(SPEAKERS), 1)}
    con.executemany("INSERT INTO handle VALUES (?, ?)", [(i, who) for who, i in handles.items()])
    con.execute("INSERT INTO chat VALUES (1, 'Friends', 'chat1')")
    con.executemany("INSERT INTO chat_handle_join VALUES (1, ?)", [(i,) for i in handles.values()])
    rows = []
    for i, (t, who, kind, text) in enumerate(chat(n), 1):
        date = int((t.timestamp() - 978307200) * 1e9)
        me = int(who == "Ana López")
        if kind == "system":
            rows.append((i, None, None, handles[who], date, me, 2000, 0, 0, 0))  # a tapback
        elif kind == "media":
            rows.append((i, "\ufffc", None, handles[who], date, me, 0, 0, 1, 0))
        elif i % 2:
            rows.append(
                (i, None, _typedstream(text), handles[who], date, me, 0, 0, 0, 0)
            )  # Ventura: attributedBody only
        else:
            rows.append((i, text, None, handles[who], date, me, 0, 0, 0, 0))
    con.executemany("INSERT INTO message VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    con.executemany("INSERT INTO chat_message_join VALUES (1, ?, ?)", [(r[0], r[4]) for r in rows])
    con.commit()
    con.close()
    return path


def gen_slack(d: Path, n: int) -> Path:
    top = d / "slack-export"
    (top / "general").mkdir(parents=True)
    ids = {who: f"U{i:04d}" for i, who in enumerate(dict.fromkeys(SPEAKERS))}
    (top / "users.json").write_text(
        json.dumps([{"id": u, "name": who.lower(), "real_name": who} for who, u in ids.items()])
    )
    (top / "channels.json").write_text(json.dumps([{"id": "C01", "name": "general", "members": list(ids.values())}]))
    days: dict[str, list] = {}
    for t, who, kind, text in chat(n):
        m = {"type": "message", "user": ids[who], "ts": f"{t.timestamp():.6f}", "text": text}
        if kind == "system":
            m.update(subtype="channel_join", text=f"<@{ids[who]}> has joined the channel")
        elif kind == "media":
            m.update(subtype="file_share", files=[{"id": "F1", "name": "x.png"}])
        days.setdefault(t.date().isoformat(), []).append(m)
    for day, msgs in days.items():
        (top / "general" / f"{day}.json").write_text(json.dumps(msgs, ensure_ascii=False), encoding="utf-8")
    return top


def gen_signal(d: Path, n: int) -> Path:
    folder = d / "signal" / "Ben"
    folder.mkdir(parents=True)
    with open(folder / "data.json", "w", encoding="utf-8") as f:
        for t, who, kind, text in chat(n):
            row = {
                "date": t.replace(tzinfo=None).isoformat(),
                "sender": "Me" if who == "Ana López" else who,
                "body": (text or "") + "  ",
                "quote": "",
                "sticker": None,
                "reactions": [],
                "attachments": [{"name": "x.jpg", "path": "media/x.jpg"}] if kind == "media" else [],
                "deleted": False,
                "call": kind == "system",
                "missed": False,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return d / "signal"


def gen_googlechat(d: Path, n: int) -> Path:
    folder = d / "Takeout" / "Google Chat" / "Groups" / "Space AAAA"
    folder.mkdir(parents=True)
    msgs = []
    for t, who, kind, text in chat(n):
        m = {
            "creator": {"name": who, "email": "x@example.com", "user_type": "Bot" if kind == "system" else "Human"},
            "created_date": t.strftime("%A, %B %-d, %Y at %-I:%M:%S\u202f%p UTC"),
            "topic_id": "T1",
        }
        if kind == "media":
            m["attached_files"] = [{"original_name": "x.png", "export_name": "File-x.png"}]
        else:
            m["text"] = text or "build passed"
        msgs.append(m)
    (folder / "messages.json").write_text(json.dumps({"messages": msgs}, ensure_ascii=False), encoding="utf-8")
    return d / "Takeout"


def gen_line(d: Path, n: int) -> Path:
    path = d / "[LINE] Chat with Ben.txt"
    lines = ["[LINE] Chat history with Ben", "Saved on: 2024/01/06 22:10", ""]
    day = None
    for t, who, kind, text in chat(n):
        if t.date() != day:
            day = t.date()
            lines.append(t.strftime("%Y/%m/%d(%a)"))
        hm = t.strftime("%H:%M")
        if kind == "system":
            lines.append(f"{hm}\t\t{who} joined the group.")
        elif kind == "media":
            lines.append(f"{hm}\t{who}\t[Photo]")
        elif "\n" in text:
            lines.append(f'{hm}\t{who}\t"{text}"')
        else:
            lines.append(f"{hm}\t{who}\t{text}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def gen_whatsapp(d: Path, n: int) -> Path:
    path = d / "WhatsApp Chat with Ben.txt"
    generate(path, n)
    return path


GENERATORS = {
    "whatsapp": gen_whatsapp,
    "telegram": gen_telegram,
    "discord": gen_discord,
    "messenger": gen_messenger,
    "instagram": gen_instagram,
    "imessage": gen_imessage,
    "slack": gen_slack,
    "signal": gen_signal,
    "googlechat": gen_googlechat,
    "line": gen_line,
}


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timed_import(src: Path, out: Path, *extra: str) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds of this process, the --json summary)."""
    buf = io.StringIO()
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(buf):
        rc = convsim_main(["import", str(src), "--out", str(out), "--json", *extra])
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if rc != 0:
        raise SystemExit(f"import failed with exit code {rc}")
    return seconds, cpu, json.loads(buf.getvalue())


def floor(src: Path) -> float:
    t0 = time.perf_counter()
    text = src.read_bytes().decode("utf-8")
    lines = text.split("\n")
    assert lines
    return time.perf_counter() - t0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU {cpu}, Python {platform.python_version()}, {platform.system()}"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument(
        "--formats", default=",".join(GENERATORS), help="comma-separated (whatsapp always runs: the reference)"
    )
    p.add_argument("--repeat", type=int, default=2, help="imports per format; the fastest counts (default 2)")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/import.json")
    args = p.parse_args()
    wanted = ["whatsapp"] + [f for f in args.formats.split(",") if f and f != "whatsapp"]
    unknown = [f for f in wanted if f not in GENERATORS]
    if unknown:
        raise SystemExit(f"unknown format(s): {', '.join(unknown)}; choose from {', '.join(GENERATORS)}")
    load_before = os.getloadavg()[0]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in wanted:
            d = Path(tmp) / fmt
            d.mkdir()
            t0 = time.perf_counter()
            src = GENERATORS[fmt](d, args.messages)
            print(
                f"{fmt}: generated {args.messages:,} messages ({size_of(src) / 1e6:.1f} MB) in "
                f"{time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            runs = [timed_import(src, d / f"data{i}") for i in range(args.repeat)]
            seconds, cpu, summary = min(runs, key=lambda r: r[0])  # the best of N: other work on the machine only adds
            row = {
                "seconds": round(seconds, 3),
                "messages_per_s": round(args.messages / seconds),
                "cpu_seconds": round(cpu, 3),
                "input_bytes": size_of(src),
                "read": summary["read"],
                "kept_messages": summary["messages"],
                "conversations": summary["conversations"],
                "dropped": summary["dropped"],
                "scrubbed": summary["scrubbed"],
                "output_bytes": (d / "data0" / "conversations.jsonl").stat().st_size,
                "all_seconds": [round(r[0], 3) for r in runs],
            }
            if fmt == "whatsapp":
                row["seconds_floor_read_split"] = round(floor(src), 3)
                row["seconds_no_scrub"] = round(timed_import(src, d / "data-noscrub", "--no-scrub")[0], 3)
            results[fmt] = row
            for f in list(d.iterdir()):  # free the disk before the next format
                if f.is_dir():
                    shutil.rmtree(f)
                else:
                    f.unlink()
    load_after = os.getloadavg()[0]
    ref = results["whatsapp"]["seconds"]
    print(f"{'format':<12} {'seconds':>8} {'messages/s':>12} {'x WhatsApp':>10} {'kept':>10}")
    for fmt, row in results.items():
        row["ratio_to_whatsapp"] = round(row["seconds"] / ref, 2)
        print(
            f"{fmt:<12} {row['seconds']:>8.2f} {row['messages_per_s']:>12,} {row['ratio_to_whatsapp']:>10.2f} "
            f"{row['kept_messages']:>10,}"
        )
    w = results["whatsapp"]
    print(
        f"whatsapp floor (read+decode+split lines) {w['seconds_floor_read_split']:.2f} s, --no-scrub {w['seconds_no_scrub']:.2f} s"
    )
    full = args.messages >= 1_000_000
    slow = [f for f, r in results.items() if r["seconds"] >= GOAL_S]
    lagging = [f for f, r in results.items() if r["ratio_to_whatsapp"] > 2.0]
    goal = (
        ("met" if not slow and not lagging else f"MISSED ({', '.join(slow + lagging)})")
        if full
        else "needs --messages 1000000"
    )
    print(
        f"goals (every format under {GOAL_S:.0f} s for 1M, none over 2x WhatsApp): {goal}; load average "
        f"{load_before:.1f} before, {load_after:.1f} after (other work on the machine slows this)"
    )
    if not args.no_save:
        result = {
            "messages_per_format": args.messages,
            "goal_seconds_for_1m": GOAL_S,
            "goal_max_ratio_to_whatsapp": 2.0,
            "goals": goal,
            "formats": results,
            "machine": machine(),
            "load_average_1min": [round(load_before, 2), round(load_after, 2)],
            "repeat": args.repeat,
            "command": "python bench/import_throughput.py"
            + (f" --messages {args.messages}" if args.messages != 1_000_000 else "")
            + (f" --repeat {args.repeat}" if args.repeat != 2 else "")
            + (f" --formats {args.formats}" if set(wanted) != set(GENERATORS) else ""),
            "commit": commit(),
            "date": datetime.now().isoformat(timespec="seconds"),
        }
        out = Path(__file__).resolve().parent / "results" / "import.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
