"""Cleaning (aliases, limits, PII scrubbing, session split) and `convsim stats`' numbers.

python -m pytest tests/unit/test_import_clean.py -q
"""

from __future__ import annotations

from collections import Counter

import pytest

from convsim.data.clean import Scrubber, clean_messages, number, split_sessions
from convsim.data.schema import Conversation, Message
from convsim.data.stats import speaker_stats


def conv(*msgs, source="x"):
    return Conversation(id="", messages=[Message(*m) for m in msgs], source=source)


# --- scrubbing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, kind",
    [
        ("write to ana.lopez+x@example.co.uk now", "EMAIL"),
        ("call +1 (555) 123-4567", "PHONE"),
        ("call 555-123-4567", "PHONE"),
        ("(555) 123-4567", "PHONE"),
        ("+44 20 7946 0958", "PHONE"),
        ("07700 900123", "PHONE"),
        ("06 12 34 56 78", "PHONE"),
        ("+4915112345678", "PHONE"),
        ("0044 20 7946 0958", "PHONE"),
        ("see https://example.com/a?b=1", "URL"),
        ("www.example.org/x", "URL"),
        ("ftp://files.example.net", "URL"),
        ("host 192.168.0.1 down", "IP"),
        ("fe80::1 is local", "IP"),
        ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "IP"),
        ("card 4111 1111 1111 1111", "CARD"),
        ("4111-1111-1111-1111", "CARD"),
        ("4111111111111111", "CARD"),
        ("1234 5678 9012 3456", "CARD"),
        ("amex 3782 822463 10005", "CARD"),
    ],
)
def test_scrub_finds(text, kind):
    s = Scrubber()
    out = s(text)
    assert f"<{kind}_1>" in out and s.counts[kind] == 1, out


@pytest.mark.parametrize(
    "text",
    [
        "2020-12-31",
        "31.12.2020 10:15",
        "10:15:30",
        "3.14159",
        "$1,000,000",
        "12/31/2020",
        "v1.2.3",
        "1000000000 views",
        "order 123456789012",
        "555-1234",
        "12345",
        "1 2 3 4 5 6 7 8 9 10 11 12 13",
        "0101101001010",
        "ratio 1:2:3",
        "@channel hi",
        "a@b",
        "score 10-20-30-40",
    ],
)
def test_scrub_leaves_alone(text):
    s = Scrubber()
    assert s(text) == text and sum(s.counts.values()) == 0


def test_scrub_placeholders_are_stable_and_numbered_by_first_appearance():
    s = Scrubber()
    a = s("mail ana@example.com or ben@example.com")
    b = s("again: ANA@example.com, and https://x.example/p.")
    assert a == "mail <EMAIL_1> or <EMAIL_2>"
    assert b == "again: <EMAIL_1>, and <URL_1>."  # case-insensitive address, trailing dot kept outside
    assert s.counts["EMAIL"] == 3 and s.summary()["EMAIL"] == {"replaced": 3, "distinct": 2}
    assert s("+1 555 123 4567") == s("+1 (555) 123-4567") == "<PHONE_1>"  # same digits, same number


def test_scrub_is_idempotent_and_names_only_when_whole():
    s = Scrubber()
    once = s("ip 10.0.0.1, mail a@b.io, call +44 7700 900123, card 4111111111111111")
    assert s(once) == once
    assert s.name("\u202a+44 7700 900123\u202c") == "<PHONE_1>"
    assert s.name("Ana 2") == "Ana 2" and s.name("Ben (555) 123-4567 work") == "Ben (555) 123-4567 work"


def test_scrub_is_fast_on_hostile_text():
    import time

    s = Scrubber()
    t = time.perf_counter()
    for text in ("1" * 20000, "a1" * 10000, "1." * 10000, "a.b" * 7000 + "@", "http://" * 3000, "1:" * 10000):
        s(text)
    assert time.perf_counter() - t < 2.0


# --- clean_messages ------------------------------------------------------------------------------


def test_clean_aliases_strip_empty_truncate_and_scrub():
    dropped = Counter()
    convs = [
        conv(
            ("Annie", "  hi  ", None),
            ("Ben", " \n ", None),
            ("Ana", "x" * 30, None),
            ("Ben", "mail me: ben@example.com", None),
        ),
        conv(("Ben", "", None)),
    ]
    out, truncated = clean_messages(convs, aliases={"Annie": "Ana"}, max_chars=20, scrub=Scrubber(), dropped=dropped)
    assert [(m.speaker, m.text) for m in out[0].messages] == [
        ("Ana", "hi"),
        ("Ana", "x" * 20),
        ("Ben", "mail me: <EMAIL_1>"),
    ]
    assert truncated == 1 and dropped == {"empty": 2} and len(out) == 1
    # scrubbing comes before truncation: a cut never leaves part of an address behind
    out, _ = clean_messages(
        [conv(("A", "ben@example.com is me", None))], aliases={}, max_chars=5, scrub=Scrubber(), dropped=Counter()
    )
    assert out[0].messages[0].text == "<EMAI"


def test_clean_without_scrub_keeps_pii():
    out, _ = clean_messages(
        [conv(("A", "ben@example.com", None))], aliases={}, max_chars=100, scrub=None, dropped=Counter()
    )
    assert out[0].messages[0].text == "ben@example.com"


# --- sessions --------------------------------------------------------------------------------------


def test_split_sessions_by_gap():
    c = conv(
        ("A", "1", "2024-01-01T10:00:00"),
        ("B", "2", "2024-01-01T12:00:00"),  # exactly 120 min: same
        ("A", "3", "2024-01-01T14:00:01"),  # 120 min 1 s: new
        ("B", "4", None),  # no time: never splits
        ("A", "5", "2024-01-01T13:00:00"),  # backwards: no split
        ("B", "6", "2024-01-02T09:00:00+00:00"),
    )  # aware after naive: compared as instants, the naive time taken as UTC (19 h later: a split)
    out = number(split_sessions([c], 120))
    assert [[m.text for m in x.messages] for x in out] == [["1", "2"], ["3", "4", "5"], ["6"]]
    assert [x.id for x in out] == ["c0001", "c0002", "c0003"] and all(x.source == "x" for x in out)
    assert len(split_sessions([c], 0)) == 1  # 0 turns splitting off
    assert len(split_sessions([c], 30)) == 4


def test_number_widens_ids():
    convs = number([conv(("A", "x", None)) for _ in range(12345)])
    assert convs[0].id == "c00001" and convs[-1].id == "c12345"


# --- stats -----------------------------------------------------------------------------------------


def test_speaker_stats():
    convs = [
        conv(
            ("A", "hello there", "2024-01-01T10:00:00"),
            ("A", "you", "2024-01-01T10:00:10"),
            ("B", "hi", "2024-01-01T10:01:10"),
            ("A", "ok ok ok", "2024-01-01T10:01:40"),
        ),
        conv(("B", "new day", None), ("A", "yes", None)),
    ]
    s = speaker_stats(convs)
    assert s["conversations"] == 2 and s["messages"] == 6
    a, b = s["speakers"]["A"], s["speakers"]["B"]
    assert list(s["speakers"]) == ["A", "B"]
    assert a["messages"] == 4 and a["chars_median"] == 5.5 and a["words_median"] == 1.5
    assert a["bursts"] == 3 and a["burst_median"] == 1 and a["burst_mean"] == pytest.approx(4 / 3, abs=1e-3)
    assert a["reply_delay_s_median"] == 30 and b["reply_delay_s_median"] == 60  # only timed replies
    assert b["bursts"] == 2 and b["replies_timed"] == 1
