"""Property-based: whatever bytes or text reach the importers (and the cleaning after them), the
outcome is a list of conversations or a `UserError`, never another exception.

    python -m pytest tests/unit/test_import_fuzz.py -q

Bounded (200 examples a test, no deadline) so the suite stays fast; strategies mix pure noise with
near-misses of each format (WhatsApp-like lines, JSON of the right keys with wrong values, CSV rows).
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections import Counter

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from convsim.data.clean import Scrubber, clean_messages, number, split_sessions
from convsim.data.importers import FORMATS, Report, parse
from convsim.data.importers.sources import _Budget, _zip_members
from convsim.data.schema import Conversation
from convsim.data.stats import speaker_stats
from convsim.errors import UserError

# database=None: no .hypothesis/ directory left in the repository by a test run.
SETTINGS = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def check(data, fmt: str = "auto", **options) -> None:
    try:
        convs = parse(data, "fuzz", Report(), fmt=fmt, **options)
    except UserError as e:
        assert str(e).strip()
        return
    assert isinstance(convs, list)
    for c in convs:
        assert isinstance(c, Conversation)
        for m in c.messages:
            assert isinstance(m.speaker, str) and isinstance(m.text, str)
            assert m.time is None or isinstance(m.time, str)
    convs, _ = clean_messages(convs, aliases={}, max_chars=50, scrub=Scrubber(), dropped=Counter())
    convs = number(split_sessions(convs, 1))
    speaker_stats(convs)
    for c in convs:
        json.dumps(c.to_json(), ensure_ascii=False)


@SETTINGS
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data):
    check(data)


@SETTINGS
@given(st.text(max_size=2000), st.sampled_from(("auto",) + FORMATS))
def test_arbitrary_text_as_any_format(text, fmt):
    check(text, fmt)


WA_PIECES = st.sampled_from(
    [
        "01/02/2024, 10:00 - ",
        "[1/2/24, 10:00:00 PM] ",
        "[31/12/2024, 23:59:59] ",
        "13/13/2024, 25:61 - ",
        "99.99.99, 99.99 - ",
        "2024-01-02, 10:00 - ",
        "1/2/24, 10:00\u202fPM - ",
        "\u200e",
        "\u200f",
        "\ufeff",
        "Ana: ",
        "Ben: ",
        "李雷: ",
        ": ",
        ":",
        "\n",
        "\r\n",
        "\r",
        "<Media omitted>",
        "image omitted",
        "\u200e<attached: x.jpg>",
        "IMG-1.jpg (file attached)",
        "null",
        "This message was deleted",
        "<This message was edited>",
        "Messages and calls are end-to-end encrypted.",
        "Ana added Ben",
        "Missed voice call",
        "a@b.co",
        "+1 555 123 4567",
        "https://x.y/z",
        "4111 1111 1111 1111",
        " ",
        "[",
        "]",
    ]
)


@SETTINGS
@given(st.lists(WA_PIECES | st.text(max_size=12), max_size=80).map("".join))
def test_whatsapp_like_text(text):
    check(text)
    check(text, "whatsapp", max_speakers=3)


KEYS = [
    "messages",
    "chats",
    "list",
    "left_chats",
    "type",
    "from",
    "from_id",
    "text",
    "date",
    "name",
    "id",
    "guild",
    "channel",
    "author",
    "content",
    "timestamp",
    "attachments",
    "stickers",
    "nickname",
    "prompt",
    "response",
    "completion",
    "speaker",
    "time",
    "sender",
    "photo",
    "media_type",
    "source",
]
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(
        [
            "message",
            "service",
            "Default",
            "Reply",
            "2024-01-02T10:00:00",
            "2024-01-02T10:00:00Z",
            "[A] hi\n[B]",
            "[SYS] x [/SYS] [USER] [A] yo\n\nHow does the conversation continue? [/USER]",
        ]
    )
)
JSON = st.recursive(
    LEAVES,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.sampled_from(KEYS), kids, max_size=4),
    max_leaves=8,
)
VALUE = LEAVES | st.lists(LEAVES, max_size=3)
MESSAGE_LIKE = st.dictionaries(st.sampled_from(KEYS), VALUE, max_size=7)
SHAPES = st.one_of(
    JSON,
    st.fixed_dictionaries({"name": VALUE, "type": VALUE, "messages": st.lists(MESSAGE_LIKE, max_size=6)}),
    st.fixed_dictionaries(
        {
            "chats": st.fixed_dictionaries(
                {
                    "list": st.lists(
                        st.fixed_dictionaries({"name": VALUE, "messages": st.lists(MESSAGE_LIKE, max_size=4)}),
                        max_size=3,
                    )
                }
            )
        }
    ),
    st.fixed_dictionaries({"guild": VALUE, "channel": VALUE, "messages": st.lists(MESSAGE_LIKE, max_size=6)}),
    st.lists(st.fixed_dictionaries({"prompt": VALUE | st.text(max_size=60), "response": VALUE}), max_size=5),
    st.dictionaries(
        st.text(max_size=5),
        st.fixed_dictionaries({"messages": st.lists(st.lists(MESSAGE_LIKE, max_size=3) | VALUE, max_size=3)}),
        min_size=1,
        max_size=3,
    ),
    st.fixed_dictionaries({"id": VALUE, "messages": st.lists(MESSAGE_LIKE, max_size=5)}),
)


@SETTINGS
@given(SHAPES, st.sampled_from(("auto", "telegram", "discord", "pairs", "chitchat", "jsonl")), st.booleans())
def test_json_near_misses(obj, fmt, top_pair):
    text = json.dumps(obj, ensure_ascii=False)
    check(text, fmt, top_pair=top_pair, chats=None)
    if fmt == "jsonl":
        check(text + "\n" + text + "\n", "auto")


@SETTINGS
@given(
    st.lists(
        st.lists(
            st.text(max_size=15)
            | st.sampled_from(
                ["", "2024-01-02T10:00:00+00:00", "01-Mar-24 06:05 PM", "Joined the server.", '=HYPERLINK("x")']
            ),
            max_size=8,
        ),
        max_size=12,
    ),
    st.booleans(),
)
def test_discord_csv_rows(rows, header):
    buf = io.StringIO()
    w = csv.writer(buf)
    if header:
        w.writerow(["AuthorID", "Author", "Date", "Content", "Attachments", "Reactions"])
    w.writerows(rows)
    check(buf.getvalue())
    check(buf.getvalue(), "discord")


@SETTINGS
@given(st.binary(max_size=2048))
def test_zip_bytes(data):
    try:
        _zip_members(b"PK\x03\x04" + data, "fuzz.zip", _Budget(1 << 20))
    except UserError:
        pass


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=20),
            st.binary(max_size=300) | WA_PIECES.map(str.encode),
        ),
        max_size=5,
        unique_by=lambda e: e[0],
    )
)
def test_zips_with_odd_entries(entries):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries:
            z.writestr(name, data)
    try:
        blobs = _zip_members(buf.getvalue(), "fuzz.zip", _Budget(1 << 20))
    except UserError:
        return
    for b in blobs:
        check(b.data)


@SETTINGS
@given(
    st.text(max_size=400)
    | st.lists(WA_PIECES | st.text(alphabet="0123456789 .-+()@:/wx", max_size=12), max_size=30).map("".join)
)
@example("0@0.AA+00000002")  # a number after an address: its placeholder must not open a new match
def test_scrubber_never_raises_and_is_stable(text):
    s = Scrubber()
    once = s(text)
    assert s(once) == once
    s.name(text)
