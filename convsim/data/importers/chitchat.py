"""The `chitchat-dataset` package's chats (7,168 two-person chats, the embedded demo data) → conversations.

    from convsim.data.importers import Report, chitchat
    convs = chitchat.parse(Path(chitchat.dataset_path()), "chitchat", Report(), top_pair=True)

The JSON maps a chat id to `{"messages": [[{"text", "timestamp", "sender"}, ...], ...], "start",
"prompt", "ratings"}`; each inner list is one person's burst, and every item in it is a message.
Senders are UUIDs; a speaker's name is the UUID's first 8 hex characters (longer where two would clash)
and `report.notes["speaker_names"]` maps names back to UUIDs. `top_pair=True` keeps the chats between
the two people who talked most (11,431 messages in 62 chats); `pair=("549cc1d1", "a54af4d5")` keeps the
chats between those two (names, UUIDs or unique UUID prefixes); neither keeps every chat. A chat is
between a pair when exactly those two wrote in it. Chats left out are counted as "pair_not_selected".
With `other_chats=True` it keeps the opposite: the chats of either person of the pair with someone else,
every partner named "stranger" (565 chats with 154 people for the top pair: training-only data for
`convsim train --extra-data`).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from convsim.data.importers._text import as_text, load_json, short
from convsim.data.schema import Conversation, Message
from convsim.errors import UserError


def dataset_path() -> str:
    """Where the installed chitchat-dataset package keeps its JSON."""
    try:
        import chitchat_dataset
    except ImportError:
        raise UserError("the chitchat-dataset package is not installed (pip install chitchat-dataset)") from None
    return chitchat_dataset._PATH


def parse(data: bytes | str | Path, source: str, report, **options) -> list[Conversation]:
    return parse_obj(load_json(as_text(data, source, report.notes), source), source, report, **options)


STRANGER = "stranger"  # everyone but the pair, in `other_chats` imports


def parse_obj(
    obj: Any,
    source: str,
    report,
    pair: tuple[str, str] | None = None,
    top_pair: bool = False,
    other_chats: bool = False,
    **_options,
) -> list[Conversation]:
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{source}: not chitchat data (expected a JSON object of chat id -> chat)")
    chats = []  # (chat id, [(sender, text, time)])
    dropped = report.dropped
    for cid, chat in obj.items():
        if not isinstance(chat, dict) or not isinstance(chat.get("messages"), list):
            raise UserError(f"{source}: chat {short(cid, 40)!r} has no 'messages' list; not chitchat data")
        msgs = []
        for burst in chat["messages"]:
            for m in burst if isinstance(burst, list) else [burst]:
                report.read += 1
                if not isinstance(m, dict) or not isinstance(m.get("sender"), str) or not m["sender"]:
                    dropped["malformed"] += 1
                    continue
                text = m.get("text")
                if not isinstance(text, str) or not text.strip():
                    dropped["empty"] += 1
                    continue
                msgs.append((m["sender"], text.strip(), _time(m.get("timestamp"))))
        chats.append((str(cid), msgs))

    senders = sorted({s for _, msgs in chats for s, _, _ in msgs})
    if pair is not None or top_pair:
        per_pair: Counter = Counter()
        per_pair_chats: Counter = Counter()
        for _, msgs in chats:
            who = frozenset(s for s, _, _ in msgs)
            if len(who) == 2:
                per_pair[who] += len(msgs)
                per_pair_chats[who] += 1
        if pair is not None:
            chosen = frozenset(_resolve(p, senders, source) for p in pair)
            if len(chosen) != 2:
                raise UserError(f"--pair names the same person twice: {pair[0]},{pair[1]}")
        else:
            if not per_pair:
                raise UserError(f"{source}: no chat between exactly two people, so no top pair")
            chosen = min(per_pair, key=lambda k: (-per_pair[k], sorted(k)))
        if chosen not in per_pair:
            top = ", ".join(f"{_pretty(k)} ({n})" for k, n in per_pair.most_common(5))
            raise UserError(f"no chat between exactly {_pretty(chosen)}; busiest pairs: {top}")
        report.notes["pair"] = {
            "senders": sorted(chosen),
            "messages": per_pair[chosen],
            "chats": per_pair_chats[chosen],
        }
        kept = []
        for cid, msgs in chats:
            who = frozenset(s for s, _, _ in msgs)
            if (len(who & chosen) == 1 and len(who) > 1) if other_chats else who == chosen:
                kept.append((cid, msgs))
            else:
                dropped["pair_not_selected"] += len(msgs)
        chats = kept
    elif other_chats:
        raise UserError("--other-chats needs --pair or --top-pair (whose other chats?)")

    writers = sorted({s for _, msgs in chats for s, _, _ in msgs})  # of the chats kept
    if other_chats:  # the pair keep the names of their own import; their partners become one speaker
        names = {**{s: STRANGER for s in writers}, **_short_names(sorted(chosen))}
        report.notes["other_chats"] = {"chats": len(chats), "partners": len(set(writers) - chosen)}
    else:
        names = _short_names(writers)
    report.notes["speaker_names"] = {v: k for k, v in names.items() if v != STRANGER}
    report.notes["chats"] = len(chats)
    return [
        Conversation(id="", messages=[Message(names[s], t, w) for s, t, w in msgs], source=f"chitchat:{cid}")
        for cid, msgs in chats
        if msgs
    ]


def _short_names(senders: list[str]) -> dict[str, str]:
    """UUID → its shortest unique prefix of at least 8 characters (dashes dropped)."""
    compact = {s: s.replace("-", "") for s in senders}
    for n in (8, 12, 16, 32):
        names = {s: c[:n] for s, c in compact.items()}
        if len(set(names.values())) == len(names):
            return names
    return {s: s for s in senders}


def _resolve(name: str, senders: list[str], source: str) -> str:
    name = name.strip()
    hits = [s for s in senders if s == name or s.replace("-", "").startswith(name.replace("-", "")) and len(name) >= 4]
    if len(hits) != 1:
        what = "is ambiguous" if hits else "matches no sender"
        raise UserError(f"--pair: {name!r} {what} in {source} (give a sender's 8-character name or its UUID)")
    return hits[0]


def _pretty(pair) -> str:
    return " & ".join(s.replace("-", "")[:8] for s in sorted(pair))


def _time(value: Any) -> str | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        return datetime.fromisoformat(value).isoformat()
    except ValueError:
        return None
