"""Exports made of several files that must be read together, found among the blobs `sources` read:

    from convsim.data.importers.bundles import group
    blobs = group(read_sources(srcs, max_bytes))

  - an iMessage `chat.db` and its `chat.db-wal` (the newest messages until macOS checkpoints them) become
    one blob whose `companions` hold the WAL (`-shm` files are not needed and not read);
  - a Google Chat `messages.json` and the `group_info.json` beside it (the space's name and members,
    which name the chat) become one blob whose `companions` hold the group info;
  - a Slack workspace export (`users.json` beside `channels.json`, `dms.json`, ... and a folder per
    channel) becomes one blob of format `slack` whose `companions` are its files by relative path.

Every other blob passes through unchanged and in order. Used by `convsim import` (import_cli.py).
"""

from __future__ import annotations

from convsim.data.importers import slack
from convsim.data.importers.sources import Blob

WAL = "-wal"


def group(blobs: list[Blob]) -> list[Blob]:
    by_name = {b.name: b for b in blobs}
    taken: set[str] = set()
    out: list[Blob] = []
    # Slack: every users.json whose folder also holds an index file is a workspace's top folder.
    workspaces: dict[str, Blob] = {}
    for b in blobs:
        if b.name == "users.json" or b.name.endswith("/users.json"):
            prefix = b.name[: -len("users.json")]
            if slack.is_workspace(set(by_name), prefix):
                files = {n[len(prefix) :]: x.data for n, x in by_name.items() if n.startswith(prefix)}
                taken.update(prefix + rel for rel in files)
                name = prefix.rstrip("/") or b.container or "slack"
                workspaces[b.name] = Blob(name, b"", container=b.container, fmt="slack", companions=files)
    for b in blobs:
        if b.name in workspaces:
            out.append(workspaces[b.name])
            continue
        if b.name in taken:
            continue
        if b.name.endswith(WAL) and b.name[: -len(WAL)] in by_name:
            continue  # attached to its database below
        if b.name.endswith("-shm"):
            continue
        if b.name.endswith("/group_info.json") and b.name[: -len("group_info.json")] + "messages.json" in by_name:
            continue  # attached to its messages.json below
        wal = by_name.get(b.name + WAL)
        if wal is not None and b.data.startswith(b"SQLite format 3\0"):
            b.companions = {"wal": wal.data}
        info = (
            by_name.get(b.name[: -len("messages.json")] + "group_info.json")
            if b.name.endswith("/messages.json")
            else None
        )
        if info is not None:
            b.companions = {"group_info": info.data}
        out.append(b)
    return out
