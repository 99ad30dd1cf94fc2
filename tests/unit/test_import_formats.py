"""Each export format and its quirks, on the hand-written fixtures in tests/data/exports/.

python -m pytest tests/unit/test_import_formats.py -q
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from convsim.data.importers import Report, parse, sniff
from convsim.data.importers.sources import read_sources
from convsim.errors import UserError

EXPORTS = Path(__file__).parents[1] / "data" / "exports"


def load(rel: str, **options):
    report = Report()
    convs = parse((EXPORTS / rel).read_bytes(), Path(rel).name, report, **options)
    msgs = [m for c in convs for m in c.messages]
    return convs, msgs, report


def triples(msgs):
    return [(m.speaker, m.text, m.time) for m in msgs]


# --- WhatsApp -------------------------------------------------------------------------------------


def test_whatsapp_android_us_12h():
    convs, msgs, r = load("whatsapp/android_us_12h.txt")
    assert r.notes["format"] == "whatsapp" and r.notes["date_order"].startswith("MDY")
    assert triples(msgs)[:5] == [
        ("Ana López", "hey!! are you coming tomorrow?", "2024-01-05T22:00:00"),
        ("Ben", "yes", "2024-01-05T22:01:00"),
        ("Ben", "what time again", "2024-01-05T22:01:00"),
        ("Ana López", "7ish\nbring the thing\nyou know which one", "2024-01-05T22:02:00"),  # one message
        ("Ben", "ok see you", "2024-01-05T22:04:00"),  # <This message was edited> removed
    ]
    assert msgs[5].time == "2024-01-13T08:15:00" and msgs[-1] == msgs[-1].__class__(
        "Caro", "hi all", "2024-01-13T12:46:00"
    )
    assert r.read == 14 and r.dropped == {"system": 2, "media": 1, "deleted": 1}
    assert len(convs) == 1  # sessions are split later, by clean.split_sessions


def test_whatsapp_android_24h_day_first_captions_and_system_with_colon():
    _, msgs, r = load("whatsapp/android_eu_24h.txt")
    assert r.notes["date_order"].startswith("DMY")
    assert ("Jörg", "unser Hund 🐶", "2024-02-13T18:35:00") in triples(msgs)  # caption of a media message
    assert [m.speaker for m in msgs] == ["Zoë", "Jörg", "Zoë", "Jörg", "Zoë"]
    # 'Zoë changed the subject from "Hund" to "Hunde: 2"' has ": " but is an event, not a speaker
    assert r.dropped == {"media": 1, "system": 2}


def test_whatsapp_dotted_two_digit_years():
    _, msgs, _ = load("whatsapp/android_de_dots.txt")
    assert [m.time for m in msgs] == [
        "2024-02-28T07:45:00",
        "2024-02-28T07:46:00",
        "2024-02-28T07:46:00",
        "2024-03-01T19:00:00",
    ]


def test_whatsapp_narrow_no_break_space_and_midnight():
    _, msgs, _ = load("whatsapp/android_nnbsp.txt")
    assert [m.time for m in msgs] == [
        "2024-01-05T22:00:00",
        "2024-01-05T22:01:00",
        "2024-01-05T23:59:00",
        "2024-01-06T00:10:00",
    ]


def test_whatsapp_ios_marks_unicode_names_media_and_events():
    _, msgs, r = load("whatsapp/ios_lrm.txt")
    assert r.notes["date_order"].startswith("DMY")
    assert [m.speaker for m in msgs] == ["Riya", "李雷", "李雷", "+44 7700 900123", "Riya", "Riya", "سارة"]
    assert "\u200e" not in "".join(m.speaker + m.text for m in msgs)
    assert ("李雷", "look at this view", "2024-03-02T21:18:30") in triples(msgs)  # attachment caption
    assert "Weekend crew" not in {m.speaker for m in msgs}  # iOS notices come "from" the group
    assert r.dropped == {"system": 3, "media": 2, "deleted": 1}
    assert msgs[-1].text == "صباح الخير"


def test_whatsapp_ios_12h_month_first_from_order():
    _, msgs, r = load("whatsapp/ios_us_12h.txt")
    assert r.notes["date_order"].startswith("MDY")
    assert [m.time for m in msgs] == [
        "2024-01-02T10:00:00",
        "2024-01-02T10:00:05",
        "2024-01-03T21:30:10",
        "2024-02-01T12:00:00",
    ]
    assert r.dropped == {"media": 1}


def test_whatsapp_crlf_and_bom():
    raw = (EXPORTS / "whatsapp/ios_crlf_bom.txt").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw  # the fixture really has both
    _, msgs, _ = load("whatsapp/ios_crlf_bom.txt")
    assert triples(msgs) == [
        ("Mila", "bom and crlf", "2024-04-01T08:01:00"),
        ("Teo", "second line follows\nstill Teo", "2024-04-01T08:02:00"),
        ("Mila", "ok", "2024-04-01T08:03:00"),
    ]


def test_whatsapp_dates_ambiguous_are_decided_from_the_whole_file():
    _, msgs, r = load("whatsapp/ambiguous_by_order.txt")
    assert r.notes["date_order"].startswith("MDY")  # 24-hour clock, but only month-first runs in order
    assert [m.time[:10] for m in msgs] == ["2024-01-02", "2024-01-03", "2024-02-01"]
    _, msgs, r = load("whatsapp/ambiguous_single_day.txt")
    assert r.notes["date_order"].startswith("DMY") and "ambiguous" in r.notes["date_order"]
    assert msgs[0].time == "2024-04-03T20:00:00"


def test_whatsapp_day_first_decided_by_a_late_line():
    lines = [f"0{d}/01/2024, 10:0{d} - {'Ana' if d % 2 else 'Ben'}: m{d}" for d in range(1, 10)]
    lines.append("13/01/2024, 10:00 - Ana: the 13th settles it")
    report = Report()
    convs = parse("\n".join(lines), "x.txt", report)
    assert report.notes["date_order"].startswith("DMY")
    assert convs[0].messages[0].time == "2024-01-01T10:01:00"


def test_whatsapp_invalid_timestamp_line_continues_previous_message():
    text = "01/02/2024, 10:00 - Ana: quoting:\n31/02/2024, 10:00 - Ben: fake\n01/02/2024, 10:01 - Ben: ok\n"
    convs = parse(text, "x.txt", Report())
    assert [m.text for m in convs[0].messages] == ["quoting:\n31/02/2024, 10:00 - Ben: fake", "ok"]


@pytest.mark.parametrize(
    "zip_name, speakers", [("android_export.zip", {"Zoë", "Jörg"}), ("ios_export.zip", {"Riya", "李雷"})]
)
def test_whatsapp_zips_read_in_memory(zip_name, speakers, monkeypatch, tmp_path):
    def refuse(*a, **k):
        raise AssertionError("zip entries must not be extracted to disk")

    monkeypatch.setattr(zipfile.ZipFile, "extract", refuse)
    monkeypatch.setattr(zipfile.ZipFile, "extractall", refuse)
    monkeypatch.chdir(tmp_path)
    blobs = read_sources([str(EXPORTS / "whatsapp" / zip_name)], 1 << 30)
    assert len(blobs) == 1 and blobs[0].name.startswith(zip_name + "/")  # media and __MACOSX skipped
    convs = parse(blobs[0].data, blobs[0].name, Report())
    assert {m.speaker for c in convs for m in c.messages} == speakers
    assert list(tmp_path.iterdir()) == []


# --- Telegram -------------------------------------------------------------------------------------


def test_telegram_single_chat():
    convs, msgs, r = load("telegram/single_chat.json")
    assert r.notes["format"] == "telegram" and convs[0].source == "telegram:single_chat.json#Ana"
    assert triples(msgs) == [
        ("Ana", "hi Ben! 🎉", "2024-01-02T10:05:00"),
        ("Ben Ковалёв", "see https://t.me/somewhere and this", "2024-01-02T10:06:00"),  # entity list joined
        ("Ana", "our cat", "2024-01-02T10:07:30"),  # photo caption kept
        ("Ben Ковалёв", "line one\nline two", "2024-01-02T10:09:00"),
        ("Deleted Account", "sent from an account deleted since", "2024-01-02T10:11:00"),
        ("Ana", "next day", "2024-01-03T09:00:00"),
    ]
    assert r.read == 9 and r.dropped == {"system": 1, "media": 2}


def test_telegram_account_export_all_chats_and_chosen_ones():
    convs, msgs, r = load("telegram/account_export.json")
    assert [c.source.split("#")[1] for c in convs] == ["Ana", "Family 👨‍👩‍👧", "Saved Messages"]
    assert r.dropped == {"media": 2, "system": 2}
    convs, msgs, r = load("telegram/account_export.json", chats=["Ana", "777"])  # by name and by id
    assert [c.source.split("#")[1] for c in convs] == ["Ana", "Family 👨‍👩‍👧"]
    assert r.dropped["chat_not_selected"] == 1
    with pytest.raises(UserError, match="no chat named 'Nobody'.*'Ana'"):
        load("telegram/account_export.json", chats=["Nobody"])


# --- Discord --------------------------------------------------------------------------------------


def test_discord_csv():
    convs, msgs, r = load("discord/dce.csv")
    assert r.notes["format"] == "discord"
    assert triples(msgs) == [
        ("riya#0001", 'hey, "quotes" and commas, fine?', "2024-03-01T18:00:00+00:00"),
        ("Friend Ö", "multi\nline message", "2024-03-01T18:01:00+00:00"),
        ("riya#0001", "caption for the pic", "2024-03-01T18:02:00+00:00"),
        ("riya#0001", "old exporter date format", "2024-03-01T18:05:00"),
    ]
    assert r.dropped == {"media": 1, "system": 2}


def test_discord_json():
    convs, msgs, r = load("discord/dce.json")
    assert convs[0].source == "discord:dce.json#riya"
    assert triples(msgs) == [
        ("Riya", "hi from json", "2024-03-01T18:00:00.123000+00:00"),
        ("Friend Ö", "replying\nover two lines", "2024-03-01T18:01:00+00:00"),
        ("Riya", "that was fun", "2024-03-01T18:11:00+00:00"),
    ]
    assert r.dropped == {"system": 2, "media": 2}


# --- the seed project's prompt/response pairs ---------------------------------------------------


def test_pairs_base_windows_stitched():
    convs, _, r = load("pairs/base.json")
    assert [[(m.speaker, m.text) for m in c.messages] for c in convs] == [
        [("Riya", "hi"), ("FRIEND", "hey"), ("Riya", "how are you?\nall good?"), ("FRIEND", "great"), ("Riya", "nice")],
        [("FRIEND", "new day"), ("Riya", "morning"), ("FRIEND", "coffee?")],
    ]
    assert all(m.time is None for c in convs for m in c.messages)
    assert r.notes["records"] == 6


def test_pairs_instruct_unwrapped_and_deduplicated():
    convs, _, r = load("pairs/instruct.json")
    assert len(convs) == 1
    assert [(m.speaker, m.text) for m in convs[0].messages] == [
        ("FRIEND", "yo"),
        ("Riya", "sup"),
        ("FRIEND", "movie tonight?"),
        ("Riya", "which one"),
        ("FRIEND", "dune 2"),
        ("Riya", "ok"),
        ("Riya", "8pm?"),
    ]
    assert r.notes["records_inside_earlier_ones"] == 1
    assert not any("[SYS]" in m.text or "How does" in m.text for m in convs[0].messages)


def test_pairs_json_lines():
    text = '{"prompt": "[A] hi\\n[B]", "response": " yo"}\n{"prompt": "[A] hi\\n[B] yo\\n[A]", "response": " sup"}\n'
    report = Report()
    convs = parse(text, "pairs.jsonl", report)
    assert report.notes["format"] == "pairs"
    assert [(m.speaker, m.text) for m in convs[0].messages] == [("A", "hi"), ("B", "yo"), ("A", "sup")]


# --- chitchat -------------------------------------------------------------------------------------


def test_chitchat_mini_names_and_pairs():
    convs, msgs, r = load("chitchat/mini.json")
    assert r.notes["format"] == "chitchat" and len(convs) == 4
    assert r.notes["speaker_names"]["549cc1d1"] == "549cc1d1-270e-4a53-b561-133a8d0086b4"
    assert msgs[0].speaker == "549cc1d1" and msgs[0].time == "2018-05-02T19:38:15+00:00"
    assert r.dropped == {"empty": 1}
    convs, msgs, r = load("chitchat/mini.json", top_pair=True)
    assert {m.speaker for m in msgs} == {"549cc1d1", "a54af4d5"} and len(convs) == 2
    assert r.dropped["pair_not_selected"] == 3
    convs, _, _ = load("chitchat/mini.json", pair=("720840be-e522-47ba-9e9f-143f66372673", "549cc1d1"))
    assert [c.source for c in convs] == ["chitchat:c3"]
    with pytest.raises(UserError, match="matches no sender"):
        load("chitchat/mini.json", pair=("deadbeef", "549cc1d1"))


# --- JSONL (our own schema) -----------------------------------------------------------------------


def test_jsonl_roundtrip_and_bad_times():
    convs, msgs, r = load("jsonl/conversations.jsonl")
    assert r.notes["format"] == "jsonl" and [c.id for c in convs] == ["c0001", "c0002"]
    assert msgs[0].time == "2024-01-02T10:00:00+00:00" and msgs[2].time is None
    assert r.notes["unreadable_times"] == 1
    assert msgs[-1].text == "line one\nline two"


# --- detection ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rel, fmt",
    [
        ("whatsapp/android_us_12h.txt", "whatsapp"),
        ("whatsapp/ios_us_12h.txt", "whatsapp"),
        ("whatsapp/ios_crlf_bom.txt", "whatsapp"),
        ("telegram/single_chat.json", "telegram"),
        ("telegram/account_export.json", "telegram"),
        ("discord/dce.csv", "discord"),
        ("discord/dce.json", "discord"),
        ("pairs/base.json", "pairs"),
        ("pairs/instruct.json", "pairs"),
        ("chitchat/mini.json", "chitchat"),
        ("jsonl/conversations.jsonl", "jsonl"),
    ],
)
def test_detection(rel, fmt):
    found, _ = sniff((EXPORTS / rel).read_bytes(), rel, Report())
    assert found == fmt


def test_forced_format_mismatch_is_a_user_error():
    with pytest.raises(UserError):
        parse((EXPORTS / "whatsapp/android_us_12h.txt").read_bytes(), "chat.txt", Report(), fmt="telegram")
    with pytest.raises(UserError):
        parse((EXPORTS / "telegram/single_chat.json").read_bytes(), "r.json", Report(), fmt="whatsapp")


def test_utf16_with_bom_is_read():
    text = (EXPORTS / "whatsapp/android_de_dots.txt").read_text(encoding="utf-8")
    convs = parse(text.encode("utf-16"), "utf16.txt", Report())
    assert convs[0].messages[0].text == "Bus kommt nicht"


def test_every_fixture_is_small():
    for p in EXPORTS.rglob("*"):
        if p.is_file():
            assert p.stat().st_size < 50_000, p


def test_whatsapp_call_notices_and_view_once():
    text = (
        "[1/2/24, 10:00:00] Ana: \u200eVoice call, \u200e12 min\n[1/2/24, 10:01:00] Ben: ok\n"
        "[1/2/24, 10:02:00] Ana: \u200eMissed group video call\n[1/2/24, 10:03:00] Ben: null\n"
        "[1/2/24, 10:04:00] Ana: video call later?\n"
    )
    report = Report()
    convs = parse(text, "calls.txt", report)
    assert [m.text for m in convs[0].messages] == ["ok", "video call later?"]
    assert report.dropped == {"system": 2, "media": 1}
