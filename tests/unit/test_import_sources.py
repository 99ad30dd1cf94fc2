"""The import sources beyond WhatsApp, Telegram and Discord, on the hand-written fixtures in
tests/data/exports/ (Messenger, Instagram, iMessage, Slack, Signal, Google Chat, LINE), and the
whole-account choices (`--list`, `--chat`, `--pair`, `--person`).

    python -m pytest tests/unit/test_import_sources.py -q

The fixtures follow the real exports' structure (see tests/data/make/ for the two that are built by a
script: Messenger/Instagram, whose text Facebook writes as mojibake, and the SQLite chat.db files).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from convsim.data.import_cli import import_chats, list_chats
from convsim.data.importers import Report, parse, sniff
from convsim.data.importers.bundles import group
from convsim.data.importers.imessage import apple_time, typedstream_text
from convsim.data.importers.messenger import fix_mojibake
from convsim.data.importers.sources import read_sources
from convsim.errors import UserError

EXPORTS = Path(__file__).parents[1] / "data" / "exports"
FB = EXPORTS / "messenger" / "your_facebook_activity" / "messages" / "inbox"
IG = EXPORTS / "instagram" / "your_instagram_activity" / "messages" / "inbox"
SLACK = EXPORTS / "slack" / "acme-slack-export"
GCHAT = EXPORTS / "googlechat" / "Takeout" / "Google Chat" / "Groups"


def load(path: Path, name: str | None = None, **options):
    report = Report()
    convs = parse(path.read_bytes(), name or path.relative_to(EXPORTS).as_posix(), report, **options)
    return convs, [m for c in convs for m in c.messages], report


def counts(msgs) -> dict:
    return dict(Counter(m.speaker for m in msgs))


def imported(*srcs, **options):
    return import_chats([str(s) for s in srcs], **options)


# --- Messenger and Instagram ----------------------------------------------------------------------


def test_mojibake_repair():
    assert fix_mojibake("caf\u00c3\u00a9") == "café"
    assert fix_mojibake("\u00f0\u009f\u0098\u0080") == "😀"  # four escaped bytes, one emoji
    assert fix_mojibake("café") == "café"  # already text: left alone
    assert fix_mojibake("plain ascii") == "plain ascii"
    assert fix_mojibake("😀 and Ã©") == "😀 and Ã©"  # not all latin-1: not mojibake


def test_messenger_file_newest_first_mojibake_and_drops():
    raw = (FB / "benkovac_10223" / "message_1.json").read_bytes()
    assert raw.isascii() and b"\\u00c3\\u00bc" in raw  # the fixture really is escaped like Facebook's
    convs, msgs, r = load(FB / "benkovac_10223" / "message_1.json")
    assert r.notes["format"] == "messenger" and len(convs) == 1
    assert [(m.speaker, m.text, m.time) for m in msgs] == [
        ("Ben Kovač", "Zürich was great\nsecond line", "2024-01-05T18:05:10+00:00"),
        ("Ana López", "https://example.org/trip", "2024-01-05T18:06:00+00:00"),
        ("Ben Kovač", "naïve question: dinner? 🍝", "2024-01-05T18:08:00+00:00"),
    ]
    assert r.read == 7 and r.dropped == {"system": 1, "media": 2, "reaction": 1}
    assert convs[0].source.endswith("benkovac_10223#Ben Kovač")


def test_messenger_group_events_dropped_sentences_kept():
    _, msgs, r = load(FB / "viagem_55501" / "message_1.json")
    assert counts(msgs) == {"Caro Šimić": 1, "Ben Kovač": 2, "Ana López": 1}
    assert msgs[-1].text == "she left the group chat but not the trip, right?"
    assert r.dropped == {"system": 4, "media": 1}


def test_messenger_folder_joins_split_files_in_time_order():
    convs, summary = imported(EXPORTS / "messenger", gap_minutes=0, scrub=False)
    by_chat = {c.source.split("#")[1]: c for c in convs}
    ben = by_chat["Ben Kovač"]
    assert [m.text for m in ben.messages] == [
        "olá Ben! café amanhã? ☕",
        "sí, a las 10 😀",
        "mail me: ana.lopez@example.com",
        "Zürich was great\nsecond line",
        "https://example.org/trip",
        "naïve question: dinner? 🍝",
    ]
    assert summary["speakers"] == {"Ben Kovač": 5, "Ana López": 4, "Caro Šimić": 1}
    assert summary["read"] == 22 and summary["dropped"] == {"system": 6, "media": 4, "deleted": 1, "reaction": 1}


def test_messenger_zip_and_scrubbing(tmp_path):
    z = tmp_path / "facebook-ana-2024.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in (EXPORTS / "messenger").rglob("*.json"):
            zf.write(p, p.relative_to(EXPORTS / "messenger").as_posix())
        zf.writestr("your_facebook_activity/messages/inbox/benkovac_10223/photos/1.jpg", b"\xff\xd8not read")
        zf.writestr("personal_information/profile_information/profile_information.json", '{"profile_v2": {}}')
    convs, summary = imported(z, gap_minutes=0)
    assert summary["speakers"] == {"Ben Kovač": 5, "Ana López": 4, "Caro Šimić": 1}
    text = json.dumps([c.to_json() for c in convs], ensure_ascii=False)
    assert "ana.lopez@example.com" not in text and "<EMAIL_1>" in text and "<PHONE_1>" in text
    assert "profile_information" in json.dumps(summary["skipped"])  # other JSON of the export: skipped, said so


def test_instagram_by_path():
    convs, msgs, r = load(IG / "riya_9876" / "message_1.json")
    assert r.notes["format"] == "instagram" and convs[0].source.startswith("instagram:")
    assert counts(msgs) == {"Riya": 2, "Mo Tanaka": 2}
    assert "das ist großartig 😍" in [m.text for m in msgs]
    assert r.dropped == {"reaction": 2, "media": 2}
    # the same file outside an Instagram folder reads as Messenger: same shape
    convs, _, r = load(IG / "riya_9876" / "message_1.json", name="message_1.json")
    assert r.notes["format"] == "messenger"


# --- iMessage -------------------------------------------------------------------------------------


def test_typedstream_text():
    head = (
        b"\x04\x0bstreamtyped\x81\xe8\x03\x84\x01@\x84\x84\x84\x12NSAttributedString\x00\x84\x84\x08NSObject"
        b"\x00\x85\x92\x84\x84\x84\x08NSString\x01\x94\x84\x01+"
    )
    assert typedstream_text(head + b"\x05hello\x86\x84") == "hello"
    long = "é" * 100  # 200 bytes: the two-byte length form
    assert typedstream_text(head + b"\x81" + (200).to_bytes(2, "little") + long.encode() + b"\x86") == long
    assert typedstream_text(head + b"\x82" + (3).to_bytes(4, "little") + b"abc") == "abc"
    assert typedstream_text(head + b"\x09short") is None  # length past the end
    assert typedstream_text(head + b"\x02\xff\xfe") is None  # not UTF-8
    assert typedstream_text(b"bplist00...") is None and typedstream_text(b"") is None
    mutable = head.replace(b"\x08NSString", b"\x0fNSMutableString") + b"\x02hi"
    assert typedstream_text(mutable) == "hi"


def test_apple_time_seconds_and_nanoseconds():
    assert apple_time(0) is None
    assert apple_time(725_760_000) == "2024-01-01T00:00:00+00:00"  # seconds (old databases)
    assert apple_time(725_760_000_000_000_000) == "2024-01-01T00:00:00+00:00"  # nanoseconds (High Sierra on)


def test_imessage_old_database_seconds_and_text_column():
    convs, msgs, r = load(EXPORTS / "imessage" / "old_mac_seconds.db", me="Riya")
    assert r.notes["format"] == "imessage"
    assert counts(msgs) == {"+15555550142": 2, "Riya": 2, "dani.ortiz@example.com": 1}
    assert [c.source.split("#")[1] for c in convs] == ["+15555550142", "dani.ortiz@example.com"]
    assert msgs[0].time == "2016-05-01T09:00:00+00:00"
    assert ("Riya", "almost\nthe last chapter is wild") in [(m.speaker, m.text) for m in msgs]
    assert r.read == 7 and r.dropped == {"media": 1, "empty": 1}


def _ventura(tmp_path: Path) -> Path:
    with zipfile.ZipFile(EXPORTS / "imessage" / "ventura_with_wal.zip") as z:
        z.extractall(tmp_path)
    return tmp_path / "Messages"


def test_imessage_wal_attributed_body_tapbacks_groups(tmp_path):
    folder = _ventura(tmp_path)
    report = Report()
    raw, wal = (folder / "chat.db").read_bytes(), (folder / "chat.db-wal").read_bytes()
    convs = parse(raw, "chat.db", report, wal=wal)
    msgs = [m for c in convs for m in c.messages]
    assert counts(msgs) == {"+447700900456": 3, "Me": 2, "+447700900789": 1, "kai.lindqvist@example.com": 1}
    assert report.read == 13 and report.dropped == {"reaction": 3, "media": 1, "system": 1, "deleted": 1}
    assert report.notes["text_from_attributedBody"] == 6
    by_chat = {c.source.split("#")[1]: [m.text for m in c.messages] for c in convs}
    assert by_chat["Climbing 🧗"] == [
        "who has the rope?",
        "me, and my mail is kai.lindqvist@example.com",
        "great, see you both at 9",
    ]
    assert by_chat["+447700900456"][1] == "yes!! 🧗‍♀️ where?"  # only in attributedBody
    assert by_chat["+447700900456"][2].startswith("here is the plan for saturday")  # > 127 bytes
    assert msgs[0].time == "2024-03-02T18:00:00+00:00"  # nanoseconds
    # without its WAL the same chat.db holds only the rows checkpointed before the copy
    report = Report()
    msgs = [m for c in parse(raw, "chat.db", report) for m in c.messages]
    assert counts(msgs) == {"+447700900456": 2, "Me": 1} and report.read == 5


def test_imessage_folder_read_without_writing_beside_it(tmp_path, monkeypatch):
    folder = _ventura(tmp_path)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    opened = []
    real_connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda db, *a, **k: opened.append(str(db)) or real_connect(db, *a, **k))
    os.chmod(folder, 0o555)  # for anyone but root, opening the database here would fail
    try:
        convs, summary = imported(folder, gap_minutes=0, me="Riya", aliases={"+447700900456": "Jo"})
        direct, _ = imported(folder / "chat.db", gap_minutes=0)  # a file given directly brings its -wal along
    finally:
        os.chmod(folder, 0o755)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    assert after == before  # no -shm rewritten, no journal, nothing new
    assert len(opened) == 2 and not any(str(folder) in p for p in opened)  # private copies only
    assert not any(os.path.exists(p.removeprefix("file:")) for p in opened)  # and deleted afterwards
    # the 1:1 chat is named by Jo's number, scrubbed first (<PHONE_1>), so the group's other number is <PHONE_2>
    assert summary["speakers"] == {"Jo": 3, "Riya": 2, "<PHONE_2>": 1, "<EMAIL_1>": 1}
    assert sum(len(c.messages) for c in direct) == 7
    assert all("+4477" not in c.source for c in convs)  # a chat named by a number is scrubbed too


def test_imessage_not_a_chat_db(tmp_path):
    db = tmp_path / "other.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE notes (id INTEGER, body TEXT)")
    con.commit()
    con.close()
    with pytest.raises(UserError, match="without iMessage's handle and message table"):
        parse(db.read_bytes(), "other.db", Report())
    with pytest.raises(UserError, match="without iMessage's handle and message table"):
        imported(db)  # given alone: an error
    shutil.copy(EXPORTS / "imessage" / "old_mac_seconds.db", tmp_path / "chat.db")
    _, summary = imported(tmp_path)  # beside a chat.db, as in ~/Library/Messages: skipped, and said so
    assert summary["messages"] == 5 and "other.db" in json.dumps(summary["skipped"])
    with pytest.raises(UserError, match="unreadable SQLite database|without iMessage"):
        parse(b"SQLite format 3\0" + b"\x00" * 200, "broken.db", Report())


# --- Slack ----------------------------------------------------------------------------------------


def test_slack_folder():
    convs, summary = imported(EXPORTS / "slack", gap_minutes=0, scrub=False)
    assert summary["speakers"] == {"Ben Okafor": 4, "Ana López": 3, "Caro S.": 1}
    assert summary["read"] == 14 and summary["dropped"] == {"system": 3, "bot": 1, "media": 1, "deleted": 1}
    by_chat = {c.source.split("#")[1]: [(m.speaker, m.text) for m in c.messages] for c in convs}
    assert by_chat["general"] == [  # thread replies in time order; markup back to text
        ("Ana López", "morning @Ben Okafor! the deploy is at 11 & I'll post here"),
        ("Ben Okafor", "ok, I'll watch #random too"),
        ("Caro S.", "runbook: deploy notes (https://wiki.example.com/deploy)"),
        ("Ana López", "deploy went fine :tada:\nthanks all"),
        ("Ben Okafor", "@here lunch?"),
    ]
    assert by_chat["Ana López, Ben Okafor"][0] == ("Ben Okafor", "hey, can you review my PR before the deploy?")
    assert convs[0].messages[0].time == "2024-01-02T10:06:40+00:00"


def test_slack_zip_in_memory(tmp_path, monkeypatch):
    z = tmp_path / "Acme Slack export Jan 1 2024 - Jan 5 2024.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in SLACK.rglob("*.json"):
            zf.write(p, p.relative_to(SLACK).as_posix())
    monkeypatch.setattr(zipfile.ZipFile, "extractall", lambda *a, **k: pytest.fail("extracted"))
    _, summary = imported(z, gap_minutes=0)
    assert summary["speakers"] == {"Ben Okafor": 4, "Ana López": 3, "Caro S.": 1}
    assert [s["format"] for s in summary["sources"]] == ["slack"]


def test_slack_day_file_alone_says_what_it_needs(tmp_path):
    with pytest.raises(UserError, match="Slack"):
        parse((SLACK / "general" / "2024-01-02.json").read_bytes(), "2024-01-02.json", Report())


# --- Signal, Google Chat, LINE ------------------------------------------------------------------------


def test_signal_export_data_json():
    convs, msgs, r = load(EXPORTS / "signal" / "Ana Lima" / "data.json", me="Riya")
    assert r.notes["format"] == "signal" and convs[0].source.endswith("#Ana Lima")
    assert [(m.speaker, m.text) for m in msgs] == [
        ("Ana Lima", "are we still on for tomorrow?"),
        ("Riya", "yes! 10am at the market"),
        ("Ana Lima", "that's the stall with the good bread\nsecond line"),
        ("Riya", "perfeito, até amanhã 😊 my new number is +351 912 345 678"),
    ]
    assert msgs[0].time == "2024-02-10T19:00:12"
    assert r.read == 8 and r.dropped == {"media": 2, "system": 1, "deleted": 1}
    _, msgs, r = load(EXPORTS / "signal" / "Bouldering 🧗" / "data.json")
    assert counts(msgs) == {"Kai": 1, "Ana Lima": 1, "Me": 1} and r.dropped == {"system": 1}


def test_google_chat_takeout():
    convs, summary = imported(EXPORTS / "googlechat", gap_minutes=0, scrub=False)
    by_chat = {c.source.split("#")[1]: c for c in convs}
    assert set(by_chat) == {"Priya Raman, Tom Weber", "Platform team"}  # from group_info.json
    dm = by_chat["Priya Raman, Tom Weber"].messages
    assert [(m.speaker, m.time) for m in dm] == [
        ("Priya Raman", "2024-01-08T09:15:02+00:00"),
        ("Tom Weber", "2024-01-08T09:16:40+00:00"),
        ("Priya Raman", "2024-01-08T13:05:00+00:00"),
    ]  # \u202fPM
    assert summary["speakers"] == {"Priya Raman": 3, "Lena Fischer": 2, "Tom Weber": 1}
    assert summary["dropped"] == {"media": 1, "deleted": 1, "system": 1}
    assert "Users/User 1042339911/user_info.json" in json.dumps(summary["skipped"], ensure_ascii=False)


def test_line_english_ios():
    convs, msgs, r = load(EXPORTS / "line" / "[LINE] Chat with Mei.txt")
    assert r.notes["format"] == "line" and convs[0].source.endswith("#Mei")
    assert [(m.speaker, m.text, m.time) for m in msgs][:3] == [
        ("Mei", "are you still awake?", "2024-01-05T21:58:00"),
        ("Kenji Sato", "yes", "2024-01-05T21:59:00"),
        ("Mei", 'ok so listen\nthis is long\nand has "quotes" inside', "2024-01-05T22:00:00"),
    ]
    assert counts(msgs) == {"Mei": 3, "Kenji Sato": 3}
    assert r.read == 11 and r.dropped == {"media": 2, "system": 2, "deleted": 1}


def test_line_stray_quote_does_not_swallow_the_chat():
    text = (
        '[LINE] Chat history with Mei\n2024/01/05(Fri)\n21:58\tMei\t"quoted, never closed\n'
        '21:59\tKenji\tstill here\n22:00\tMei\t"two\nlines"\n2024/01/06(Sat)\n08:00\tKenji\tmorning\n'
    )
    report = Report()
    msgs = [m for c in parse(text, "line.txt", report) for m in c.messages]
    assert [(m.speaker, m.text) for m in msgs] == [
        ("Mei", '"quoted, never closed'),
        ("Kenji", "still here"),
        ("Mei", "two\nlines"),
        ("Kenji", "morning"),
    ]


def test_line_japanese_and_android_12h_crlf():
    convs, msgs, r = load(EXPORTS / "line" / "[LINE] 家族.txt")
    assert convs[0].source.endswith("#家族") and counts(msgs) == {"お母さん": 1, "健二": 2, "由美": 1}
    assert r.dropped == {"media": 1, "system": 2} and msgs[-1].time == "2024-02-02T07:30:00"
    assert b"\r\n" in (EXPORTS / "line" / "[LINE] Chat with Sam (Android).txt").read_bytes()
    _, msgs, r = load(EXPORTS / "line" / "[LINE] Chat with Sam (Android).txt")
    assert [m.time for m in msgs] == [
        "2024-02-29T23:58:00",
        "2024-02-29T23:59:00",
        "2024-03-01T00:00:00",
        "2024-03-01T09:05:00",
        "2024-03-01T09:06:00",
    ]
    assert counts(msgs) == {"Sam": 3, "Alex Kim": 2} and r.dropped == {"media": 1}


# --- detection --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, fmt",
    [
        (FB / "viagem_55501" / "message_1.json", "messenger"),
        (IG / "riya_9876" / "message_1.json", "instagram"),
        (EXPORTS / "imessage" / "old_mac_seconds.db", "imessage"),
        (EXPORTS / "signal" / "Ana Lima" / "data.json", "signal"),
        (GCHAT / "Space AAAA9Kz3pQw" / "messages.json", "googlechat"),
        (EXPORTS / "line" / "[LINE] 家族.txt", "line"),
        (EXPORTS / "line" / "[LINE] Chat with Sam (Android).txt", "line"),
    ],
)
def test_detection(path, fmt):
    found, _ = sniff(path.read_bytes(), path.relative_to(EXPORTS).as_posix(), Report())
    assert found == fmt


def test_one_signal_message_is_one_json_value():
    line = (EXPORTS / "signal" / "Ana Lima" / "data.json").read_text().splitlines()[0] + "\n"
    _, msgs, _ = load_text(line.replace("Ana Lima", "Kai"))
    assert [m.speaker for m in msgs] == ["Kai"]


def load_text(text: str):
    report = Report()
    convs = parse(text, "Kai/data.json", report)
    return convs, [m for c in convs for m in c.messages], report


def test_unknown_input_says_what_was_tried():
    with pytest.raises(UserError) as e:
        parse("just some prose\nwith two lines\n", "notes.txt", Report())
    assert all(w in str(e.value) for w in ("WhatsApp", "LINE", "Discord", "JSON", "SQLite"))
    with pytest.raises(UserError) as e:
        parse('{"participants": [], "foo": 1}', "x.json", Report())
    assert all(w in str(e.value) for w in ("Telegram", "Messenger", "Google Chat", "Signal", "chitchat"))


# --- whole-account exports: --list, --chat, --pair, --person -------------------------------------------


def test_list_rows_and_nothing_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = list_chats([str(EXPORTS / "messenger"), str(EXPORTS / "telegram" / "account_export.json")])
    assert [(r["chat"], r["format"], r["messages"]) for r in rows] == [
        ("Ben Kovač", "messenger", 6),
        ("Viagem 🚐", "messenger", 4),
        ("Ana", "telegram", 2),
        ("Family 👨‍👩‍👧", "telegram", 2),
        ("Saved Messages", "telegram", 1),
    ]
    assert rows[0]["people"] == {"Ana López": 3, "Ben Kovač": 3}
    assert rows[0]["first"] == "2024-01-02T10:00:05+00:00" and rows[0]["last"] == "2024-01-05T18:08:00+00:00"
    assert list(tmp_path.iterdir()) == []


def test_whatsapp_folder_of_zips_lists_each_chat(tmp_path):
    for name, who in (("WhatsApp Chat with Ana.zip", "Ana"), ("WhatsApp Chat - Ben.zip", "Ben")):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            z.writestr("_chat.txt", f"01/02/2024, 10:00 - {who}: hi\n01/02/2024, 10:01 - Riya: hey {who}\n")
            z.writestr("IMG-0001.jpg", b"\xff\xd8")
    rows = list_chats([str(tmp_path)])
    assert [(r["chat"], r["people"]) for r in rows] == [("Ben", {"Ben": 1, "Riya": 1}), ("Ana", {"Ana": 1, "Riya": 1})]
    _, summary = imported(tmp_path, chats=["ben"])  # case does not matter
    assert summary["speakers"] == {"Ben": 1, "Riya": 1} and summary["dropped"] == {"chat_not_selected": 2}


def test_chat_pair_person_choices():
    _, s = imported(EXPORTS / "messenger", chats=["Viagem 🚐"])
    assert s["speakers"] == {"Ben Kovač": 2, "Ana López": 1, "Caro Šimić": 1} and s["dropped"]["chat_not_selected"] == 6
    _, s = imported(EXPORTS / "messenger", pair=("Ben Kovač", "Ana López"))
    assert s["speakers"] == {"Ana López": 3, "Ben Kovač": 3}  # the group has a third person: not the pair's chat
    _, s = imported(EXPORTS / "messenger", EXPORTS / "instagram", person="Caro Šimić")
    assert s["speakers"] == {"Ben Kovač": 2, "Ana López": 1, "Caro Šimić": 1}  # everyone else kept as context
    _, s = imported(EXPORTS / "slack", person="Ben Okafor", aliases={"Ben Okafor": "Ben"})
    assert s["speakers"]["Ben"] == 4
    with pytest.raises(UserError, match="no chat named 'Nobody'; chats here: 'Ben Kovač', 'Viagem 🚐'"):
        imported(EXPORTS / "messenger", chats=["Nobody"])
    with pytest.raises(UserError, match="no chat between exactly 'Ana López' and 'Caro Šimić'"):
        imported(EXPORTS / "messenger", pair=("Ana López", "Caro Šimić"))
    with pytest.raises(UserError, match="nobody named 'Zed'"):
        list_chats([str(EXPORTS / "messenger")], person="Zed")
    with pytest.raises(UserError, match="--other-chats .* no SRC is chitchat"):
        imported(EXPORTS / "messenger", pair=("Ben Kovač", "Ana López"), other_chats=True)


# --- zips and folders of the new formats: the same refusals ----------------------------------------------


def test_zip_slip_and_oversize_refused_for_new_formats(tmp_path):
    slip = tmp_path / "slack.zip"
    with zipfile.ZipFile(slip, "w") as z:
        z.writestr("users.json", (SLACK / "users.json").read_bytes())
        z.writestr("channels.json", (SLACK / "channels.json").read_bytes())
        z.writestr("../general/2024-01-02.json", (SLACK / "general" / "2024-01-02.json").read_bytes())
    with pytest.raises(UserError, match="outside the archive"):
        read_sources([str(slip)], 1 << 30)
    big = tmp_path / "facebook.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("messages/inbox/a_1/message_1.json", b" " * (3 << 20))
    with pytest.raises(UserError, match="zip bomb"):
        read_sources([str(big)], 1 << 20)
    folder = tmp_path / "Messages"
    folder.mkdir()
    (folder / "chat.db").write_bytes(b"SQLite format 3\0" + b"\0" * (2 << 20))
    with pytest.raises(UserError, match="--max-input-mb"):
        read_sources([str(folder)], 1 << 20)


def test_bundles_pair_wal_and_group_info_only_with_their_owner():
    blobs = group(read_sources([str(EXPORTS / "googlechat"), str(EXPORTS / "imessage")], 1 << 30))
    names = [b.name for b in blobs]
    assert not any(n.endswith("group_info.json") for n in names)
    assert all(b.companions and "group_info" in b.companions for b in blobs if b.name.endswith("messages.json"))
    wal_zip = [b for b in blobs if b.name.endswith("Messages/chat.db")]
    assert len(wal_zip) == 1 and set(wal_zip[0].companions) == {"wal"}
    assert not any(n.endswith(("-wal", "-shm")) for n in names)


def test_messenger_end_to_end_encrypted_export():
    path = EXPORTS / "messenger_e2ee" / "Ben Kovač_40.json"
    convs, msgs, r = load(path)
    assert r.notes["format"] == "messenger" and r.notes["export"] == "end-to-end encrypted chats"
    assert convs[0].source.endswith("#Ben Kovač_40")
    assert [(m.speaker, m.text, m.time) for m in msgs] == [  # in time order, text already proper UTF-8
        ("Ben Kovač", "olá! this chat is encrypted now 🔒", "2024-05-01T10:00:00+00:00"),
        ("Ana López", "good, café tomorrow?", "2024-05-01T10:01:00.500000+00:00"),
        ("Ben Kovač", "https://example.org/menu", "2024-05-01T10:04:00+00:00"),
        ("Ana López", "perfect 👌", "2024-05-01T10:05:00+00:00"),
    ]
    assert r.read == 7 and r.dropped == {"media": 1, "deleted": 1, "system": 1}
    rows = list_chats([str(EXPORTS / "messenger"), str(EXPORTS / "messenger_e2ee")])
    assert [r["chat"] for r in rows] == ["Ben Kovač", "Viagem 🚐", "Ben Kovač_40"]
