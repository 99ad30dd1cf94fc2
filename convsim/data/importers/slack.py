"""Slack workspace exports (a folder or zip: `users.json`, `channels.json`, `dms.json`, ..., and one
folder per conversation holding one JSON file per day) → one Conversation per channel or DM.

    from convsim.data.importers import Report, slack
    convs = slack.parse_files({"users.json": b"...", "channels.json": b"...", "general/2024-01-02.json": b"..."},
                              "slack-export.zip", Report())

`convsim import` finds the export's files by its `users.json` beside `channels.json` (or `dms.json`,
`groups.json`, `mpims.json`); see bundles.py. A day file is a list of `{"type": "message", "user": "U01",
"text", "ts": "1704189600.000100", "subtype", "thread_ts", "files", "user_profile"}`. Speakers are the
people's real names from users.json (`real_name`, else the profile's display name, else the user name,
else the message's own `user_profile`). Thread replies are messages in time order like the rest.
Slack's markup is turned back into text: `<@U01>` → `@Ana López`, `<#C01|general>` → `#general`,
`<https://x|label>` → `label (https://x)`, `&amp;` → `&`. Dropped and counted: joins, leaves, topic and
name changes, pins ("system"), bot messages and integrations ("bot"), files without text ("media"),
deleted thread parents ("deleted"). Channels are named by name; DMs by their members. Times are UTC.
"""

from __future__ import annotations

import json
import re
from typing import Any

from convsim.data.importers._text import decode, short, utc_iso
from convsim.data.schema import Conversation, Message
from convsim.errors import UserError

INDEX_FILES = ("channels.json", "groups.json", "dms.json", "mpims.json")
_SYSTEM = {
    "channel_join",
    "channel_leave",
    "channel_topic",
    "channel_purpose",
    "channel_name",
    "channel_archive",
    "channel_unarchive",
    "group_join",
    "group_leave",
    "group_topic",
    "group_purpose",
    "group_name",
    "group_archive",
    "group_unarchive",
    "pinned_item",
    "unpinned_item",
    "reminder_add",
    "huddle_thread",
    "sh_room_created",
    "channel_convert_to_private",
    "channel_convert_to_public",
    "joiner_notification",
}
_BOT = {
    "bot_message",
    "bot_add",
    "bot_remove",
    "bot_enable",
    "bot_disable",
    "slackbot_response",
    "app_conversation_join",
}
_DAY_FILE = re.compile(r"(.+)/(\d{4}-\d{2}-\d{2})\.json\Z")
_MARKUP = re.compile(r"<([@#!]?)([^<>|]*)(?:\|([^<>]*))?>")


def is_workspace(names: set[str], prefix: str = "") -> bool:
    """Do these file names (relative to `prefix`) hold a Slack export's users.json and an index file?"""
    return prefix + "users.json" in names and any(prefix + f in names for f in INDEX_FILES)


def parse_files(
    files: dict[str, bytes], source: str, report, chats: list[str] | None = None, **_options
) -> list[Conversation]:
    """`files`: the export's paths relative to its top folder → their bytes."""
    users_raw = files.get("users.json")
    if users_raw is None:
        raise UserError(f"{source}: not a Slack export (no users.json)")
    users = _load(users_raw, f"{source}/users.json")
    if not isinstance(users, list):
        raise UserError(f"{source}/users.json: expected a list of users")
    names: dict[str, str] = {}
    bots: set[str] = set()
    for u in users:
        if not isinstance(u, dict) or not isinstance(u.get("id"), str):
            continue
        names[u["id"]] = _user_name(u)
        if u.get("is_bot") is True or u.get("is_app_user") is True:
            bots.add(u["id"])
    folders: dict[str, str] = {}  # folder name → the chat's name
    for index in INDEX_FILES:
        if index not in files:
            continue
        listed = _load(files[index], f"{source}/{index}")
        if not isinstance(listed, list):
            raise UserError(f"{source}/{index}: expected a list")
        for ch in listed:
            if not isinstance(ch, dict):
                continue
            folder = ch.get("name") if isinstance(ch.get("name"), str) and ch["name"] else ch.get("id")
            if not isinstance(folder, str):
                continue
            if index == "dms.json" or (index == "mpims.json" and isinstance(ch.get("members"), list)):
                members = [names.get(m, m) for m in ch.get("members", []) if isinstance(m, str)]
                folders[folder] = ", ".join(members) or folder
            else:
                folders[folder] = folder

    days: dict[str, list[tuple[str, str]]] = {}
    for path in files:
        m = _DAY_FILE.fullmatch(path)
        if m is not None:
            days.setdefault(m.group(1), []).append((m.group(2), path))
    if not days:
        raise UserError(f"{source}: a Slack export without any channel folder of day files (general/2024-01-02.json)")
    dropped = report.dropped
    per_chat = report.notes.setdefault("chats", {})
    out = []
    for folder in sorted(days):
        rows: list[tuple[float, Message]] = []
        for _, path in sorted(days[folder]):
            day = _load(files[path], f"{source}/{path}")
            if not isinstance(day, list):
                raise UserError(f"{source}/{path}: a Slack day file should be a list of messages")
            for m in day:
                report.read += 1
                got = _message(m, names, bots, dropped)
                if got is not None:
                    rows.append(got)
        rows.sort(key=lambda r: r[0])
        msgs = [msg for _, msg in rows]
        chat = folders.get(folder, folder.rsplit("/", 1)[-1]).replace("#", "_")
        per_chat[chat] = per_chat.get(chat, 0) + len(msgs)
        if msgs:
            out.append(Conversation(id="", messages=msgs, source=f"slack:{source.replace('#', '_')}#{chat}"))
    return out


def _message(m: Any, names: dict, bots: set, dropped) -> tuple[float, Message] | None:
    if not isinstance(m, dict):
        dropped["malformed"] += 1
        return None
    sub = m.get("subtype")
    sub = sub if isinstance(sub, str) else None
    if sub in _SYSTEM:
        dropped["system"] += 1
        return None
    user = m.get("user")
    if sub in _BOT or ("bot_id" in m and not isinstance(user, str)) or user in bots:
        dropped["bot"] += 1
        return None
    if sub == "tombstone" or m.get("hidden") is True:
        dropped["deleted"] += 1
        return None
    text = m.get("text")
    text = _plain(text, names).strip() if isinstance(text, str) else ""
    if not text:
        dropped["media" if m.get("files") or m.get("attachments") else "empty"] += 1
        return None
    if not isinstance(user, str) or not user:
        dropped["no_sender"] += 1
        return None
    speaker = names.get(user)
    if speaker is None:
        profile = m.get("user_profile") if isinstance(m.get("user_profile"), dict) else {}
        speaker = (
            _user_name({"profile": profile, "real_name": profile.get("real_name"), "name": profile.get("name")}) or user
        )
    ts = m.get("ts")
    try:
        t = float(ts) if isinstance(ts, (str, int, float)) and not isinstance(ts, bool) else None
    except ValueError:
        t = None
    when = None
    if t is not None and 0 <= t < 1e11:
        when = utc_iso(int(t))  # the fraction orders messages of one second; it is no time
    return (t if when is not None else float("inf")), Message(speaker, text, when)


def _user_name(u: dict) -> str:
    profile = u.get("profile") if isinstance(u.get("profile"), dict) else {}
    for value in (u.get("real_name"), profile.get("real_name"), profile.get("display_name"), u.get("name")):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return u.get("id") if isinstance(u.get("id"), str) else ""


def _plain(text: str, names: dict) -> str:
    if "<" in text:

        def sub(m: re.Match) -> str:
            sigil, target, label = m.group(1), m.group(2), m.group(3)
            if sigil == "@":
                return "@" + (names.get(target) or label or target)
            if sigil == "#":
                return "#" + (label or target)
            if sigil == "!":
                return "@" + (label or target.split("^", 1)[0])
            if target.startswith("mailto:"):
                return label or target[7:]
            return f"{label} ({target})" if label and label != target else target

        text = _MARKUP.sub(sub, text)
    if "&" in text:
        text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return text


def _load(raw: bytes, what: str) -> Any:
    text = decode(raw, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise UserError(f"{what}: JSON nested too deeply") from None
    except ValueError as e:
        raise UserError(f"{what}: unreadable JSON value ({short(str(e), 80)})") from None


def parse_obj(files: Any, source: str, report, **options) -> list[Conversation]:
    """What `parse_payload` calls: `files` as `parse_files` takes them (bundles.py builds them)."""
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, bytes) for k, v in files.items()):
        raise UserError(f"{source}: a Slack export is a folder or zip of files; pass that as SRC")
    return parse_files(files, source, report, **options)


def parse(data: Any, source: str, report, **options) -> list[Conversation]:
    return parse_obj(data, source, report, **options)
