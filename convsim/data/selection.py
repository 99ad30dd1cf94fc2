"""Whole-account exports: naming their chats, joining chats split over several files, listing them, and
choosing which to import (`convsim import EXPORT --list`, `--chat NAME`, `--pair A,B`, `--person NAME`).

    from convsim.data.selection import chat_name, listing, merge_split, select
    convs = merge_split(convs)                       # Messenger's message_1.json + message_2.json → one chat
    rows = listing(convs)                            # [{"chat", "format", "messages", "people", "first", "last"}]
    convs = select(convs, chats=["Ana"], pair=None, person=None, dropped=Counter())

A chat is one Conversation as an importer returns it (before sessions are split); its name comes from
the Conversation's `source`, `FORMAT:WHERE#CHAT` (WhatsApp has no `#CHAT`: the chat is named by its
file, "WhatsApp Chat with Ana.zip" → "Ana"). Used by convsim/data/import_cli.py.
"""

from __future__ import annotations

import re
from collections import Counter

from convsim.data.schema import Conversation, instant
from convsim.errors import UserError

MULTI_FILE_CHATS = ("messenger", "instagram")  # one chat over message_1.json, message_2.json, ...
_WHATSAPP_NAME = re.compile(
    r"(?:WhatsApp Chat (?:with |- )|WhatsApp-Chat mit |Chat de WhatsApp con )?(.+?)"
    r"(?:\.zip|\.txt)?\Z",
    re.I,
)


def fmt_of(c: Conversation) -> str:
    return c.source.split(":", 1)[0] if ":" in c.source else ""


def chat_name(c: Conversation) -> str:
    """The chat a conversation came from, as people call it."""
    _, _, rest = c.source.partition(":")
    where, sep, chat = rest.partition("#")
    if sep and chat:
        return chat
    parts = [p for p in where.replace("\\", "/").split("/") if p]
    if not parts:
        return where or c.source
    name = parts[-1]
    if name.lower() in ("_chat.txt", "chat.txt") and len(parts) > 1:  # inside a WhatsApp zip: the zip names it
        name = parts[-2]
    return _WHATSAPP_NAME.fullmatch(name).group(1)


def merge_split(convs: list[Conversation]) -> list[Conversation]:
    """Join the conversations of one chat that an export split over several files (same `source`), in
    time order; the rest pass through unchanged, in order."""
    first: dict[str, Conversation] = {}
    parts: dict[str, list[Conversation]] = {}
    out = []
    for c in convs:
        if fmt_of(c) not in MULTI_FILE_CHATS:
            out.append(c)
            continue
        if c.source in first:
            parts[c.source].append(c)
            continue
        first[c.source] = c
        parts[c.source] = [c]
        out.append(c)
    for source, group in parts.items():
        if len(group) > 1:
            msgs = [m for c in group for m in c.messages]
            # messages without a time stay after those with one; a stable sort keeps each file's order
            msgs.sort(key=lambda m: (instant(m.time) is None, instant(m.time) or 0.0))
            first[source].messages = msgs
    return out


def select(
    convs: list[Conversation],
    *,
    chats: list[str] | None,
    pair: tuple[str, str] | None,
    person: str | None,
    dropped: Counter,
    aliases: dict[str, str] | None = None,
    extra_keys: dict[int, set[str]] | None = None,
) -> list[Conversation]:
    """The chats named by `chats` (a name, or an id in `extra_keys[id(conv)]`), then of those the
    chats between exactly the two people of `pair`, then those where `person` wrote. Speakers are
    compared after `aliases`. Chats left out are counted in `dropped["chat_not_selected"]`; a choice that
    matches nothing is a UserError listing what there is."""
    aliases = aliases or {}
    extra_keys = extra_keys or {}
    kept = convs
    if chats:
        wanted = {c.casefold(): c for c in chats}
        matched: set[str] = set()
        picked = []
        for c in kept:
            keys = {chat_name(c).casefold()} | {k.casefold() for k in extra_keys.get(id(c), ())}
            hit = keys & wanted.keys()
            if hit:
                matched |= hit
                picked.append(c)
        missing = [wanted[k] for k in wanted if k not in matched]
        if missing:
            raise UserError(f"--chat: no chat named {', '.join(map(repr, missing))}; chats here: {_names(kept)}")
        kept = _keep(kept, picked, dropped)
    if pair:
        want = {aliases.get(p, p) for p in pair}
        picked = [c for c in kept if {aliases.get(s, s) for s in c.speakers} == want]
        if not picked:
            raise UserError(
                f"--pair: no chat between exactly {pair[0]!r} and {pair[1]!r}; chats here: {_names(kept, True)}"
            )
        kept = _keep(kept, picked, dropped)
    if person:
        who = aliases.get(person, person)
        picked = [c for c in kept if any(aliases.get(m.speaker, m.speaker) == who for m in c.messages)]
        if not picked:
            people = Counter(aliases.get(m.speaker, m.speaker) for c in kept for m in c.messages)
            top = ", ".join(repr(p) for p, _ in people.most_common(12))
            raise UserError(
                f"--person: nobody named {person!r} wrote in these chats; people here: {top}"
                f"{' ...' if len(people) > 12 else ''}"
            )
        kept = _keep(kept, picked, dropped)
    return kept


def _keep(convs: list[Conversation], picked: list[Conversation], dropped: Counter) -> list[Conversation]:
    chosen = {id(c) for c in picked}
    n = sum(len(c.messages) for c in convs if id(c) not in chosen)
    if n:
        dropped["chat_not_selected"] += n
    return picked


def _names(convs: list[Conversation], people: bool = False) -> str:
    shown = []
    for c in convs[:12]:
        shown.append(f"{chat_name(c)!r}" + (f" ({', '.join(c.speakers[:4])})" if people else ""))
    return ", ".join(shown) + (" ..." if len(convs) > 12 else "") if shown else "none"


def listing(convs: list[Conversation]) -> list[dict]:
    """One row per chat: its name, format, message count, people (most messages first) and time span."""
    rows = []
    for c in convs:
        people = Counter(m.speaker for m in c.messages)
        times = [m.time for m in c.messages if m.time]
        rows.append(
            {
                "chat": chat_name(c),
                "format": fmt_of(c),
                "source": c.source.partition(":")[2].partition("#")[0],
                "messages": len(c.messages),
                "people": dict(sorted(people.items(), key=lambda kv: (-kv[1], kv[0]))),
                "first": min(times, key=_sort_key) if times else None,
                "last": max(times, key=_sort_key) if times else None,
            }
        )
    return rows


def _sort_key(t: str) -> float:
    i = instant(t)
    return float("-inf") if i is None else i


def print_table(rows: list[dict]) -> None:
    """The rows of `listing` as a text table, widest columns shortened."""
    header = ("CHAT", "FORMAT", "MESSAGES", "FIRST", "LAST", "PEOPLE (messages)")
    lines = []
    for r in rows:
        people = ", ".join(f"{p} {n:,}" for p, n in list(r["people"].items())[:5])
        if len(r["people"]) > 5:
            people += f" (+{len(r['people']) - 5} more)"
        lines.append(
            (
                _cut(r["chat"], 36),
                r["format"],
                f"{r['messages']:,}",
                (r["first"] or "-")[:10],
                (r["last"] or "-")[:10],
                people,
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join("{:<%d}" % w if i != 2 else "{:>%d}" % w for i, w in enumerate(widths[:-1])) + "  {}"
    print(fmt.format(*header))
    for line in lines:
        print(fmt.format(*line))
    total = sum(r["messages"] for r in rows)
    print(f"{len(rows):,} chat{'s' * (len(rows) != 1)}, {total:,} messages (before cleaning; nothing written)")


def _cut(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"
