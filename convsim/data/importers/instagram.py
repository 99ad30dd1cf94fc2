"""Instagram direct messages from "Download your information" (JSON) → one Conversation per file.

    from convsim.data.importers import Report, instagram
    convs = instagram.parse(Path("message_1.json"), "your_instagram_activity/messages/inbox/ana_1/message_1.json", Report())

The files lie in `your_instagram_activity/messages/inbox/<chat>/message_N.json` (older exports:
`messages/inbox/...`) and have Messenger's shape and mojibake, so messenger.py reads them; this module
only names the app. Instagram adds its own notices ("Liked a message", "Reacted ❤ to your message",
"X sent an attachment.", shared reels and posts), dropped as reactions and media.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convsim.data.importers import messenger
from convsim.data.importers._text import as_text, load_json
from convsim.data.schema import Conversation

APP = "instagram"


def looks_like(obj: Any, source: str) -> bool:
    """A Messenger-shaped file from an Instagram export (told apart by its path)."""
    low = source.lower()
    return messenger.looks_like(obj) and ("instagram" in low or "your_instagram_activity" in low)


def parse(data: bytes | str | Path, source: str, report, **options) -> list[Conversation]:
    return parse_obj(load_json(as_text(data, source, report.notes), source), source, report, **options)


def parse_obj(obj: Any, source: str, report, **options) -> list[Conversation]:
    options.pop("app", None)
    return messenger.parse_obj(obj, source, report, app=APP, **options)
