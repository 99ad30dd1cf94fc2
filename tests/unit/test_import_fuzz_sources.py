"""Property-based tests of the newer importers (Messenger/Instagram, iMessage, Slack, Signal, Google Chat,
LINE): whatever reaches them, the outcome is conversations or a `UserError`; and through the command
line, exit code 0, or exit code 2 with one `error:` line and no DATA_DIR.

    python -m pytest tests/unit/test_import_fuzz_sources.py -q

Bounded like tests/unit/test_import_fuzz.py (a few hundred examples, no deadline). Strategies are near-misses
of each format: the right keys with wrong values, real notices cut short, odd SQLite cell types.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import tempfile
import zipfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convsim.data.importers import Report, parse_payload
from convsim.data.importers.imessage import typedstream_text
from convsim.data.importers.messenger import fix_mojibake
from tests.unit.test_import_fuzz import VALUE, check

SETTINGS = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

TEXTS = st.text(max_size=30) | st.sampled_from(
    [
        "Ana left the group.",
        "Reacted ❤ to your message ",
        "Liked a message",
        "Ben sent a photo.",
        "You are now connected on Messenger",
        "caf\u00c3\u00a9",
        "\u00f0\u009f\u0098",
        "\u00c3",
        "Ana unsent a message",
        "<@U01>",
        "<#C01|general>",
        "<https://x.y|z>",
        "<!here>",
        "&amp;",
        "<",
        ">",
        "|",
        "\ufffc",
        "☎ Missed call",
        "[Photo]",
        "a@b.co",
        "+44 7700 900123",
    ]
)
NUMS = st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=12)


@SETTINGS
@given(st.text(max_size=50))
def test_mojibake_repair_never_raises(text):
    out = fix_mojibake(text)
    assert isinstance(out, str)
    assert fix_mojibake(text.encode("utf-8").decode("latin-1")) == text  # what Facebook does, undone


FB_MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "sender_name": TEXTS | NUMS,
        "timestamp_ms": NUMS,
        "content": TEXTS | NUMS,
        "photos": VALUE,
        "share": VALUE,
        "sticker": VALUE,
        "reactions": VALUE,
        "is_unsent": NUMS,
        "type": TEXTS | NUMS | VALUE,
        "call_duration": NUMS,
    },
)


@SETTINGS
@given(
    st.lists(FB_MESSAGE | VALUE, max_size=6),
    st.lists(st.fixed_dictionaries({"name": TEXTS | NUMS}) | VALUE, max_size=3),
    TEXTS | NUMS,
    st.sampled_from(["inbox/a_1/message_1.json", "your_instagram_activity/messages/inbox/a/message_1.json"]),
)
def test_messenger_near_misses(messages, participants, title, name):
    obj = {"participants": participants, "messages": messages, "title": title, "thread_path": title}
    text = json.dumps(obj, ensure_ascii=True)
    check(text)
    for fmt in ("messenger", "instagram"):
        check(text, fmt)


E2EE_MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "senderName": TEXTS | NUMS,
        "timestamp": NUMS,
        "text": TEXTS | NUMS,
        "type": TEXTS | NUMS | st.sampled_from(["text", "media", "link", "placeholder"]),
        "media": VALUE,
        "isUnsent": NUMS,
        "reactions": VALUE,
    },
)


@SETTINGS
@given(st.lists(E2EE_MESSAGE | VALUE, max_size=6), st.lists(TEXTS | NUMS | VALUE, max_size=3), TEXTS | NUMS)
def test_messenger_encrypted_export_near_misses(messages, participants, name):
    text = json.dumps({"participants": participants, "threadName": name, "messages": messages}, ensure_ascii=False)
    check(text)
    check(text, "messenger")


@SETTINGS
@given(st.binary(max_size=300), st.text(max_size=40))
def test_typedstream_never_raises(noise, text):
    assert typedstream_text(noise) is None or isinstance(typedstream_text(noise), str)
    head = b"\x04\x0bstreamtyped\x81\xe8\x03\x84\x01@\x84\x84\x84\x08NSString\x01\x94\x84\x01+"
    raw = text.encode("utf-8", "surrogatepass")
    blob = head + (bytes([len(raw)]) if len(raw) < 0x80 else b"\x81" + len(raw).to_bytes(2, "little")) + raw
    got = typedstream_text(blob)
    assert got == text or got is None  # None only for text that is no valid UTF-8 (lone surrogates)
    typedstream_text(head + noise)


CELL = (
    st.none()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)


@FEW
@given(
    st.lists(st.tuples(CELL, CELL, CELL, CELL, CELL, CELL, CELL, CELL, CELL), max_size=8),
    st.lists(st.tuples(CELL, CELL), max_size=4),
    st.booleans(),
)
def test_imessage_any_cell_values(rows, handles, with_chat):
    """chat.db files whose cells hold any SQLite type: SQLite does not enforce the declared types."""
    con = sqlite3.connect(":memory:")
    con.executescript(
        "CREATE TABLE handle (ROWID INTEGER PRIMARY KEY, id); "
        "CREATE TABLE message (ROWID INTEGER PRIMARY KEY, text, attributedBody, handle_id, date, "
        "is_from_me, associated_message_type, item_type, cache_has_attachments, date_retracted);"
        + (
            "CREATE TABLE chat (ROWID INTEGER PRIMARY KEY, display_name, chat_identifier);"
            "CREATE TABLE chat_message_join (chat_id, message_id);"
            "CREATE TABLE chat_handle_join (chat_id, handle_id);"
            if with_chat
            else ""
        )
    )
    con.executemany("INSERT INTO handle (ROWID, id) VALUES (?, ?)", [(i, h[1]) for i, h in enumerate(handles, 1)])
    con.executemany(
        "INSERT INTO message (text, attributedBody, handle_id, date, is_from_me, associated_message_type, "
        "item_type, cache_has_attachments, date_retracted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    if with_chat:
        con.executemany("INSERT INTO chat VALUES (?, ?, ?)", [(i, h[0], h[1]) for i, h in enumerate(handles, 1)])
        con.executemany("INSERT INTO chat_message_join VALUES (?, ?)", [(r[2], i) for i, r in enumerate(rows, 1)])
        con.executemany("INSERT INTO chat_handle_join VALUES (?, ?)", [(h[0], h[1]) for h in handles])
    con.commit()
    data = con.serialize()
    con.close()
    check(data)
    check(data, "imessage", me="Riya")


@SETTINGS
@given(st.binary(max_size=2000))
def test_sqlite_header_then_noise(noise):
    check(b"SQLite format 3\0" + noise)


SLACK_MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "type": TEXTS,
        "subtype": TEXTS | NUMS | st.sampled_from(["channel_join", "bot_message", "tombstone", "file_share"]),
        "user": TEXTS | NUMS | st.sampled_from(["U01", "U02"]),
        "text": TEXTS | NUMS,
        "ts": NUMS | st.sampled_from(["1704186060.000200", "x"]),
        "files": VALUE,
        "bot_id": VALUE,
        "hidden": NUMS,
        "user_profile": VALUE | st.fixed_dictionaries({"real_name": TEXTS | NUMS}),
    },
)


@SETTINGS
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "id": TEXTS | NUMS | st.sampled_from(["U01", "U02"]),
                "real_name": TEXTS | NUMS,
                "is_bot": NUMS,
                "profile": VALUE,
            }
        )
        | VALUE,
        max_size=4,
    ),
    st.dictionaries(
        st.sampled_from(["channels.json", "dms.json", "groups.json", "mpims.json"]),
        st.lists(
            st.fixed_dictionaries({"id": TEXTS | NUMS, "name": TEXTS | NUMS, "members": VALUE}) | VALUE, max_size=3
        ),
        max_size=2,
    ),
    st.dictionaries(
        st.sampled_from(
            ["general/2024-01-02.json", "general/2024-01-03.json", "D01/2024-01-02.json", "x/notaday.json"]
        ),
        st.lists(SLACK_MESSAGE | VALUE, max_size=5) | VALUE,
        max_size=3,
    ),
)
def test_slack_near_misses(users, indexes, days):
    files = {"users.json": json.dumps(users).encode()}
    files.update({k: json.dumps(v).encode() for k, v in indexes.items()})
    files.update({k: json.dumps(v).encode() for k, v in days.items()})
    try:
        convs = parse_payload("slack", files, "fuzz-slack", Report())
    except Exception as e:  # noqa: BLE001  (the assertion below says which)
        from convsim.errors import UserError

        assert isinstance(e, UserError), repr(e)
        return
    assert all(isinstance(m.text, str) and isinstance(m.speaker, str) for c in convs for m in c.messages)


SIGNAL_LINE = st.fixed_dictionaries(
    {"date": TEXTS | NUMS | st.just("2024-02-10T19:00:12"), "sender": TEXTS | NUMS, "body": TEXTS | NUMS},
    optional={"deleted": NUMS, "call": NUMS, "sticker": VALUE, "attachments": VALUE},
)


@SETTINGS
@given(st.lists(SIGNAL_LINE | VALUE, min_size=1, max_size=6), st.sampled_from(["\n", "\r\n"]))
def test_signal_near_misses(lines, sep):
    text = sep.join(json.dumps(x, ensure_ascii=False) for x in lines) + sep
    check(text)
    check(text, "signal", me="Riya")


GCHAT_MESSAGE = st.fixed_dictionaries(
    {
        "creator": VALUE | st.fixed_dictionaries({"name": TEXTS | NUMS, "user_type": TEXTS | NUMS}),
        "created_date": TEXTS
        | NUMS
        | st.sampled_from(
            [
                "Monday, January 8, 2024 at 9:15:02 AM UTC",
                "Monday, Smarch 8, 2024 at 13:15:02\u202fPM UTC",
                "Monday, February 30, 2024 at 9:15:02 AM UTC",
            ]
        ),
    },
    optional={"text": TEXTS | NUMS, "attached_files": VALUE, "deletion_metadata": VALUE},
)


@SETTINGS
@given(
    st.lists(GCHAT_MESSAGE | VALUE, max_size=6),
    st.binary(max_size=40) | st.sampled_from([b'{"name": 3}', b'{"members": [{"name": "x"}, 1]}']),
)
def test_google_chat_near_misses(messages, info):
    text = json.dumps({"messages": messages}, ensure_ascii=False)
    check(text)
    try:
        parse_payload("googlechat", json.loads(text), "g/messages.json", Report(), group_info=info)
    except Exception as e:  # noqa: BLE001
        from convsim.errors import UserError

        assert isinstance(e, UserError), repr(e)


LINE_PIECES = st.sampled_from(
    [
        "[LINE] Chat history with Mei\n",
        "[LINE] 家族のトーク履歴\n",
        "Saved on: 2024/01/06 22:10\n",
        "2024/01/05(Fri)\n",
        "Thu, 2/29/2024\n",
        "2024/13/45(Fri)\n",
        "21:58\t",
        "11:58 PM\t",
        "午後3:04\t",
        "25:99\t",
        "Mei\t",
        "\t",
        "\n",
        '"',
        '""',
        "[Sticker]",
        "☎ Missed call",
        "Mei unsent a message.",
        "hello",
        "\r\n",
    ]
)


@SETTINGS
@given(st.lists(LINE_PIECES | st.text(max_size=8), max_size=60).map("".join))
def test_line_near_misses(text):
    check(text)
    check("[LINE] Chat history with X\n" + text, "line")


CLI_INPUTS = st.one_of(
    st.lists(LINE_PIECES, max_size=30).map(
        lambda p: ("chat.txt", ("[LINE] Chat history with Mei\n" + "".join(p)).encode())
    ),
    st.lists(SIGNAL_LINE, min_size=1, max_size=4).map(
        lambda ls: ("Ana/data.json", "\n".join(json.dumps(x) for x in ls).encode())
    ),
    st.lists(FB_MESSAGE, max_size=5).map(
        lambda ms: (
            "inbox/a_1/message_1.json",
            json.dumps({"participants": [{"name": "A"}, {"name": "B"}], "messages": ms}).encode(),
        )
    ),
    st.binary(max_size=300).map(lambda b: ("chat.db", b"SQLite format 3\0" + b)),
)


@FEW
@given(CLI_INPUTS, st.booleans())
def test_cli_exit_codes_and_nothing_written_on_failure(named, zipped):
    from convsim.cli import main

    name, data = named
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "export"
        src.mkdir()
        if zipped:
            with zipfile.ZipFile(src / "export.zip", "w") as z:
                z.writestr(name, data)
        else:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(data)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(["import", str(src), "--out", os.path.join(tmp, "new", "data"), "--json"])
            except SystemExit as e:
                rc = e.code
        if rc == 0:
            assert json.loads(out.getvalue())["messages"] > 0
            assert sorted(os.listdir(os.path.join(tmp, "new", "data"))) == ["conversations.jsonl", "import.json"]
        else:
            lines = err.getvalue().strip().splitlines()
            assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err.getvalue())
            assert not os.path.exists(os.path.join(tmp, "new"))


@SETTINGS
@given(st.integers(0, 253402300799), st.integers(0, 999_999))
def test_utc_iso_is_datetime_isoformat(unix, micro):
    from datetime import datetime, timedelta, timezone

    from convsim.data.importers._text import utc_iso

    expected = (datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=unix, microseconds=micro)).isoformat()
    assert utc_iso(unix, micro) == expected
