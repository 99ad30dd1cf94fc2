"""Times are compared as instants, whatever UTC offset each export wrote: the time split, the `--extra-data`
cut-off, the most-recent selection, session gaps and the merge of multi-file chats order by the moment a
message was sent, not by its ISO string. A time without an offset counts as UTC.

    pytest tests/unit/test_times.py
"""

import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from convsim.data.clean import split_sessions
from convsim.data.examples import split_conversations
from convsim.data.schema import Conversation, Message, instant, write_conversations
from convsim.training.data import extra_conversations, most_recent

BASE = datetime(2024, 3, 30, tzinfo=timezone.utc)  # across a DST change in most of Europe
offsets = st.integers(-14 * 4, 14 * 4).map(lambda q: timezone(timedelta(minutes=15 * q)))
# distinct instants a few minutes to a few hours apart, each written with its own offset
moments = st.lists(st.integers(0, 3 * 24 * 60), min_size=4, max_size=24, unique=True)


def stamp(minutes: int, tz) -> str:
    """The moment BASE + minutes, written with offset `tz` (None: without an offset, in UTC)."""
    d = BASE + timedelta(minutes=minutes)
    return d.replace(tzinfo=None).isoformat() if tz is None else d.astimezone(tz).isoformat()


def first(c) -> float:
    return instant(c.messages[0].time)


@st.composite
def conversations(draw):
    starts = draw(moments)
    convs = []
    for i, m in enumerate(starts):
        tz = draw(offsets)
        msgs = [Message("Ana", "hi", stamp(m, tz)), Message("Ben", "yo", stamp(m + 1, draw(offsets)))]
        convs.append(Conversation(f"c{i}", msgs))
    return convs


@settings(max_examples=200, deadline=None)
@given(conversations())
def test_time_split_orders_by_instant(convs):
    split = split_conversations(convs, val=0.25, test=0.25)
    t = {k: [first(c) for c in v] for k, v in split.items()}
    assert t["val"] and t["test"]
    assert max(t["train"]) < min(t["val"]) and max(t["val"]) < min(t["test"])


@st.composite
def long_sessions(draw):
    """A few sessions of several bursts each, every message written with its own offset; sessions an hour
    apart at least, so a cut inside one must keep its earlier part in the earlier split."""
    starts = draw(st.lists(st.integers(0, 72), min_size=1, max_size=5, unique=True))
    convs = []
    for i, h in enumerate(starts):  # listed in no particular time order
        n = draw(st.integers(2, 12))
        msgs = [
            Message("Ana" if j % 2 == 0 else "Ben", f"c{i}m{j}", stamp(60 * h + j, draw(offsets))) for j in range(n)
        ]
        convs.append(Conversation(f"c{i}", msgs))
    return convs


@settings(max_examples=200, deadline=None)
@given(long_sessions())
def test_reply_share_split_cuts_sessions_in_instant_order(convs):
    split = split_conversations(convs, val=0.2, test=0.2)
    t = {k: [instant(m.time) for c in v for m in c.messages] for k, v in split.items()}
    assert sorted(x for v in t.values() for x in v) == sorted(instant(m.time) for c in convs for m in c.messages)
    if t["val"]:
        assert max(t["train"]) < min(t["val"])
    if t["test"]:
        assert max(t["train"] + t["val"]) < min(t["test"])


@settings(max_examples=100, deadline=None)
@given(conversations(), st.lists(st.tuples(st.integers(0, 3 * 24 * 60), offsets), min_size=1, max_size=30))
def test_extra_data_cutoff_compares_instants(convs, extra):
    split = split_conversations(convs, val=0.25, test=0.25)
    cutoff = min(first(c) for c in split["val"] + split["test"])
    msgs = [Message("Ana", f"m{i}", stamp(m, tz)) for i, (m, tz) in enumerate(extra)]
    with tempfile.TemporaryDirectory() as d:
        write_conversations(Path(d) / "conversations.jsonl", [Conversation("e0", msgs)])
        got = extra_conversations([d], split)
    kept = {m.text for c in got for m in c.messages}
    want = {m.text for m in msgs if instant(m.time) < cutoff}
    assert kept == want


@settings(max_examples=100, deadline=None)
@given(conversations())
def test_most_recent_keeps_the_latest_instants(convs):
    kept = most_recent(convs, max_messages=4)  # two conversations of two messages
    latest = sorted(convs, key=first)[-2:]
    assert {c.id for c in kept} == {c.id for c in latest}


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 600), st.integers(1, 600), offsets | st.none(), offsets | st.none())
def test_session_gap_is_measured_between_instants(start, gap, tz0, tz1):
    msgs = [Message("Ana", "a", stamp(start, tz0)), Message("Ben", "b", stamp(start + gap, tz1))]
    parts = split_sessions([Conversation("c", msgs, "s")], gap_minutes=60)
    assert len(parts) == (2 if gap > 60 else 1)


@settings(max_examples=100, deadline=None)
@given(moments, st.data())
def test_multi_file_chat_parts_merge_in_instant_order(minutes, data):
    from convsim.data.selection import merge_split

    msgs = [Message("Ana", str(m), stamp(m, data.draw(offsets | st.none()))) for m in minutes]
    half = len(msgs) // 2
    parts = [Conversation("a", msgs[:half], "instagram:x"), Conversation("b", msgs[half:], "instagram:x")]
    (merged,) = merge_split(parts)
    assert [int(m.text) for m in merged.messages] == sorted(minutes)


def test_a_time_without_offset_is_utc():
    assert instant("2024-01-01T10:00:00") == instant("2024-01-01T10:00:00+00:00") == instant("2024-01-01T12:00+02:00")
    assert instant(None) is None and instant("not a time") is None
