"""Shared pieces of the conversation commands (reply, chat, converse, compare, serve): sampling flags,
reading a history file, steering and attribution hooks that are optional at run time.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from convsim.chats.schema import Message
from convsim.errors import UserError
from convsim.generate import SampleConfig

LINE = re.compile(r"^\[([^\]\n]+)\]\s?(.*)$")


def add_sampling_arguments(p) -> None:
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy and deterministic (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--max-context-tokens", type=int, default=1024, help="history budget; oldest messages drop first")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steer", metavar="VECTOR[:STRENGTH]", help="apply a steering vector (convsim steer build)")


def sample_config(args) -> SampleConfig:
    return SampleConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                        max_context_tokens=args.max_context_tokens, seed=args.seed)


def steering(model, arg: str | None):
    """Context manager applying `--steer VECTOR[:STRENGTH]`, or nothing."""
    if not arg:
        return contextlib.nullcontext()
    from convsim.steering import apply_steer_arg
    return apply_steer_arg(model, arg)


def parse_history(text: str, known: list[str], source: str = "history") -> list[Message]:
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
            except ValueError:
                raise UserError(f"{source}:{i}: not JSON") from None
            rows = obj.get("messages", [obj]) if isinstance(obj, dict) else None
            if not isinstance(rows, list):
                raise UserError(f"{source}:{i}: expected a message or conversation object")
            for r in rows:
                if not isinstance(r, dict) or "speaker" not in r or "text" not in r:
                    raise UserError(f"{source}:{i}: a message needs speaker and text")
                msgs.append(Message(str(r["speaker"]), str(r["text"]), r.get("time")))
    else:
        for i, line in enumerate(stripped.splitlines(), 1):
            m = LINE.match(line)
            if m:
                msgs.append(Message(m.group(1), m.group(2)))
            elif msgs:
                msgs[-1].text += "\n" + line
            else:
                raise UserError(f"{source}:{i}: expected `[Name] text`")
    for m in msgs:
        if m.speaker not in known:
            raise UserError(f"{source}: unknown speaker {m.speaker!r}; this run knows {', '.join(known)}")
    return msgs


def read_history(arg: str, known: list[str]) -> list[Message]:
    import sys
    if arg == "-":
        return parse_history(sys.stdin.read(), known, "stdin")
    p = Path(arg)
    if not p.is_file():
        raise UserError(f"history file {p} not found")
    try:
        return parse_history(p.read_text(encoding="utf-8"), known, str(p))
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text") from None
