"""Helpers every importer shares: bytes → text (BOM, UTF-16, stray bad bytes), bytes → JSON (with
nesting and size errors turned into `UserError`), the invisible marks exports sprinkle around, and Unix
times → ISO 8601 UTC for the formats that store numbers.

Not a command; used by the modules beside it.
"""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from convsim.errors import UserError

# Direction marks and embeddings WhatsApp (and others) put around names, media notices and phone
# numbers. They are export artefacts, not what the person typed.
MARKS = "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff"

# A few undecodable bytes in a big export (one corrupt emoji) should not sink the whole import; a
# file that is mostly not UTF-8 is the wrong encoding and is refused with advice.
_MAX_BAD_FRACTION = 0.001


def as_bytes(data: bytes | str | Path) -> bytes:
    """An importer's input: bytes as is, a str is the export's text, a Path is read."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, str):
        return data.encode("utf-8", "surrogatepass")
    path = Path(data)
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UserError(f"{path}: not a regular file")
            return f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def as_text(data: bytes | str | Path, source: str, notes: dict | None = None) -> str:
    """An importer's input as text: a str as is, bytes decoded, a Path read and decoded."""
    if isinstance(data, str):
        return data
    return decode(as_bytes(data), source, notes)


_MAGIC = (
    (b"SQLite format 3\0", "an SQLite database"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"%PDF-", "a PDF document"),
    (b"\x7fELF", "a program (ELF)"),
)


def decode(data: bytes, source: str, notes: dict | None = None) -> str:
    """Decode an export's bytes: UTF-8 (BOM stripped), or UTF-16 with a BOM. Raises UserError otherwise."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    elif data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise UserError(f"{source}: broken UTF-16 text at byte {e.start}") from None
    if b"\x00" in data:
        for magic, what in _MAGIC:
            if data.startswith(magic):
                raise UserError(f"{source}: {what}, not a chat export")
        head = data[:4096]
        half = len(head) // 2
        for zeros, other in ((head[1::2], head[0::2]), (head[0::2], head[1::2])):  # LE, BE
            if len(head) > 8 and zeros.count(0) > half // 2 and other.count(0) < max(1, half // 20):
                raise UserError(f"{source}: looks like UTF-16 text without a byte-order mark; re-save it as UTF-8")
        raise UserError(f"{source}: binary data (NUL bytes), not a text chat export")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        first = e.start
    text = data.decode("utf-8", "replace")
    bad = text.count("\ufffd") - data.count(b"\xef\xbf\xbd")
    if bad > max(3, _MAX_BAD_FRACTION * len(data)):
        raise UserError(
            f"{source}: not UTF-8 text ({bad} undecodable bytes, first at byte {first}); re-save the export as UTF-8"
        )
    if notes is not None:
        notes["undecodable_bytes"] = notes.get("undecodable_bytes", 0) + bad
    return text


def load_json(data: bytes | str, source: str) -> Any:
    """Parse JSON, turning syntax errors, absurd nesting and absurd numbers into one-line UserErrors."""
    text = data if isinstance(data, str) else decode(data, source)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{source}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}"
            f"{'; the file looks truncated' if e.pos >= len(text.rstrip()) else ''})"
        ) from None
    except RecursionError:
        raise UserError(f"{source}: JSON nested too deeply to be a chat export") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise UserError(f"{source}: unreadable JSON value ({str(e)[:120]})") from None


_DAYS: dict[int, str | None] = {}
_CLOCKS: list[str] = []


def utc_iso(unix: int, micro: int = 0) -> str | None:
    """A Unix time in whole seconds (+ microseconds) as `datetime.isoformat()` writes it in UTC, e.g.
    "2024-03-02T18:00:00+00:00": built from a remembered date and clock string, several times faster than
    a datetime per message (exports hold millions). None outside what a datetime holds."""
    if not _CLOCKS:
        _CLOCKS.extend(f"{h:02d}:{m:02d}:{s:02d}" for h in range(24) for m in range(60) for s in range(60))
    day, second = divmod(unix, 86400)
    prefix = _DAYS.get(day, "")
    if prefix == "":
        try:
            d = datetime.fromtimestamp(day * 86400, timezone.utc)
            prefix = f"{d.year:04d}-{d.month:02d}-{d.day:02d}T"
        except (OverflowError, OSError, ValueError):
            prefix = None
        if len(_DAYS) < 1_000_000:
            _DAYS[day] = prefix
    if prefix is None:
        return None
    return prefix + _CLOCKS[second] + (f".{micro:06d}+00:00" if micro else "+00:00")


def first_line(text: str, limit: int = 65536) -> str:
    """The first non-blank line (within the first `limit` characters), marks stripped."""
    head = text[:limit]
    for line in head.split("\n"):
        line = line.strip().strip(MARKS)
        if line:
            return line
    return ""


def short(value: Any, n: int = 60) -> str:
    """A value shortened for an error message."""
    s = value if isinstance(value, str) else repr(value)
    return s if len(s) <= n else s[: n - 1] + "…"
