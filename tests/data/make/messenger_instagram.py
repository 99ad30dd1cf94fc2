"""Writes the Messenger and Instagram fixtures in tests/data/exports/{messenger,instagram}/ the way
Facebook's "Download your information" (JSON) writes them: messages newest first, a long chat split
into message_1.json (newest) and message_2.json, and every non-ASCII character as mojibake (each UTF-8
byte escaped as \\u00XX). People and text are invented.

    python tests/data/make/messenger_instagram.py
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

EXPORTS = Path(__file__).resolve().parents[1] / "exports"


def moji(s: str) -> str:
    return s.encode("utf-8").decode("latin-1")


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp() * 1000)


def write(path: Path, participants: list[str], title: str, thread: str, messages: list[dict]) -> None:
    def fix(v):
        if isinstance(v, str):
            return moji(v)
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v
    obj = {"participants": [{"name": moji(p)} for p in participants],
           "messages": [fix(m) for m in sorted(messages, key=lambda m: -m["timestamp_ms"])],
           "title": moji(title), "is_still_participant": True, "thread_path": thread,
           "magic_words": [], "image": {"uri": f"{thread}/photos/group.jpg", "creation_timestamp": 1704067200},
           "joinable_mode": {"mode": 1, "link": ""}}
    path.parent.mkdir(parents=True, exist_ok=True)
    # ensure_ascii=True: Facebook's files are pure ASCII with \u00XX escapes
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=True) + "\n", encoding="ascii")


def msg(who: str, when: str, content: str | None = None, **extra) -> dict:
    m = {"sender_name": who, "timestamp_ms": ms(when)}
    if content is not None:
        m["content"] = content
    m.update(extra)
    m.setdefault("is_geoblocked_for_viewer", False)
    return m


def messenger() -> None:
    base = EXPORTS / "messenger" / "your_facebook_activity" / "messages" / "inbox"
    ana, ben = "Ana López", "Ben Kovač"
    older = [
        msg(ana, "2024-01-02T10:00:00", "You are now connected on Messenger"),
        msg(ana, "2024-01-02T10:00:05", "olá Ben! café amanhã? ☕"),
        msg(ben, "2024-01-02T10:01:00", "sí, a las 10 😀"),
        msg(ben, "2024-01-02T10:01:30", photos=[{"uri": "messages/inbox/benkovac_10223/photos/1.jpg",
                                                 "creation_timestamp": 1704189690}]),
        msg(ana, "2024-01-02T10:02:00", "mail me: ana.lopez@example.com",
            reactions=[{"reaction": "❤", "actor": ben}]),
        msg(ben, "2024-01-02T10:03:00", "Ben unsent a message", is_unsent=True),
    ]
    newer = [
        msg(ana, "2024-01-05T18:00:00", "Ana called you.", call_duration=65),
        msg(ben, "2024-01-05T18:05:00", "Ben sent a photo."),
        msg(ben, "2024-01-05T18:05:10", "Zürich was great\nsecond line"),
        msg(ana, "2024-01-05T18:06:00", "https://example.org/trip", share={"link": "https://example.org/trip"}),
        msg(ana, "2024-01-05T18:06:30", share={"link": "https://example.org/only-a-link"}),
        msg(ben, "2024-01-05T18:07:00", "Reacted 😂 to your message "),
        msg(ben, "2024-01-05T18:08:00", "naïve question: dinner? 🍝"),
    ]
    thread = "inbox/benkovac_10223"
    write(base / "benkovac_10223" / "message_1.json", [ben, ana], ben, thread, newer)
    write(base / "benkovac_10223" / "message_2.json", [ben, ana], ben, thread, older)
    group = [
        msg(ana, "2024-02-01T09:00:00", "Ana created the group."),
        msg(ana, "2024-02-01T09:00:10", "Ana named the group Viagem 🚐."),
        msg(ana, "2024-02-01T09:00:20", "Ana added Caro Šimić to the group."),
        msg("Caro Šimić", "2024-02-01T09:01:00", "oi gente"),
        msg(ben, "2024-02-01T09:02:00", "when do we leave?"),
        msg(ana, "2024-02-01T09:03:00", "friday 8:00, call me +44 7700 900123"),
        msg("Caro Šimić", "2024-02-01T09:04:00", sticker={"uri": "messages/stickers_used/1.png"}),
        msg("Caro Šimić", "2024-02-01T09:05:00", "Caro Šimić left the group."),
        msg(ben, "2024-02-01T09:06:00", "she left the group chat but not the trip, right?"),
    ]
    write(base / "viagem_55501" / "message_1.json", [ana, ben, "Caro Šimić"], "Viagem 🚐", "inbox/viagem_55501", group)


def instagram() -> None:
    base = EXPORTS / "instagram" / "your_instagram_activity" / "messages" / "inbox"
    riya, mo = "Riya", "Mo Tanaka"
    chat = [
        msg(riya, "2024-03-01T20:00:00", "heyyy 👋"),
        msg(mo, "2024-03-01T20:00:30", "Liked a message"),
        msg(mo, "2024-03-01T20:01:00", "hi! did you see my reel?"),
        msg(riya, "2024-03-01T20:02:00", "Riya sent an attachment.", share={"link": "https://www.instagram.com/reel/x1/"}),
        msg(riya, "2024-03-01T20:02:30", "Reacted ❤️ to your message "),
        msg(riya, "2024-03-01T20:03:00", "das ist großartig 😍"),
        msg(mo, "2024-03-01T20:04:00", photos=[{"uri": "your_instagram_activity/messages/inbox/riya_9/photos/2.jpg",
                                                "creation_timestamp": 1709323440}]),
        msg(mo, "2024-03-01T20:05:00", "thx, ttyl"),
    ]
    write(base / "riya_9876" / "message_1.json", [riya, mo], riya, "inbox/riya_9876", chat)


if __name__ == "__main__":
    messenger()
    instagram()
