"""Chat-export importers: one module per format, each a pure function from an export's bytes (or a
Path, or its text) to a list of `Conversation`s.

    from convsim.data.importers import Report, parse
    convs = parse(Path("WhatsApp Chat with Ana.txt"))              # format detected
    report = Report()
    convs = parse(raw_bytes, "chat.txt", report, fmt="whatsapp")    # or given
    report.read, report.dropped   # messages read, Counter of reason -> messages dropped

The command-line stage is `convsim import` (convsim/data/import_cli.py: sources, cleaning, writing);
tests: tests/test_import_formats.py (fixtures) and tests/test_import_fuzz.py (arbitrary input).

Every importer module has `parse(data, source, report, **options) -> list[Conversation]`; JSON formats
also have `parse_obj(obj, source, report, **options)` so detection parses a file once. Importers do no
I/O beyond reading a Path they are given and raise only `UserError` for bad input (anything else
escaping one is a bug; `parse` below turns stray type errors into a UserError as a last guard).
Dropped records are counted in `report.dropped` by reason: system, media, deleted, empty, ....

Formats: whatsapp (.txt; zips are opened by `sources`), telegram (Desktop JSON, one chat or the whole
account), discord (DiscordChatExporter CSV or JSON), pairs (the seed project's prompt/response JSON),
chitchat (the `chitchat-dataset` package's JSON), jsonl (convsim's own conversations.jsonl), messenger and
instagram ("Download your information" JSON), imessage (a Mac's chat.db, SQLite), slack (a workspace
export folder or zip, grouped by `bundles`), signal (signal-export's data.json), googlechat (Google
Takeout's messages.json), line (LINE's exported .txt).
"""

from __future__ import annotations

import importlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convsim.data.importers._text import as_bytes, decode, first_line, load_json, short
from convsim.data.schema import Conversation
from convsim.errors import UserError

_SPACE = re.compile(r"\s*").match

FORMATS = (
    "whatsapp",
    "telegram",
    "discord",
    "pairs",
    "chitchat",
    "jsonl",
    "messenger",
    "instagram",
    "imessage",
    "slack",
    "signal",
    "googlechat",
    "line",
)
JSON_FORMATS = ("telegram", "discord", "pairs", "chitchat", "jsonl", "messenger", "instagram", "googlechat")
# Formats whose export is several files read together (a Slack workspace folder); `bundles` groups them.
MULTI_FILE_FORMATS = ("slack",)


@dataclass
class Report:
    """What an importer saw: messages read (before any drop), drops by reason, format notes."""

    read: int = 0
    dropped: Counter = field(default_factory=Counter)
    notes: dict[str, Any] = field(default_factory=dict)


def module(fmt: str):
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return importlib.import_module(f"convsim.data.importers.{fmt}")


def detect_obj(obj: Any, source: str = "") -> str | None:
    """Which JSON format a parsed JSON value is, or None (`source`, the file's name, tells Instagram's
    Messenger-shaped files from Messenger's)."""
    from convsim.data.importers import googlechat, instagram, messenger, signal

    if messenger.looks_like(obj):
        return "instagram" if instagram.looks_like(obj, source) else "messenger"
    if googlechat.looks_like(obj):
        return "googlechat"
    if signal.looks_like(obj):
        return "signal"
    if isinstance(obj, dict):
        msgs = obj.get("messages")
        if isinstance(obj.get("chats"), dict) and isinstance(obj["chats"].get("list"), list):
            return "telegram"
        if isinstance(msgs, list):
            if "guild" in obj or "channel" in obj:
                return "discord"
            first = next((m for m in msgs if isinstance(m, dict)), None)
            if first is not None and "speaker" in first:
                return "jsonl"
            if first is not None and (
                "date" in first or "from" in first or first.get("type") in ("message", "service")
            ):
                return "telegram"
            if not msgs and ("type" in obj or "name" in obj):
                return "telegram"
            if first is None and "id" in obj:
                return "jsonl"
            return None
        values = [v for _, v in zip(range(5), obj.values())]
        if values and all(isinstance(v, dict) and isinstance(v.get("messages"), list) for v in values):
            return "chitchat"
        return None
    if isinstance(obj, list):
        first = next((r for r in obj[:50] if isinstance(r, dict)), None)
        if first is not None and "prompt" in first:
            return "pairs"
        if first is not None and isinstance(first.get("messages"), list):
            return "jsonl"
    return None


def detect_text(text: str) -> str | None:
    """Which line-based format a decoded text is (whatsapp, a Discord CSV, JSON Lines), or None."""
    from convsim.data.importers import discord, line as line_txt, whatsapp

    line = first_line(text)
    if not line:
        return None
    if line_txt.looks_like(line):
        return "line"
    if discord.looks_like_csv(line):
        return "discord"
    if whatsapp.looks_like(line):
        return "whatsapp"
    return None


def parse(
    data: bytes | str | Path, source: str | None = None, report: Report | None = None, fmt: str = "auto", **options
) -> list[Conversation]:
    """Detect (unless `fmt` is given) and parse one export. Options go to the format that uses them.

    `source` names the export in messages and in each Conversation's `source` (default: the Path's
    file name); `report`, if given, collects what was read and dropped.
    """
    if source is None:
        source = data.name if isinstance(data, Path) else "<input>"
    report = Report() if report is None else report
    found, payload = sniff(as_bytes(data), source, report, fmt)
    return parse_payload(found, payload, source, report, **options)


def sniff(raw: bytes, source: str, report: Report, fmt: str = "auto") -> tuple[str, Any]:
    """(format, payload) of an export's bytes: payload is parsed JSON for JSON formats, else text.

    Raises UserError when the bytes are no export this package reads (or not `fmt`'s shape of JSON).
    """
    found, payload = _sniff(raw, source, fmt, report)
    report.notes.setdefault("format", found)
    return found, payload


def parse_payload(fmt: str, payload: Any, source: str, report: Report, **options) -> list[Conversation]:
    """Run format `fmt`'s importer on what `sniff` returned."""
    mod = module(fmt)
    try:
        if isinstance(payload, (str, bytes)):
            return mod.parse(payload, source, report, **options)
        return mod.parse_obj(payload, source, report, **options)
    except (TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
        # Importers check types as they go; this is the guard for a shape nobody foresaw.
        raise UserError(f"{source}: not a valid {fmt} export ({type(e).__name__}: {short(str(e), 80)})") from None
    except RecursionError:
        raise UserError(f"{source}: nested too deeply to be a chat export") from None


def _sniff(raw: bytes, source: str, fmt: str, report: Report) -> tuple[str, Any]:
    """(format, payload): payload is parsed JSON for JSON formats, the bytes for SQLite, text otherwise."""
    if raw.startswith(b"PK\x03\x04") or raw.startswith(b"PK\x05\x06"):
        raise UserError(f"{source}: a zip archive here; pass the .zip itself as SRC (zips are opened in memory)")
    if raw.startswith(b"SQLite format 3\0") and fmt in ("auto", None, "imessage"):
        return "imessage", raw
    if fmt == "imessage":
        raise UserError(f"{source}: not an SQLite database, so not an iMessage chat.db")
    if fmt in MULTI_FILE_FORMATS:
        raise UserError(
            f"{source}: a {fmt} export is a folder or zip (users.json, channels.json and a folder "
            "per channel); pass that as SRC"
        )
    if not raw.strip(b" \t\r\n\xef\xbb\xbf"):
        raise UserError(f"{source}: empty file")
    text = decode(raw, source, report.notes)
    stripped = text.lstrip().lstrip("\ufeff")
    if fmt not in ("auto", None):
        module(fmt)
        if fmt in JSON_FORMATS and fmt != "jsonl" and stripped[:1] in ("{", "[") and not _is_json_lines(stripped):
            return fmt, load_json(stripped, source)
        return fmt, text
    if stripped[:1] in ("{", "[") and detect_text(stripped[:4096]) is None:
        if _is_json_lines(stripped):
            obj = load_json(stripped.split("\n", 1)[0], source)
            if detect_obj(obj) == "jsonl":
                return "jsonl", text
            if isinstance(obj, dict) and "prompt" in obj:
                return "pairs", text
            if detect_obj(obj, source) == "signal":
                return "signal", text
            raise UserError(
                f"{source}: JSON Lines, but neither convsim conversations, prompt/response pairs nor "
                "signal-export's data.json"
            )
        obj = load_json(text, source)
        found = detect_obj(obj, source)
        if found is None:
            kind = {"dict": "object", "list": "list"}.get(type(obj).__name__, "value")
            keys = f" with keys {', '.join(map(str, list(obj)[:6]))}" if isinstance(obj, dict) else ""
            raise UserError(f"{source}: JSON {kind}{keys} is not a chat export this tool knows ({_json_tried(obj)})")
        return found, (text if found in ("jsonl", "signal") else obj)
    found = detect_text(text)
    if found is None:
        line = first_line(text, 4096)
        raise UserError(
            f"{source}: unknown format (first line: {short(line)!r}); tried: WhatsApp (no "
            "'31/12/2020, 22:15 - Name: text' line), LINE (no '[LINE]' first line), Discord CSV (no "
            "Author,Date,Content header), and the JSON and SQLite formats (not JSON, not SQLite); "
            "or pass --format"
        )
    return found, text


def _json_tried(obj: Any) -> str:
    """Why a JSON value is none of the JSON formats, format by format, for the error message."""
    if isinstance(obj, list):
        return (
            "tried: pairs (no 'prompt' in the records), conversations.jsonl (no 'messages' list), "
            "Slack (a day file belongs in a workspace folder with users.json)"
        )
    if not isinstance(obj, dict):
        return "tried the JSON formats: every one is an object or a list"
    msgs = isinstance(obj.get("messages"), list)
    return "tried: " + "; ".join(
        [
            "Telegram (" + ("'messages' without 'date'/'from'" if msgs else "no 'messages' list or 'chats'") + ")",
            "Discord (no 'guild'/'channel')",
            "Messenger/Instagram ("
            + ("no 'participants'" if "participants" not in obj else "messages without 'sender_name'")
            + ")",
            "Google Chat (no messages with 'creator' and 'created_date')",
            "Signal data.json (no 'date', 'sender' and 'body')",
            "chitchat (values are not chats with 'messages')",
            "conversations.jsonl (no 'id' with 'messages' of 'speaker')",
        ]
    )


def _is_json_lines(text: str) -> bool:
    """Several JSON values, one a line (a document that fails as one JSON value but not line by line)."""
    head = text.lstrip()
    if not head.startswith("{"):
        return False
    nl = head.find("\n")  # no partition: the rest of a big export is not copied just to look at it
    if nl < 0:
        return False
    line = head[:nl]
    if not line.rstrip().endswith("}"):
        return False
    import json

    try:
        json.loads(line)
    except (ValueError, RecursionError):
        return False
    after = _SPACE(head, nl).end()
    return head.startswith("{", after)
