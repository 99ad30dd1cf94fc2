"""A conversation history given to `convsim reply --history`, `converse --start` and `tda query --history`:
`[Name] text` lines (a line without a tag continues the previous message) or convsim's JSONL (messages,
or conversation records), read into `Message`s of a run's known speakers.

    msgs = read_transcript("history.txt", ["Ana", "Ben"])      # or "-" for stdin
"""

from __future__ import annotations

import json
import re

from convsim.data.schema import Message
from convsim.errors import UserError

LINE = re.compile(r"^\[([^\]\n]+)\]\s?(.*)$")


def parse_transcript(text: str, known: list[str], source: str = "history") -> list[Message]:
    """`[Name] text` lines (a line without a tag continues the previous message) or our JSONL
    (messages, or conversation records)."""
    msgs: list[Message] = []
    stripped = text.strip()
    if not stripped:
        raise UserError(f"{source} is empty")
    if stripped.startswith("{"):
        for i, line in enumerate(stripped.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except RecursionError:
                raise UserError(f"{source}:{i}: JSON nested too deeply") from None
            except ValueError:
                raise UserError(f"{source}:{i}: not JSON") from None
            rows = obj.get("messages", [obj]) if isinstance(obj, dict) else None
            if not isinstance(rows, list):
                raise UserError(f"{source}:{i}: expected a message or conversation object")
            for r in rows:
                if not isinstance(r, dict) or "speaker" not in r or "text" not in r:
                    raise UserError(f"{source}:{i}: a message needs speaker and text")
                if not isinstance(r["speaker"], str) or not isinstance(r["text"], str):
                    raise UserError(f"{source}:{i}: a message's speaker and text must be strings")
                time = r.get("time")
                msgs.append(Message(r["speaker"], r["text"], time if isinstance(time, str) else None))
    else:
        for i, line in enumerate(stripped.splitlines(), 1):
            m = LINE.match(line)
            if m:
                msgs.append(Message(m.group(1), m.group(2)))
            elif msgs:
                msgs[-1].text += "\n" + line
            else:
                raise UserError(f"{source}:{i}: expected `[Name] text`")
    if not msgs:
        raise UserError(f"{source}: no messages (an empty `messages` list)")
    for m in msgs:
        if m.speaker not in known:
            raise UserError(f"{source}: unknown speaker {m.speaker!r}; this run knows {', '.join(known)}")
    return msgs


def read_transcript(arg: str, known: list[str]) -> list[Message]:
    """`--history FILE` (or `-` for stdin): at most 64 MiB of UTF-8 text, else a `UserError`."""
    import sys
    from convsim.fsutil import MAX_TEXT_BYTES, read_user_text

    if arg == "-":
        data = sys.stdin.buffer.read(MAX_TEXT_BYTES + 1) if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        if len(data) > MAX_TEXT_BYTES:
            raise UserError(f"stdin: a history larger than {MAX_TEXT_BYTES >> 20} MiB")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise UserError("stdin: not UTF-8 text") from None
        return parse_transcript(text, known, "stdin")
    return parse_transcript(read_user_text(arg, "history file"), known, str(arg))
