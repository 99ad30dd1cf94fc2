"""Friendly aliases for people whose names are ids (the chitchat data names people `549cc1d1`): a first
name chosen from the id's hash, so the same id always gets the same alias, shown beside the id.

    display("549cc1d1")   # "<alias> (549cc1d1)"
    display("Ana")        # "Ana": real names are shown as they are
    displays(["549cc1d1", "a54af4d5"], renames(["549cc1d1=Riya"]))   # {"549cc1d1": "Riya (549cc1d1)", ...}
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable, Mapping

from convsim.errors import UserError

ALIASES = (
    "Alex", "Bea", "Cleo", "Dani", "Eli", "Fern", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena", "Milo", "Nora",
    "Otto", "Pia", "Quin", "Rosa", "Sami", "Tess", "Uma", "Vic", "Wren", "Yara", "Zed",
)  # fmt: skip

_ID = re.compile(r"(?=.*\d)[0-9a-f]{6,}|[0-9]{3,}|user[_-]?\d+", re.IGNORECASE)


def looks_like_id(name: str) -> bool:
    """True for names that are ids rather than what a person is called (hex hashes, numbers)."""
    return bool(_ID.fullmatch(name.strip()))


def alias(name: str) -> str:
    """The alias of an id-like name, the same in every run; '' for a real name."""
    if not looks_like_id(name):
        return ""
    return ALIASES[int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(ALIASES)]


def display(name: str) -> str:
    """`Alias (id)` for an id-like name, the name itself otherwise."""
    a = alias(name)
    return f"{a} ({name})" if a else name


def displays(names: Iterable[str], renamed: Mapping[str, str] | None = None) -> dict[str, str]:
    """Display names for several people at once, never the same alias twice among them (a clash takes the
    next free alias in the list). A person in `renamed` is shown by the name given there, with the name the
    run knows them by beside it (what `--as` takes)."""
    renamed = renamed or {}
    out: dict[str, str] = {}
    used: set[str] = set(renamed.values())
    for n in sorted(names):
        if n in renamed:
            out[n] = renamed[n] if renamed[n] == n else f"{renamed[n]} ({n})"
            continue
        a = alias(n)
        if a:
            i = ALIASES.index(a)
            while a in used and len(used) < len(ALIASES):
                i = (i + 1) % len(ALIASES)
                a = ALIASES[i]
            used.add(a)
            out[n] = f"{a} ({n})"
        else:
            out[n] = n
    return out


def renames(items: Iterable[str], known: Iterable[str] | None = None) -> dict[str, str]:
    """`--speaker NAME=SHOWN` options as {NAME: SHOWN}; with `known`, a NAME outside it is an error."""
    out: dict[str, str] = {}
    known = None if known is None else list(known)
    for item in items:
        name, sep, shown = item.partition("=")
        if not sep or not name or not shown.strip():
            raise UserError(f"--speaker {item!r}: expected NAME=SHOWN (the name in the run, then the name to show)")
        if known is not None and name not in known:
            raise UserError(f"--speaker {item!r}: unknown speaker {name!r} (this run's: {', '.join(known)})")
        out[name] = shown.strip()
    return out
