"""Rebuild the bad-input corpus in this directory: `python tests/data/bad/_make.py`.

Every file here (except those starting with `_` and README.md) must make `convsim import` exit 2 with
one `error:` line and no traceback; tests/test_import_bad.py runs them all. The exception is
`csv_formula_injection.csv`, which imports fine: its cells are kept as literal text (documented in
convsim/data/importers/discord.py). The files made by `other_commands()` are aimed at the other
commands that read user files (`train --config`, `steer build --phrases/--pairs`, `reply --history`,
`history --db`, `train DATA_DIR`; tests/test_reliability.py) and are bad imports too. Inputs that must not be committed (symlinks, FIFOs, a million
speakers, a 30 MB line) are made at test time. Deterministic: the same bytes on every run, except the
zip bombs' timestamps (fixed too). Each file stays under 50 KB.
"""
from __future__ import annotations

import bz2
import gzip
import json
import random
import struct
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPORTS = HERE.parent / "exports"
DATE = (2024, 1, 1, 0, 0, 0)
WA = "01/02/2024, 10:00 - Ana: hola\n01/02/2024, 10:01 - Ben: qué tal\n"


def w(name: str, data: bytes | str) -> None:
    (HERE / name).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def zinfo(name: str, method=zipfile.ZIP_DEFLATED) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, DATE)
    zi.compress_type = method
    zi.external_attr = 0o644 << 16
    return zi


def make_zip(name: str, entries: list[tuple[str, bytes]], method=zipfile.ZIP_DEFLATED) -> None:
    with zipfile.ZipFile(HERE / name, "w") as z:
        for entry, data in entries:
            z.writestr(zinfo(entry, method), data)


def bz2_bomb(name: str, entries: int, size: int) -> None:
    """Zip entries that claim (and really unpack to) `size` zero bytes each, bzip2 keeps them tiny."""
    comp = bz2.BZ2Compressor(9)
    chunk = b"\0" * (16 << 20)
    body = b"".join(comp.compress(chunk) for _ in range(size // len(chunk))) + comp.flush()
    crc = 0
    import zlib
    for _ in range(size // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    out = bytearray()
    central = bytearray()
    for i in range(entries):
        fn = (f"_chat{i}.txt" if entries > 1 else "_chat.txt").encode()
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 46, 0, 12, 0, 0x5821, crc, len(body), size, len(fn), 0)
        out += fn + body
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0x031E, 46, 0, 12, 0, 0x5821, crc, len(body),
                               size, len(fn), 0, 0, 0, 0, 0o644 << 16, offset) + fn
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, entries, entries, len(central), len(out), 0)
    (HERE / name).write_bytes(bytes(out + central + end))


def main() -> None:
    rng = random.Random(7)
    # -- empty and not text
    w("empty.txt", b"")
    w("whitespace_only.txt", "  \n\n\t \r\n")
    w("bom_only.txt", "\ufeff")
    w("random_binary.bin", bytes(rng.randrange(256) for _ in range(2048)))
    w("png_image.png", bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                                     "1f15c4890000000d49444154789c6300010000050001"
                                     "0d0a2db40000000049454e44ae426082"))
    w("gzip_chat.txt.gz", gzip.compress(WA.encode(), mtime=0))
    # -- wrong encodings
    w("utf16le_no_bom.txt", WA.encode("utf-16-le"))
    w("latin1_chat.txt", ("01/02/2024, 10:00 - José: ¿qué pasó? señor, mañana\n" * 20).encode("latin-1"))
    w("shift_jis.txt", ("01/02/2024, 10:00 - 太郎: こんにちは、元気ですか\n" * 20).encode("shift_jis"))
    # -- not a chat
    w("unknown_prose.txt", "Dear diary,\nToday nothing happened at all.\nThe end.\n")
    w("enormous_line.txt", "a" * 45_000)
    w("non_chat_object.json", json.dumps({"name": "left-pad", "version": "1.3.0", "dependencies": {}}))
    w("non_chat_list.json", "[1, 2, 3]")
    w("json_null.json", "null")
    w("json_string.json", '"hello"')
    w("pairs_empty_list.json", "[]")
    w("discord_csv_wrong_columns.csv", "Name,Value\nfoo,1\nbar,2\n")
    # -- truncated
    tg = (EXPORTS / "telegram" / "single_chat.json").read_bytes()
    w("truncated_telegram.json", tg[: len(tg) * 6 // 10])
    dc = (EXPORTS / "discord" / "dce.json").read_bytes()
    w("truncated_discord.json", dc[: len(dc) // 2])
    w("discord_csv_unterminated_quote.csv",
      'AuthorID,Author,Date,Content,Attachments,Reactions\n"1","Ana","2024-01-01T10:00:00+00:00","this never ends\n')
    zipped = (EXPORTS / "whatsapp" / "android_export.zip").read_bytes()
    w("zip_truncated.zip", zipped[: len(zipped) // 2])
    # -- absurd structure
    w("deep_nesting_array.json", "[" * 40_000)
    w("deep_nesting_in_telegram.json", '{"name": "Ana", "type": "personal_chat", "messages": [{"type": "message", '
                                      '"from": "Ana", "text": ' + "[" * 5000 + "]" * 5000 + "}]}")
    w("huge_number.json", '{"name": "Ana", "type": "personal_chat", "messages": [{"id": ' + "1" * 5000 + "}]}")
    # -- well-formed but nothing usable
    w("telegram_no_messages.json", json.dumps({"name": "Ana", "type": "personal_chat", "id": 1, "messages": []}))
    w("telegram_only_service.json", json.dumps({"name": "Ana", "type": "personal_chat", "id": 1, "messages": [
        {"id": i, "type": "service", "date": "2024-01-01T10:00:00", "actor": "Ana", "action": "phone_call", "text": ""}
        for i in range(3)]}))
    w("telegram_wrong_types.json", json.dumps({"name": "Ana", "type": "personal_chat", "messages": [
        1, "x", None, {"type": "message", "from": 5, "text": 7}, {"type": "message", "from": ["Ana"], "text": "hi"}]}))
    w("telegram_account_no_chats.json", json.dumps({"about": "export", "chats": {"about": "", "list": []}}))
    w("whatsapp_one_person.txt", "01/02/2024, 10:00 - Ana: talking\n01/02/2024, 10:01 - Ana: to myself\n")
    w("whatsapp_only_system.txt", "01/02/2024, 10:00 - Messages and calls are end-to-end encrypted.\n"
                                  "01/02/2024, 10:01 - Ana created group \"x\"\n01/02/2024, 10:02 - Ana added Ben\n")
    w("whatsapp_only_media.txt", "01/02/2024, 10:00 - Ana: <Media omitted>\n01/02/2024, 10:01 - Ben: <Media omitted>\n"
                                 "01/02/2024, 10:02 - Ben: This message was deleted\n")
    w("whatsapp_invalid_dates.txt", "45/45/2024, 10:00 - Ana: no such day\n45/45/2024, 10:01 - Ben: nor this\n")
    w("discord_csv_header_only.csv", "AuthorID,Author,Date,Content,Attachments,Reactions\n")
    w("discord_json_no_messages.json", json.dumps({"guild": {"id": "1"}, "channel": {"id": "2"}, "messages": []}))
    w("pairs_no_speaker_tokens.json", json.dumps([{"prompt": "hello there", "response": "hi"}]))
    w("chitchat_bad_structure.json", json.dumps({"a": {"messages": [[{"text": 1, "sender": 2}], "x"]}}))
    w("jsonl_bad_line.jsonl", json.dumps({"id": "c1", "messages": [{"speaker": "Ana", "text": "hi", "time": None}]})
      + "\n{not json at all\n")
    # -- zips
    make_zip("zip_no_chat.zip", [("IMG-0001.jpg", b"\xff\xd8\xff not a jpeg"), ("AUD-0002.opus", b"OggS")])
    make_zip("zip_dotdot_entry.zip", [("../../evil/_chat.txt", WA.encode())])
    make_zip("zip_absolute_entry.zip", [("/tmp/_chat.txt", WA.encode())])
    make_zip("zip_backslash_dotdot.zip", [("..\\..\\_chat.txt", WA.encode())])
    make_zip("zip_nested_only.zip", [("inner.zip", (EXPORTS / "whatsapp" / "android_export.zip").read_bytes())])
    (HERE / "zip_empty.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    stored = ("01/02/2024, 10:00 - Ana: " + "x" * 975 + "\n").encode()
    make_zip("zip_lying_size.zip", [("_chat.txt", stored)], method=zipfile.ZIP_STORED)
    raw = bytearray((HERE / "zip_lying_size.zip").read_bytes())
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # uncompressed size fields -> 100
        i = raw.find(sig)
        raw[i + off:i + off + 4] = struct.pack("<I", 100)
    (HERE / "zip_lying_size.zip").write_bytes(bytes(raw))
    make_zip("zip_encrypted_flag.zip", [("_chat.txt", WA.encode())])
    raw = bytearray((HERE / "zip_encrypted_flag.zip").read_bytes())
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # general purpose flag bit 0: encrypted
        i = raw.find(sig)
        raw[i + off] |= 1
    (HERE / "zip_encrypted_flag.zip").write_bytes(bytes(raw))
    bz2_bomb("zip_bomb_bz2.zip", 1, 2 << 30)          # one entry: 2 GiB of zeros in ~1.5 KB
    bz2_bomb("zip_bomb_many_entries.zip", 12, 96 << 20)  # twelve entries, 1.1 GiB together
    # -- directories without an export
    d = HERE / "dir_without_export"
    d.mkdir(exist_ok=True)
    (d / "notes.md").write_text("# not a chat\n")
    (d / "photo.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    d = HERE / "dir_telegram_html"
    (d / "css").mkdir(parents=True, exist_ok=True)
    (d / "messages.html").write_text("<html><body><div class='message'>hi</div></body></html>\n")
    (d / "css" / "style.css").write_text("body { color: black }\n")
    # -- imports fine: formula-looking cells stay text
    w("csv_formula_injection.csv",
      "AuthorID,Author,Date,Content,Attachments,Reactions\n"
      '"1","=cmd|\' /C calc\'!A0","2024-01-01T10:00:00+00:00","=HYPERLINK(""http://evil.example/x"",""click me"")","",""\n'
      '"2","Ben","2024-01-01T10:01:00+00:00","+1+1","",""\n'
      '"1","=cmd|\' /C calc\'!A0","2024-01-01T10:02:00+00:00","@SUM(A1:A9)","",""\n'
      '"2","Ben","2024-01-01T10:03:00+00:00","-2+3","",""\n')
    other_commands()


def other_commands() -> None:
    """Bad inputs for the commands beyond `convsim import` (and, being bad chats as well, for it)."""
    # -- train --config FILE.yaml
    w("config_python_tag.yaml", 'model: !!python/object/apply:os.system ["touch /tmp/convsim-pwned"]\n')
    w("config_billion_laughs.yaml", "targets:\n  - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
      + "".join(f"  - &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
      + "speaker_references:\n  Ana: *i\n")
    w("config_deep_nesting.yaml", "targets: " + "[" * 20_000 + "]" * 20_000 + "\n")
    w("config_wrong_types.yaml", 'batch_size: "eight"\nlearning_rate: [1, 2]\ntargets: Ana\n')
    w("config_not_mapping.yaml", "- model\n- tiny-llama\n")
    w("config_mixed_keys.yaml", "1: 2\nbatchsize: 8\n~: null\n")
    w("config_invalid_yaml.yaml", "model: [unclosed\n  batch_size: : :\n")
    # -- steer build --phrases / --pairs
    w("phrases_bad_weights.yaml", "phrases:\n  happy: .nan\n  sad: very\n")
    w("phrases_layer_not_int.yaml", "phrases: {joy: 1.0, grief: -1.0}\nlayer: minus five\n")
    w("pairs_wrong_shape.yaml", "- [toward, away, sideways]\n- just one\n")
    w("pairs_deep_nesting.jsonl", '{"positive": ' + "[" * 20_000 + "]" * 20_000 + ', "negative": "x"}\n')
    # -- reply --history FILE
    w("history_unknown_speakers.txt", "[Mallory] who are you?\n[Eve] nobody\n")
    w("history_wrong_types.jsonl", json.dumps({"speaker": ["Ana"], "text": 5, "time": {"y": 1}}) + "\n")
    w("history_nul_bytes.txt", "[Ana] hi\0\0\0[Ben] there\n")
    # -- train DATA_DIR (as DATA_DIR/conversations.jsonl)
    w("conversations_time_not_iso.jsonl", "".join(json.dumps({"id": f"c{i}", "messages": [
        {"speaker": "Ana", "text": "hi", "time": "yesterday-ish"},
        {"speaker": "Ben", "text": "hey", "time": 1700000000}]}) + "\n" for i in range(3))
      + json.dumps({"id": "c3", "messages": [{"speaker": 7, "text": "a number is no name"}]}) + "\n")
    w("conversations_messages_not_list.jsonl", json.dumps({"id": "c1", "messages": "Ana: hi"}) + "\n")
    # -- history --db FILE
    import sqlite3
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        db = sqlite3.connect(Path(d) / "x.sqlite")
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        db.executemany("INSERT INTO notes (body) VALUES (?)", [("note %d" % i,) for i in range(50)])
        db.commit()
        db.close()
        raw = (Path(d) / "x.sqlite").read_bytes()
    w("sqlite_other_schema.sqlite", raw)
    w("sqlite_truncated.sqlite", raw[:100] + bytes(rng_bytes(900)))


def rng_bytes(n: int) -> bytes:
    rng = random.Random(11)
    return bytes(rng.randrange(256) for _ in range(n))


if __name__ == "__main__":
    import sys
    other_commands() if sys.argv[1:] == ["other"] else main()
