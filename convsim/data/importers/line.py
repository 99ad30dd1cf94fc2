"""LINE "Export chat history" text files (`[LINE] Chat history with Ana.txt`) → one Conversation.

    from convsim.data.importers import Report, line
    convs = line.parse(Path("[LINE] Chat with Ana.txt").read_bytes(), "line.txt", Report())

The file starts `[LINE] Chat history with NAME` (a group: `... in NAME`; Japanese `NAMEとのトーク履歴`),
then `Saved on: 2024/01/05 22:10`; each day opens with a date line (`2024/01/02(Tue)`, `2024.01.02
Tuesday`, or on Android `Tue, 1/2/2024`), and each message is `TIME<TAB>SENDER<TAB>TEXT`, the time as
`10:00`, `10:00 PM`/`10:00PM` or with 午前/午後/上午/下午 before it. A message of several lines is
wrapped in double quotes (quotes inside doubled) and runs over the following lines; a quote someone
typed at the start of a one-line message is kept as typed (the next day or message line ends it). Events (joins,
leaves, unsent) have no sender: `TIME<TAB><TAB>TEXT` or `TIME<TAB>TEXT`. Dropped and counted: events
("system"), calls ("☎ ...": "system"), `[Photo]`, `[Sticker]`, `[写真]`, ... ("media"), unsent
notices ("deleted"). Times are local wall-clock times as exported (no offset in the file).
"""

from __future__ import annotations

import re
from pathlib import Path

from convsim.data.importers._text import MARKS, as_text
from convsim.data.schema import Conversation, Message
from convsim.errors import UserError

_HEADER = re.compile(
    r"\[LINE\]\s*(?:Chat history (?:with|in) (?P<en>.+)|(?P<ja>.+?)(?:との|の)トーク履歴"
    r"|(?P<zh>.+?)的聊天(?:记录|記錄)|(?P<other>.+))\Z"
)
_DATE_YMD = re.compile(r"(\d{4})[/.\-](\d{1,2})[/.\-](\d{1,2})(?:\s*\(?[^\t\d]{0,12}\)?)?\Z")
_DATE_WDAY_MDY = re.compile(r"[A-Za-z]{2,9}\.?,? (\d{1,2})/(\d{1,2})/(\d{4})\Z")
_TIME = re.compile(r"(午前|午後|上午|下午)?(\d{1,2}):(\d{2})\s?([AaPp][Mm])?\Z")
_MEDIA = frozenset(
    [
        "[Photo]",
        "[Video]",
        "[Sticker]",
        "[File]",
        "[Voice message]",
        "[Album]",
        "[Contact]",
        "[Location]",
        "[Gift]",
        "[Note]",
        "[写真]",
        "[動画]",
        "[スタンプ]",
        "[ファイル]",
        "[ボイスメッセージ]",
        "[アルバム]",
        "[連絡先]",
        "[位置情報]",
        "[照片]",
        "[影片]",
        "[貼圖]",
        "[图片]",
        "[视频]",
        "[贴图]",
        "[文件]",
    ]
)
_UNSENT = re.compile(r".{0,120}(?:unsent a message\.?|メッセージの送信を取り消しました|已收回訊息|撤回了一条消息)\Z")


def looks_like(first_line: str) -> bool:
    return first_line.lstrip("\ufeff").startswith("[LINE]")


def parse(data: bytes | str | Path, source: str, report, **_options) -> list[Conversation]:
    text = as_text(data, source, report.notes)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.lstrip("\ufeff").split("\n")
    head = lines[0].strip().strip(MARKS) if lines else ""
    m = _HEADER.match(head)
    if m is None:
        raise UserError(f"{source}: not a LINE chat export (the first line should start with '[LINE]')")
    chat = next(g for g in m.groups() if g).strip()
    dropped = report.dropped
    out: list[Message] = []
    day: str | None = None
    last: Message | None = None
    quoted = False
    read = 0
    for raw in lines[1:]:
        line = raw.rstrip()
        if quoted and last is not None:  # inside a multi-line message
            if _starts_entry(line):
                # a new day or message before the closing quote: the quote was typed, not LINE's wrapping
                last.text = '"' + last.text
                quoted = False
            elif line.endswith('"') and not line.endswith('""') or line == '"':
                last.text += "\n" + line[:-1]
                last.text = last.text.replace('""', '"')
                quoted = False
                continue
            else:
                last.text += "\n" + line
                continue
        if not line.strip():
            continue
        date = _date(line.strip().strip(MARKS))
        if date is not None:
            day = date
            last = None
            continue
        parts = line.split("\t")
        t = _time(parts[0].strip().strip(MARKS)) if len(parts) >= 2 else None
        if t is None:
            if last is not None:
                last.text += "\n" + line  # an unquoted continuation: keep it with its message
            elif day is None and read == 0:
                continue  # "Saved on: ..." and other lines of the header
            continue
        read += 1
        last = None
        if len(parts) == 2 or not parts[1].strip():
            dropped["system"] += 1
            continue
        sender = parts[1].strip()
        body = "\t".join(parts[2:]).strip()
        if body.startswith('"') and (len(body) == 1 or not body.endswith('"') or body.endswith('""')):
            quoted = True
            body = body[1:]
        if not quoted:
            kind = _notice(body)
            if kind is not None:
                dropped[kind] += 1
                continue
            if not body:
                dropped["empty"] += 1
                continue
        last = Message(sender, body, f"{day}T{t}" if day else None)
        out.append(last)
    report.read += read
    if read == 0:
        raise UserError(f"{source}: a LINE header but no message lines ('10:00<TAB>Name<TAB>text')")
    report.notes.setdefault("chats", {})[chat] = len(out)
    return [Conversation(id="", messages=out, source=f"line:{source.replace('#', '_')}#{chat}")] if out else []


def _starts_entry(line: str) -> bool:
    """Does this line open a day or a message (`2024/01/05(Fri)`, `21:58<TAB>Mei<TAB>...`)?"""
    if _date(line.strip().strip(MARKS)) is not None:
        return True
    parts = line.split("\t")
    return len(parts) >= 3 and _time(parts[0].strip().strip(MARKS)) is not None


def _notice(body: str) -> str | None:
    if body in _MEDIA:
        return "media"
    if body.startswith("☎"):
        return "system"
    if _UNSENT.match(body):
        return "deleted"
    return None


def _date(s: str) -> str | None:
    m = _DATE_YMD.match(s)
    if m is not None:
        y, mo, d = int(m.group(1)), int(m.group(2)), int(m.group(3))
    else:
        m = _DATE_WDAY_MDY.match(s)
        if m is None:
            return None
        mo, d, y = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if not (1 <= mo <= 12 and 1 <= d <= 31 and 1970 <= y <= 2200):
        return None
    return f"{y:04d}-{mo:02d}-{d:02d}"


def _time(s: str) -> str | None:
    m = _TIME.match(s)
    if m is None:
        return None
    h, mi = int(m.group(2)), int(m.group(3))
    pm = m.group(1) in ("午後", "下午") or (m.group(4) or "").lower() == "pm"
    twelve = m.group(1) is not None or m.group(4) is not None
    if twelve:
        if not 0 <= h <= 12:
            return None
        h = h % 12 + (12 if pm else 0)
    if h > 23 or mi > 59:
        return None
    return f"{h:02d}:{mi:02d}:00"
