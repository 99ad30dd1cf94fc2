"""The seed project's prompt/response training JSON → conversations, overlapping windows stitched.

    from convsim.data.importers import Report, pairs
    convs = pairs.parse(Path("train.json"), "train.json", Report())

Input: a JSON list (or JSON Lines) of `{"prompt": "[A] hi\\n[B] yo\\n[A]", "response": " sup"}` records.
Each line starting with a `[Name]` token is a message of Name; other lines continue the message above.
Both renderings are read: base (the prompt ends with the next speaker's bare token and the response is
that message's text) and instruct (`[SYS] ... [/SYS] [USER] {history}\\n\\nHow does the conversation
continue? [/USER]`, the response one or more `[Name] text` lines); wrapper tokens ([SYS], [USER],
[INST], Gemma turn markers) are stripped. The records are sliding windows over a chat, so record k+1
repeats most of record k: each record's messages are aligned with the tail of the conversation being
rebuilt (at least two messages must agree, or the whole record must lie inside it) and only the new
messages are appended; a record that aligns nowhere starts a new conversation. The format has no
times, so `time` is null and sessions cannot be split by gap.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from convsim.data.importers._text import as_text, load_json
from convsim.data.schema import Conversation, Message
from convsim.errors import UserError

_TOKEN_LINE = re.compile(r"\[([^\[\]\n/][^\[\]\n]{0,79})\][ \t]?(.*)", re.S)
_WRAPPERS = {"SYS", "USER", "INST", "ASSISTANT", "SYSTEM"}
_SYS_BLOCK = re.compile(r"\[SYS\].*?\[/SYS\]|<<SYS>>.*?<</SYS>>", re.S)
_TAIL_QUESTION = re.compile(r"\s*How does the conversation continue\?\s*(?:\[/USER\]|\[/INST\])?\s*\Z")
_MARKUP = re.compile(
    r"\[/?(?:USER|INST|ASSISTANT|SYSTEM)\]|<start_of_turn>(?:user|model)?|<end_of_turn>|<bos>|<eos>|</?s>"
)
_LOOKBACK = 256


def parse(data: bytes | str | Path, source: str, report, **options) -> list[Conversation]:
    text = as_text(data, source, report.notes)
    head = text.lstrip().lstrip("\ufeff")
    if head.startswith("{") and "\n" in head.strip():
        records = []
        for i, line in enumerate(head.split("\n"), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except (ValueError, RecursionError):
                    raise UserError(f"{source}:{i}: not a JSON record") from None
        return parse_obj(records, source, report, **options)
    return parse_obj(load_json(head, source), source, report, **options)


def parse_obj(obj: Any, source: str, report, **_options) -> list[Conversation]:
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list):
        raise UserError(f"{source}: expected a JSON list of {{'prompt', 'response'}} records")
    if not obj:
        raise UserError(f"{source}: empty list of prompt/response records")
    chains: list[list[tuple[str, str]]] = []
    notes = report.notes
    for key in ("records", "records_malformed", "records_without_speakers", "records_inside_earlier_ones"):
        notes.setdefault(key, 0)
    for rec in obj:
        notes["records"] += 1
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            notes["records_malformed"] += 1
            continue
        response = rec.get("response", rec.get("completion", ""))
        seq = _messages(rec["prompt"], response if isinstance(response, str) else "")
        if not seq:
            notes["records_without_speakers"] += 1
            continue
        _stitch(chains, seq, notes)
    out = []
    for chain in chains:
        report.read += len(chain)
        msgs = [Message(s, t, None) for s, t in chain]
        out.append(Conversation(id="", messages=msgs, source=f"pairs:{source}"))
    return out


def _unwrap(prompt: str) -> str:
    prompt = _SYS_BLOCK.sub("", prompt)
    prompt = _TAIL_QUESTION.sub("", prompt)
    return _MARKUP.sub("", prompt)


def _lines(text: str) -> list[list]:
    """[[speaker, text], ...]; lines without a token continue the message above (None speaker if first)."""
    out: list[list] = []
    for line in text.split("\n"):
        m = _TOKEN_LINE.match(line.strip())
        if m and m.group(1).strip() not in _WRAPPERS:
            out.append([m.group(1), m.group(2).strip()])
        elif out:
            out[-1][1] = out[-1][1] + "\n" + line if out[-1][1] else line.strip()
        elif line.strip():
            out.append([None, line.strip()])
    return out


def _messages(prompt: str, response: str) -> list[tuple[str, str]]:
    p = _lines(_unwrap(prompt))
    r = _lines(_MARKUP.sub("", response))
    if p and p[-1][1] == "":
        # Base rendering: the prompt ends with the next speaker's bare token.
        who = p.pop()[0]
        if r and r[0][0] is None:
            r[0][0] = who
        elif not r or r[0][0] != who:
            r.insert(0, [who, ""])
    return [(s, t.strip()) for s, t in p + r if s is not None and t.strip()]


def _stitch(chains: list[list[tuple[str, str]]], seq: list[tuple[str, str]], notes: dict) -> None:
    if chains:
        cur = chains[-1]
        need = min(2, len(seq))
        for p in range(max(0, len(cur) - _LOOKBACK), len(cur)):
            m = min(len(seq), len(cur) - p)
            if m < need:
                break
            if cur[p : p + m] == seq[:m]:
                if m == len(seq):
                    notes["records_inside_earlier_ones"] += 1
                cur.extend(seq[m:])
                return
    chains.append(list(seq))
