"""Cleaning between reading an export and writing conversations.jsonl: speaker aliases, drop and
truncate rules, PII scrubbing with stable placeholders, and splitting a chat into sessions by gap.

    from convsim.data.clean import Scrubber, clean_messages, split_sessions, number
    scrub = Scrubber()
    convs = clean_messages(convs, aliases={"Annie": "Ana"}, max_chars=20_000, scrub=scrub, dropped=Counter())
    convs = number(split_sessions(convs, gap_minutes=120))
    scrub.counts   # Counter({"EMAIL": 3, "PHONE": 1, ...})

Run through `convsim import` (see convsim/data/import_cli.py); tests in tests/unit/test_import_clean.py.

Scrubbing replaces e-mail addresses, phone numbers, URLs, IP addresses (v4 and v6) and card-like
numbers with placeholders numbered by first appearance: the same address is `<EMAIL_3>` everywhere,
in every conversation of one import. What counts:
  URL    http(s)://, ftp:// or www. up to the next space (trailing punctuation stays outside)
  EMAIL  local@domain.tld
  IP     dotted IPv4, IPv6 in full or with ::
  CARD   13-19 digits in groups of 4 or more (single spaces/dashes between) that pass the Luhn check,
         or any grouped 4-4-4-4
  PHONE  +country numbers (8-15 digits), North American (555) 123-4567 / 555-123-4567 shapes, and
         national numbers with a leading 0 (10-11 digits, or 00-international up to 15)
Dates, times, amounts and version numbers are left alone (the false positives to avoid). A speaker
whose whole display name is a phone number or address gets the placeholder too: names are personal
data as much as text is. The placeholder table itself is never written anywhere.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import timedelta

from convsim.data.schema import Conversation, Message, aware

KINDS = ("EMAIL", "PHONE", "URL", "IP", "CARD")

_DIGIT_OR_AT = re.compile(r"[0-9@]").search  # a plain character class: scanned in C, no backtracking
# A placeholder (`<EMAIL_1>`) stands where word characters stood: nothing right after one may start a new match,
# so scrubbing scrubbed text changes nothing (every kind but URL ends in a word character, and URL keeps its tail).
_NOT_AFTER_PLACEHOLDER = r"(?<!\d>)"
_PII = re.compile(
    _NOT_AFTER_PLACEHOLDER + r"(?:(?P<URL>(?<![\w.@])(?:(?:https?|ftp)://|www\.)[^\s<>\"'\[\]{}]+)"
    r"|(?P<EMAIL>(?<![\w.%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24}(?![\w-]))"
    r"|(?P<IP>(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\w|\.\d)"
    r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])"
    r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:){0,5}[0-9A-Fa-f]{1,4}(?![\w:]))"
    r"|(?P<NUM>(?<![\w@/.:+-])(?:\+|\(\+?)?\d(?:[ .\-]?\(?\d\)?|\) ?\d){6,22}(?!\w|[.\-]\d)))"
)
_URL_TAIL = ".,;:!?)'\""
_NANP = re.compile(r"(?:\+?1[ .\-]?)?\(?\d{3}\)?[ .\-]?\d{3}[ .\-]\d{4}")
_GROUPED_CARD = re.compile(r"\d{4}([ \-])\d{4}\1\d{4}\1\d{4}(?:\1\d{1,3})?")
_CARD_GROUPS = re.compile(r"\d{4,}(?:[ \-]\d{4,})*")  # 4111111111111111, 3782 822463 10005
_NON_DIGIT = re.compile(r"\D")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _classify_number(s: str) -> tuple[str, str] | None:
    """(kind, normalised) for a run of digits and separators that is a card or phone number, else None."""
    digits = _NON_DIGIT.sub("", s)
    n = len(digits)
    if "  " in s or ".." in s or "--" in s or set(digits) <= {"0", "1"}:
        return None  # doubled separators, binary strings: not something anyone dials or pays with
    if 13 <= n <= 19 and (_GROUPED_CARD.fullmatch(s) or (_luhn(digits) and _CARD_GROUPS.fullmatch(s))):
        return "CARD", digits
    if "." in s and "." in s.replace(".", "", 1) and any(c in s for c in " -"):
        return None  # dates like 31.12.2020 10, amounts
    if s.startswith(("+", "(+")):
        return ("PHONE", digits) if 8 <= n <= 15 else None
    if n in (10, 11) and _NANP.fullmatch(s):
        return "PHONE", digits
    if digits.startswith("00") and 10 <= n <= 15 and "." not in s:
        return "PHONE", digits
    if digits.startswith("0") and not digits.startswith("00") and n in (10, 11) and "." not in s:
        return "PHONE", digits
    return None


class Scrubber:
    """Replaces PII in text with stable placeholders; `counts` has replacements per kind."""

    def __init__(self) -> None:
        self.ids: dict[str, dict[str, int]] = {k: {} for k in KINDS}
        self.counts: Counter = Counter()

    def __call__(self, text: str) -> str:
        if _DIGIT_OR_AT(text) is None and "://" not in text and "www." not in text and "WWW." not in text:
            return text  # most messages: nothing that could be PII, so skip the big pattern
        return _PII.sub(self._replace, text)

    def name(self, name: str) -> str:
        """A speaker's display name: replaced only if the whole name is a phone number or address."""
        core = name.strip(" \u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
        m = _PII.fullmatch(core)
        if m is None:
            return name
        out = self._replace(m)
        return name if out == core else out

    def summary(self) -> dict[str, dict[str, int]]:
        return {k: {"replaced": self.counts[k], "distinct": len(self.ids[k])} for k in KINDS}

    def _placeholder(self, kind: str, key: str) -> str:
        table = self.ids[kind]
        n = table.get(key)
        if n is None:
            n = table[key] = len(table) + 1
        self.counts[kind] += 1
        return f"<{kind}_{n}>"

    def _replace(self, m: re.Match) -> str:
        kind = m.lastgroup
        value = m.group()
        if kind == "URL":
            core = value.rstrip(_URL_TAIL)
            if len(core) < 5:
                return value
            return self._placeholder("URL", core) + value[len(core) :]
        if kind == "EMAIL":
            return self._placeholder("EMAIL", value.lower())
        if kind == "IP":
            return self._placeholder("IP", value.lower())
        found = _classify_number(value)
        if found is None:
            return value
        return self._placeholder(found[0], found[1])


def clean_messages(
    convs: list[Conversation], *, aliases: dict[str, str], max_chars: int, scrub: Scrubber | None, dropped: Counter
) -> tuple[list[Conversation], int]:
    """Merge aliases, strip text, drop empty ones, scrub, truncate long ones. Returns (convs, truncated)."""
    truncated = 0
    names: dict[str, str] = {}
    maybe = _DIGIT_OR_AT
    out = []
    for c in convs:
        kept: list[Message] = []
        for m in c.messages:
            text = m.text.strip()
            if not text:
                dropped["empty"] += 1
                continue
            name = names.get(m.speaker)
            if name is None:
                name = aliases.get(m.speaker, m.speaker)
                if scrub is not None:
                    name = scrub.name(name)
                names[m.speaker] = name = name if name.strip() else ""
            if not name:
                dropped["no_sender"] += 1
                continue
            # The scrubber's own cheap test, inlined: most messages hold nothing that could be PII.
            if scrub is not None and (maybe(text) is not None or "://" in text or "www." in text or "WWW." in text):
                text = scrub(text)  # before truncating, so a cut never leaves half an address behind
            if len(text) > max_chars:
                text = text[:max_chars]
                truncated += 1
            if name is not m.speaker:
                m.speaker = name
            if text is not m.text:
                m.text = text
            kept.append(m)
        if kept:
            out.append(Conversation(id=c.id, messages=kept, source=c.source))
    return out, truncated


def split_sessions(convs: list[Conversation], gap_minutes: float) -> list[Conversation]:
    """A new conversation after a silence longer than `gap_minutes` (0 or less: never split).

    Messages without a time never split; a time going backwards does not either.
    """
    if gap_minutes <= 0:
        return convs
    gap = timedelta(minutes=gap_minutes)
    out = []
    for c in convs:
        cur: list[Message] = []
        prev = None
        for m in c.messages:
            t = aware(m.time)  # instants: offsets compared, a time without one taken as UTC
            if t is not None:
                if prev is not None and cur and t - prev > gap:
                    out.append(Conversation(id="", messages=cur, source=c.source))
                    cur = []
                prev = t
            cur.append(m)
        if cur:
            out.append(Conversation(id="", messages=cur, source=c.source))
    return out


def number(convs: list[Conversation]) -> list[Conversation]:
    """Give conversations ids c0001, c0002, ... in order (wider when there are more)."""
    width = max(4, len(str(len(convs))))
    for i, c in enumerate(convs, 1):
        c.id = f"c{i:0{width}d}"
    return convs
