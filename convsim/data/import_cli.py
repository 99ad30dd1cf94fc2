"""`convsim import`: chat exports → DATA_DIR/conversations.jsonl (+ DATA_DIR/import.json, what was read,
kept, dropped and why). Longer than most modules: the whole import flow reads top to bottom here; the
parsers of each app live in importers/.

    convsim import "WhatsApp Chat with Ana.zip" --out data/ana
    convsim import chitchat --top-pair --out data/demo --json
    convsim import facebook-ana.zip --list                       # every chat, its people and dates; writes nothing

Reads every SRC into memory (zips included, never extracted), groups the files of multi-file exports
(importers/bundles.py: a chat.db and its WAL, a Slack workspace), detects each one's format, parses it
with its importer (convsim/data/importers/), joins chats split over several files and keeps the chats
chosen with --chat/--pair/--person (convsim/data/selection.py; --list prints them instead), then
cleans (convsim/data/clean.py: aliases, empty and over-long messages, PII scrubbing) and splits
sessions at silences longer than --gap-minutes. Nothing is written until everything has been read and
checked, so a bad input leaves DATA_DIR as it was (or not created); the files are written atomically,
owner-only (0600, directory 0700).
"""

from __future__ import annotations

import gc
import json
import os
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from convsim.data import selection
from convsim.data.clean import Scrubber, clean_messages, number, split_sessions
from convsim.data.importers import FORMATS, Report, parse_payload, sniff
from convsim.data.importers.bundles import group
from convsim.data.importers.imessage import NotMessagesDatabase
from convsim.data.importers.sources import read_sources
from convsim.data.schema import CONVERSATIONS, Conversation, write_conversations
from convsim.errors import UserError
from convsim.fsutil import PRIVATE_DIR, atomic_dir, private_dir, write_json

# json's own C string encoder (what json.dumps(..., ensure_ascii=False) uses for every str).

IMPORT_JSON = "import.json"

HELP = (
    "Read chat exports (WhatsApp .txt/.zip, Telegram JSON, Discord CSV/JSON, Messenger and Instagram JSON, "
    "iMessage chat.db, Slack, Signal (signal-export), Google Chat, LINE .txt, prompt/response pairs, chitchat, "
    "conversations.jsonl) into DATA_DIR/conversations.jsonl."
)
EXAMPLES = """
  convsim import "WhatsApp Chat with Ana.zip" --out data/ana
  convsim import chat.txt --speaker "Ana 🌻=Ana" --speaker "+1 555 123 4567=Ben" --out data/ana
  convsim import ChatExport_2024-05-01/result.json --chat "Ana" --gap-minutes 180 --out data/ana
  convsim import general.csv export.json --format discord --out data/server --json
  convsim import train.json --out data/seed             # the seed project's prompt/response pairs
  convsim import chitchat --top-pair --out data/demo    # embedded demo data: 11,431 messages, 2 people
  convsim import chitchat --pair 549cc1d1,a54af4d5 --out data/demo
  convsim import chitchat --top-pair --other-chats --out data/demo-others   # the same two with everyone else
  convsim import data/old/conversations.jsonl --no-scrub --gap-minutes 0 --out data/new
  convsim import facebook-ana.zip --list                          # chats, people, counts, dates; writes nothing
  convsim import facebook-ana.zip --chat "Ben Kovač" --out data/ben
  convsim import ~/Library/Messages --me Riya --speaker "+15551234567=Ana" --pair Riya,Ana --out data/ana
  convsim import slack-export.zip --person "Ana López" --out data/ana-work   # Ana's chats, everyone as context

Dropped and counted in import.json: system events, media without a caption, deleted-message markers,
empty messages. E-mails, phone numbers, URLs, IPs and card numbers become placeholders like <EMAIL_3>
unless --no-scrub.
"""


def add_arguments(p) -> None:
    p.add_argument(
        "src", nargs="+", metavar="SRC", help="export file, .zip, directory holding an export, or the word 'chitchat'"
    )
    p.add_argument(
        "--out",
        metavar="DATA_DIR",
        help="directory to write conversations.jsonl and import.json into (required unless --list)",
    )
    p.add_argument(
        "--list",
        action="store_true",
        help="print every chat of the exports (people, messages, first and last date) and write nothing",
    )
    p.add_argument("--format", default="auto", choices=("auto",) + FORMATS, help="skip detection (default: auto)")
    p.add_argument(
        "--speaker",
        action="append",
        default=[],
        metavar="ALIAS=NAME",
        help="merge speaker ALIAS into NAME (names as in the export; repeatable)",
    )
    p.add_argument(
        "--gap-minutes",
        type=float,
        default=120.0,
        metavar="MIN",
        help="start a new conversation after a longer silence (default 120; 0: never split)",
    )
    p.add_argument(
        "--chat",
        action="append",
        default=[],
        metavar="NAME",
        help="import only this chat, as --list names it (Telegram: or its id; repeatable)",
    )
    p.add_argument("--pair", metavar="A,B", help="only the chats between exactly these two people (chitchat: senders)")
    p.add_argument("--person", metavar="NAME", help="only the chats NAME wrote in, everyone else kept as context")
    p.add_argument("--me", metavar="NAME", help="iMessage, Signal: the name for the account owner (default 'Me')")
    p.add_argument("--top-pair", action="store_true", help="chitchat: only the chats of the two people who talked most")
    p.add_argument(
        "--other-chats",
        action="store_true",
        help="chitchat, with --pair or --top-pair: instead, the two people's chats with everyone else, "
        "each partner named 'stranger' (training data for `convsim train --extra-data`)",
    )
    p.add_argument("--no-scrub", action="store_true", help="keep e-mails, phone numbers, URLs, IPs and card numbers")
    p.add_argument(
        "--max-message-chars",
        type=int,
        default=20_000,
        metavar="N",
        help="truncate longer messages (counted in import.json; default 20000)",
    )
    p.add_argument(
        "--max-messages",
        type=int,
        default=5_000_000,
        metavar="N",
        help="refuse inputs with more messages (default 5000000)",
    )
    p.add_argument(
        "--max-speakers",
        type=int,
        default=10_000,
        metavar="N",
        help="refuse inputs with more distinct speakers (default 10000)",
    )
    p.add_argument(
        "--max-input-mb",
        type=int,
        default=1024,
        metavar="MB",
        help="refuse to read more than this much, zips unpacked included (default 1024)",
    )
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")


def run(args) -> int:
    if args.list:
        return _run_list(args)
    if args.out is None:
        raise UserError("--out DATA_DIR is required (or --list to see the chats without importing)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    with _gc_paused():
        convs, summary = _import_and_write(args, out)
    brief = {
        k: summary[k] for k in ("conversations", "messages", "speakers", "read", "dropped", "truncated", "scrubbed")
    }
    brief["formats"] = sorted({s["format"] for s in summary["sources"]})
    brief["out"] = str(out)
    if args.json:
        print(json.dumps(brief, ensure_ascii=False, indent=2))
    else:
        _print_summary(brief, summary)
        hint = extra_hint(args, out)
        if hint:
            print(hint)
    return 0


def extra_hint(args, out: Path) -> str | None:
    """How to add the same people's other chats, which `convsim train` uses from DATA_DIR/extra by default."""
    if out.name == "extra" or args.other_chats:
        return None
    if "chitchat" in args.src and (args.pair or args.top_pair):
        who = f"--pair {args.pair}" if args.pair else "--top-pair"
        cmd = f"convsim import chitchat {who} --other-chats --out {out / 'extra'}"
    else:
        cmd = f"convsim import THEIR_OTHER_CHATS... --out {out / 'extra'}"
    return (
        f"next: convsim train {out} --out runs/NAME   (more data of the same people helps: their chats with "
        f"others, imported with `{cmd}`, are used for training only)"
    )


def _run_list(args) -> int:
    if args.out is not None:
        raise UserError("--list writes nothing; leave out --out")
    with _gc_paused():
        rows = list_chats(
            args.src,
            fmt=args.format,
            aliases=_aliases(args.speaker),
            chats=args.chat,
            pair=_pair(args.pair),
            person=args.person,
            me=args.me,
            max_messages=args.max_messages,
            max_speakers=args.max_speakers,
            max_input_mb=args.max_input_mb,
        )
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
    else:
        selection.print_table(rows)
    return 0


def _import_and_write(args, out: Path) -> tuple[list[Conversation], dict]:
    convs, summary = import_chats(
        args.src,
        fmt=args.format,
        aliases=_aliases(args.speaker),
        gap_minutes=args.gap_minutes,
        chats=args.chat,
        pair=_pair(args.pair),
        top_pair=args.top_pair,
        other_chats=args.other_chats,
        person=args.person,
        me=args.me,
        scrub=not args.no_scrub,
        max_message_chars=args.max_message_chars,
        max_messages=args.max_messages,
        max_speakers=args.max_speakers,
        max_input_mb=args.max_input_mb,
    )
    write_data_dir(out, convs, summary)
    return convs, summary


@contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector: an import allocates millions of small acyclic objects, and
    every collection would walk all of them again (measured: about 3x slower parsing with it on)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def import_chats(
    srcs: list[str],
    *,
    fmt: str = "auto",
    aliases: dict[str, str] | None = None,
    gap_minutes: float = 120.0,
    chats: list[str] | None = None,
    pair: tuple[str, str] | None = None,
    top_pair: bool = False,
    other_chats: bool = False,
    person: str | None = None,
    me: str | None = None,
    scrub: bool = True,
    max_message_chars: int = 20_000,
    max_messages: int = 5_000_000,
    max_speakers: int = 10_000,
    max_input_mb: int = 1024,
) -> tuple[list[Conversation], dict]:
    """Read, parse, choose chats, clean and split; returns (conversations, the import.json summary).
    Writes nothing."""
    aliases = aliases or {}
    if gap_minutes < 0:
        raise UserError(f"--gap-minutes must be 0 or more, not {gap_minutes:g}")
    for flag, value in (
        ("--max-message-chars", max_message_chars),
        ("--max-messages", max_messages),
        ("--max-speakers", max_speakers),
        ("--max-input-mb", max_input_mb),
    ):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, not {value}")
    if pair and top_pair:
        raise UserError("give --pair or --top-pair, not both")
    if other_chats and not (pair or top_pair):
        raise UserError("--other-chats needs --pair or --top-pair (whose other chats?)")

    read_out = _read_exports(
        srcs,
        fmt=fmt,
        pair=pair,
        top_pair=top_pair,
        other_chats=other_chats,
        me=me,
        max_messages=max_messages,
        max_speakers=max_speakers,
        max_input_mb=max_input_mb,
    )
    convs, sources, skipped, dropped, read, speakers, extra_keys = read_out
    formats = {s["format"] for s in sources}
    if top_pair and "chitchat" not in formats:
        raise UserError("--top-pair picks people of the chitchat data; no SRC is chitchat")
    if other_chats and "chitchat" not in formats:
        raise UserError("--other-chats takes the chitchat data's other chats of a pair; no SRC is chitchat")
    convs = _choose(
        convs, chats=chats, pair=pair, person=person, aliases=aliases, dropped=dropped, extra_keys=extra_keys
    )
    speakers = {m.speaker for c in convs for m in c.messages}
    unknown = [a for a in aliases if a not in speakers]
    if unknown:
        names = ", ".join(repr(s) for s in sorted(speakers)[:12])
        raise UserError(
            f"--speaker: no speaker named {', '.join(map(repr, unknown))}; speakers are: {names}"
            f"{' ...' if len(speakers) > 12 else ''}"
        )

    scrubber = Scrubber() if scrub else None
    if scrubber is not None:
        # a chat named by a phone number or address (iMessage, WhatsApp file names) is personal data too
        for c in convs:
            c.source = scrubber(c.source)
        for s in sources:
            s["name"] = scrubber(s["name"])
            if isinstance(s.get("chats"), dict):
                s["chats"] = {scrubber(k): v for k, v in s["chats"].items()}
        skipped = {scrubber(k): v for k, v in skipped.items()}
    convs, truncated = clean_messages(
        convs, aliases=aliases, max_chars=max_message_chars, scrub=scrubber, dropped=dropped
    )
    convs = number(split_sessions(convs, gap_minutes))
    counts: Counter = Counter(m.speaker for c in convs for m in c.messages)
    n_messages = sum(counts.values())
    drop_text = ", ".join(f"{n:,} {why}" for why, n in dropped.most_common()) or "nothing dropped"
    if n_messages == 0:
        raise UserError(
            f"0 messages kept from {read:,} read in {', '.join(s['name'] for s in sources)} "
            f"({drop_text}); nothing to import"
        )
    if len(counts) < 2:
        only = next(iter(counts))
        plural = "s" * (n_messages != 1)
        raise UserError(
            f"only one speaker ({only!r}, {n_messages:,} message{plural}) after import ({drop_text}); "
            "a conversation needs at least two people"
        )
    summary = {
        "conversations": len(convs),
        "messages": n_messages,
        "speakers": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "read": read,
        "dropped": dict(dropped.most_common()),
        "truncated": truncated,
        "scrubbed": {k: scrubber.counts[k] for k in scrubber.ids} if scrubber else None,
        "scrub_distinct": {k: v["distinct"] for k, v in scrubber.summary().items()} if scrubber else None,
        "single_speaker_conversations": sum(len(c.speakers) < 2 for c in convs),
        "sources": sources,
        "skipped": {name: reasons for name, reasons in skipped.items()},  # files in a SRC dir/zip that were no export
        "options": {
            "format": fmt,
            "gap_minutes": gap_minutes,
            "speaker_aliases": aliases,
            "chats": chats or [],
            "pair": list(pair) if pair else None,
            "top_pair": top_pair,
            "other_chats": other_chats,
            "person": person,
            "me": me,
            "scrub": scrub,
            "max_message_chars": max_message_chars,
            "max_messages": max_messages,
            "max_speakers": max_speakers,
            "max_input_mb": max_input_mb,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return convs, summary


def list_chats(
    srcs: list[str],
    *,
    fmt: str = "auto",
    aliases: dict[str, str] | None = None,
    chats: list[str] | None = None,
    pair: tuple[str, str] | None = None,
    person: str | None = None,
    me: str | None = None,
    max_messages: int = 5_000_000,
    max_speakers: int = 10_000,
    max_input_mb: int = 1024,
) -> list[dict]:
    """Every chat of the exports (after --chat/--pair/--person, if given) as `selection.listing` rows:
    read and parsed, not cleaned, nothing written."""
    convs, _, _, dropped, _, _, extra_keys = _read_exports(
        srcs,
        fmt=fmt,
        pair=pair,
        top_pair=False,
        other_chats=False,
        me=me,
        max_messages=max_messages,
        max_speakers=max_speakers,
        max_input_mb=max_input_mb,
    )
    convs = _choose(
        convs, chats=chats, pair=pair, person=person, aliases=aliases or {}, dropped=dropped, extra_keys=extra_keys
    )
    return selection.listing(convs)


def _choose(convs, *, chats, pair, person, aliases, dropped, extra_keys) -> list[Conversation]:
    """--pair (chitchat picks its own pair while parsing), then --chat and --person, in the chats' order."""
    if pair:
        others = [c for c in convs if selection.fmt_of(c) != "chitchat"]
        if others:
            chosen = {
                id(c)
                for c in selection.select(others, chats=None, pair=pair, person=None, dropped=dropped, aliases=aliases)
            }
            convs = [c for c in convs if selection.fmt_of(c) == "chitchat" or id(c) in chosen]
    return selection.select(
        convs, chats=chats, pair=None, person=person, dropped=dropped, aliases=aliases, extra_keys=extra_keys
    )


def _read_exports(srcs, *, fmt, pair, top_pair, other_chats, me, max_messages, max_speakers, max_input_mb):
    """Read every SRC, detect and parse each export; (conversations, per-source summaries, skipped files,
    drops, messages read, speakers, chat ids by conversation)."""
    blobs = group(read_sources(list(srcs), max_input_mb << 20))
    convs: list[Conversation] = []
    dropped: Counter = Counter()
    sources: list[dict] = []
    skipped: dict[str, list[str]] = {}
    found_in: set[str] = set()
    read = 0
    speakers: set[str] = set()
    extra_keys: dict[int, set[str]] = {}
    for blob in blobs:
        report = Report()
        options = {}
        if blob.fmt == "slack":
            found, payload = "slack", blob.companions
            report.notes["format"] = found
        else:
            try:
                found, payload = sniff(blob.data, blob.name, report, blob.fmt or fmt)
            except UserError as e:
                if blob.container is None:
                    raise
                skipped.setdefault(blob.container, []).append(str(e))
                continue
            options.update(blob.companions or {})  # a chat.db's wal=, a messages.json's group_info=
        blob.data = b""  # the text or JSON is all that is needed from here; let the bytes go
        blob.companions = None
        try:
            got = parse_payload(
                found,
                payload,
                blob.name,
                report,
                pair=pair if found == "chitchat" else None,
                top_pair=top_pair,
                other_chats=other_chats,
                max_speakers=max_speakers,
                me=me,
                **options,
            )
        except NotMessagesDatabase as e:  # SQLite is told apart from other databases only by its tables
            if blob.container is None:
                raise
            skipped.setdefault(blob.container, []).append(str(e))
            continue
        del payload
        ids = report.notes.pop("chat_ids", None)
        if ids:
            for c in got:
                key = ids.get(selection.chat_name(c))
                if key is not None:
                    extra_keys[id(c)] = {key}
        if blob.container is not None:
            found_in.add(blob.container)
        read += report.read
        if read > max_messages:
            raise UserError(f"{blob.name}: more than {max_messages:,} messages (--max-messages)")
        for c in got:
            speakers.update(m.speaker for m in c.messages)
        if len(speakers) > max_speakers:
            raise UserError(
                f"{blob.name}: {len(speakers):,} distinct speakers, more than --max-speakers "
                f"{max_speakers:,}; not a conversation between people?"
            )
        dropped.update(report.dropped)
        kept = sum(len(c.messages) for c in got)
        sources.append(
            {
                "name": blob.name,
                "format": found,
                "messages_read": report.read,
                "messages_parsed": kept,
                "dropped": dict(report.dropped),
                **_notes(report.notes),
            }
        )
        convs.extend(got)

    for container, reasons in skipped.items():
        if container not in found_in:
            why = "; ".join(reasons[:3]) + (" ..." if len(reasons) > 3 else "")
            raise UserError(f"{container}: no chat export found ({why})")
    return selection.merge_split(convs), sources, skipped, dropped, read, speakers, extra_keys


def write_data_dir(out: Path, convs: list[Conversation], summary: dict) -> None:
    """conversations.jsonl + import.json, atomically and owner-only. A new DATA_DIR, or an existing one
    that holds only these two files, is replaced as a whole: a killed import leaves the old pair or the
    new pair, never one of each. A DATA_DIR holding other files too is kept, and each file is replaced
    atomically on its own (conversations.jsonl first)."""
    from convsim import __version__

    summary = {**summary, "convsim_version": __version__}
    if out.is_dir() and (out.is_symlink() or not _only_ours(out)):
        private_dir(out)
        write_conversations(out / CONVERSATIONS, convs)
        write_json(out / IMPORT_JSON, summary)
        return
    with atomic_dir(out) as tmp:
        os.chmod(tmp, PRIVATE_DIR)
        write_conversations(tmp / CONVERSATIONS, convs)
        write_json(tmp / IMPORT_JSON, summary)


def _only_ours(out: Path) -> bool:
    """True when DATA_DIR holds nothing but what `convsim import` writes (and temporaries of a killed one)."""
    return all(
        e.name in (CONVERSATIONS, IMPORT_JSON) or (e.name.startswith(".") and e.name.endswith((".tmp", ".old")))
        for e in os.scandir(out)
    )


def _notes(notes: dict) -> dict:
    """An importer's notes for import.json (date order, chats, chitchat's name -> UUID map, ...)."""
    return {k: v for k, v in notes.items() if k != "format"}


def _aliases(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        alias, sep, name = item.partition("=")
        if not sep or not alias or not name.strip():
            raise UserError(f"--speaker {item!r}: expected ALIAS=NAME (the name as exported, then the name to use)")
        out[alias] = name
    return out


def _pair(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    a, sep, b = value.partition(",")
    if not sep or not a.strip() or not b.strip() or "," in b:
        raise UserError(f"--pair {value!r}: expected two senders as A,B")
    return a.strip(), b.strip()


def _print_summary(brief: dict, summary: dict) -> None:
    srcs = summary["sources"]
    what = ", ".join(f"{s['name']} ({s['format']})" for s in srcs[:4]) + (" ..." if len(srcs) > 4 else "")
    print(f"read {brief['read']:,} messages from {len(srcs)} source{'s' * (len(srcs) != 1)}: {what}")
    top = list(brief["speakers"].items())
    spk = ", ".join(f"{n} {c:,}" for n, c in top[:8]) + (f" (+{len(top) - 8} more)" if len(top) > 8 else "")
    print(f"kept {brief['messages']:,} messages in {brief['conversations']:,} conversations; speakers: {spk}")
    if brief["dropped"]:
        print("dropped " + ", ".join(f"{n:,} {why}" for why, n in brief["dropped"].items()))
    if brief["truncated"]:
        print(
            f"truncated {brief['truncated']:,} messages longer than {summary['options']['max_message_chars']:,} characters"
        )
    if brief["scrubbed"] is not None:
        done = ", ".join(f"{n:,} {k}" for k, n in brief["scrubbed"].items() if n)
        print(f"scrubbed {done or 'nothing'} (--no-scrub keeps them)")
    print(f"wrote {Path(brief['out']) / CONVERSATIONS} and {IMPORT_JSON}")
