"""WhatsApp "Export chat" text files (Android and iOS) → one Conversation (sessions are split later).

    from convsim.data.importers import Report, whatsapp
    convs = whatsapp.parse(Path("WhatsApp Chat with Ana.txt").read_bytes(), "chat.txt", Report())

Handles the shapes exports take in the wild:
  Android  `12/31/20, 10:15 PM - Ana: hi`      `31/12/2020, 22:15 - Ana: hi`    `31.12.20, 22:15 - ...`
  iOS      `[31/12/2020, 22:15:03] Ana: hi`    `‎[12/31/20, 10:15:03 PM] Ana: ‎image omitted`
12- or 24-hour clocks (AM/PM after a space, a no-break or a narrow no-break space), day- or month-first
dates decided from the whole file (a day above 12 settles it; otherwise the reading whose dates run in
order, then the clock: 12-hour → month-first), invisible direction marks (U+200E, U+200F, ...), CRLF,
a BOM. A line that does not start with a timestamp continues the message above (multi-line messages
stay one message). Dropped and counted: system events (encryption notices, group joins/leaves/changes,
calls), media without a caption (`<Media omitted>`, `image omitted`, `<attached: ...>`, `X (file
attached)`), deleted-message markers. `<This message was edited>` tags are removed. Only English
system texts are recognised; other languages' notices come through as messages of the chat's name.
Times are local wall-clock times as exported (ISO 8601 without an offset: the export has none).
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

from convsim.data.importers._text import MARKS, as_text
from convsim.data.schema import Conversation, Message
from convsim.errors import UserError

_S = "[ \u202f\u00a0]"
_DATE = r"\d{1,4}[./-]\d{1,2}[./-]\d{1,4}"
_TIME = rf"\d{{1,2}}[:.]\d{{2}}(?:[:.]\d{{2}})?(?:{_S}?[AaPp]\.?{_S}?[Mm]\.?)?"
# group 1: "[" (iOS), 2: date, 3: time. The conditional closes "]" for iOS, " - " for Android.
_HEADER = rf"[{MARKS}]*(\[)?({_DATE}),?{_S}({_TIME})(?(1)\]{_S}?|{_S}?[-\u2013]{_S})"
HEADER = re.compile(_HEADER)
# Starts with a literal newline (the text gets one prepended) so the regex engine can jump from line
# to line instead of trying every character.
_SPLIT = re.compile("\n" + _HEADER).split
_AMPM = re.compile(r"[AaPp]\.?\W?[Mm]").search
_MARKS_SET = frozenset(MARKS)
_DATE_PARTS = re.compile(r"(\d+)[./-](\d+)[./-](\d+)")
_TIME_PARTS = re.compile(r"(\d{1,2})[:.](\d{2})(?:[:.](\d{2}))?(?:\D*([AaPp]))?")

# Notices matched at the start of a message's text (after direction marks). `media` keeps whatever
# follows the marker as a caption.
_SPECIAL = re.compile(
    r"(?P<media><Media omitted>|(?:image|video|audio|sticker|GIF|document|Contact card|video note) omitted"
    r"|<attached: [^>\n]*>|[^\n]{1,255}\(file attached\)|null\Z)"
    r"|(?P<deleted>(?:This message was deleted|You deleted this message)(?: by admin)?\.?\Z)"
    r"|(?P<system>Messages and calls are end-to-end encrypted|Messages to this (?:group|chat) are now secured"
    r"|(?:[Mm]issed )?(?:group )?(?:[Vv]oice|[Vv]ideo) call(?:\Z|,)|Your security code with |Waiting for this message"
    r"|This chat is with a business|You (?:un)?blocked this contact|Disappearing messages)"
)
# iOS writes group events as a message from the group, the text starting with U+200E.
_IOS_EVENT = re.compile(
    r"[^\n]{0,200}?\b(?:created (?:group|this group)|added|removed|left|joined using|changed the subject"
    r"|changed this group|changed the group|changed their phone number|changed to|pinned a message"
    r"|deleted this group|now an admin|turned (?:on|off)|security code|started a call|is a contact)"
)
# An Android system line whose text happens to contain ": " must not become a speaker.
_EVENT_AS_NAME = re.compile(
    r".*\b(?:changed the subject|changed the group description|changed this group|"
    r"created group|added|removed)\b.*[\"\u201c\u201d]"
)
_EDITED = "<This message was edited>"
_SPECIAL_FIRST = frozenset("<ivasGdCnTYMmWDVg")  # first letters of everything _SPECIAL matches


def looks_like(line: str) -> bool:
    """Does this first line of a file start a WhatsApp message?"""
    return HEADER.match(line) is not None


def parse(
    data: bytes | str | Path, source: str, report, max_speakers: int | None = None, **_options
) -> list[Conversation]:
    """`max_speakers`: stop early (UserError) once more distinct names than this have been seen."""
    text = as_text(data, source, report.notes)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    # One C-level split does the line work: [before, "[" or None, date, time, rest, "[", date, ...],
    # where rest runs to the next header (continuation lines included, so multi-line stays one message).
    parts = _SPLIT("\n" + text)
    if len(parts) < 5:
        raise UserError(
            f"{source}: no WhatsApp message lines (a line should start like "
            "'31/12/2020, 22:15 - Name: text' or '[31/12/2020, 22:15:03] Name: text')"
        )
    all_dates = parts[2::4]
    time_strings = set(parts[3::4])
    order, why = _date_order(all_dates, any(_AMPM(t) for t in time_strings))
    report.notes["date_order"] = f"{order} ({why})"
    dates = {s: _date_iso(s, order) for s in set(all_dates)}
    times = {s: _time_iso(s) for s in time_strings}
    if parts[0].strip():
        report.notes["lines_before_first_message"] = len(parts[0].strip().split("\n"))

    dropped = report.dropped
    names: dict[str, str | None] = {}
    out: list[Message] = []
    append = out.append
    special = _SPECIAL.match
    special_first = _SPECIAL_FIRST
    marks = _MARKS_SET
    last: Message | None = None
    read = 0
    for bracket, ds, ts, rest in zip(parts[1::4], parts[2::4], parts[3::4], parts[4::4]):
        d = dates[ds]
        t = times[ts]
        if d is None or t is None:
            # Not a real timestamp (31/02, 25:00): the line belongs to the message above.
            line = (f"[{ds}, {ts}] " if bracket else f"{ds}, {ts} - ") + rest.rstrip()
            if last is not None:
                last.text = last.text + "\n" + line
            continue
        read += 1
        spk, sep, body = rest.partition(": ")
        if not sep or "\n" in spk:
            first, _, more = rest.partition("\n")
            if first.endswith(":") and more.strip():
                spk, body = first[:-1], more
            else:
                dropped["system"] += 1
                last = None
                continue
        name = names.get(spk, "")
        if name == "":
            name = names[spk] = _speaker(spk)
            if max_speakers is not None and len(names) > max_speakers:
                raise UserError(
                    f"{source}: more than {max_speakers:,} distinct speakers (--max-speakers); "
                    "not a conversation between people?"
                )
        if name is None:
            dropped["system"] += 1
            last = None
            continue
        c0 = body[:1]
        marked = c0 in marks
        if marked:
            body = body.lstrip(MARKS)
            c0 = body[:1]
        if c0 in special_first or "(file attached)" in body:
            m = special(body)
            if m is not None:
                kind = m.lastgroup
                if kind != "media":
                    dropped[kind] += 1
                    last = None
                    continue
                body = body[m.end() :].strip(MARKS + " \n")
                if not body:
                    dropped["media"] += 1
                    last = None
                    continue
            elif marked and _IOS_EVENT.match(body):
                dropped["system"] += 1
                last = None
                continue
        elif marked and _IOS_EVENT.match(body):
            dropped["system"] += 1
            last = None
            continue
        if _EDITED in body:
            body = body.replace(_EDITED, "").rstrip(MARKS + " \n")
        last = Message(name, body.rstrip(), d + t)
        append(last)
    report.read += read
    if read == 0:
        raise UserError(
            f"{source}: {len(all_dates)} WhatsApp-looking lines but no valid date and time in any "
            f"(first: {all_dates[0]!r}, {parts[3]!r})"
        )
    return [Conversation(id="", messages=out, source=f"whatsapp:{source}")] if out else []


def _speaker(raw: str) -> str | None:
    name = raw.strip(MARKS)
    if not name or _EVENT_AS_NAME.match(name):
        return None
    return name


def _date_order(found: list[str], twelve_hour: bool) -> tuple[str, str]:
    """'DMY', 'MDY' or 'YMD' for the whole file, and why."""
    uniq = list(dict.fromkeys(found))
    parts = []
    for s in uniq:
        m = _DATE_PARTS.fullmatch(s)
        if m:
            parts.append((int(m.group(1)), int(m.group(2)), int(m.group(3)), len(m.group(1))))
    if not parts:
        return "DMY", "no dates"
    if sum(p[3] == 4 for p in parts) > len(parts) // 2:
        return "YMD", "year first"
    day_first = any(p[0] > 12 for p in parts)
    month_first = any(p[1] > 12 for p in parts)
    if day_first and not month_first:
        return "DMY", "a first number above 12"
    if month_first and not day_first:
        return "MDY", "a second number above 12"
    scores = {}
    for order in ("DMY", "MDY"):
        seq = [_ymd(p[0], p[1], p[2], order) for p in parts]
        bad = sum(s is None for s in seq)
        ok = [s for s in seq if s is not None]
        backwards = sum(b < a for a, b in zip(ok, ok[1:]))
        scores[order] = (bad, backwards)
    if scores["DMY"] != scores["MDY"]:
        best = min(scores, key=scores.get)
        return best, "the reading whose dates are valid and in order"
    return (
        ("MDY", "ambiguous; 12-hour clock suggests month first")
        if twelve_hour
        else ("DMY", "ambiguous; assumed day first")
    )


def _ymd(a: int, b: int, c: int, order: str) -> tuple[int, int, int] | None:
    if order == "YMD":
        y, mo, d = a, b, c
    elif order == "DMY":
        d, mo, y = a, b, c
    else:
        mo, d, y = a, b, c
    if y < 100:
        y += 2000
    try:
        date(y, mo, d)
    except ValueError:
        return None
    return y, mo, d


def _date_iso(s: str, order: str) -> str | None:
    m = _DATE_PARTS.fullmatch(s)
    if m is None:
        return None
    a, b, c = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if order != "YMD" and len(m.group(1)) == 4:
        order = "YMD"
    ymd = _ymd(a, b, c, order)
    return None if ymd is None else f"{ymd[0]:04d}-{ymd[1]:02d}-{ymd[2]:02d}T"


def _time_iso(s: str) -> str | None:
    m = _TIME_PARTS.match(s)
    if m is None:
        return None
    h, mi, sec = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    ap = m.group(4)
    if ap is not None:
        if not 1 <= h <= 12:
            return None
        h = h % 12 + (12 if ap in "Pp" else 0)
    if h > 23 or mi > 59 or sec > 59:
        return None
    return f"{h:02d}:{mi:02d}:{sec:02d}"
