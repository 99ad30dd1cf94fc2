"""`convsim import` and `convsim stats` end to end: subprocesses into temporary directories, checking
files, permissions, JSON shape and error behaviour.

    python -m pytest tests/cli/test_import_cli.py -q
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from convsim.data.schema import read_conversations, write_conversations

EXPORTS = Path(__file__).parents[1] / "data" / "exports"
WA = EXPORTS / "whatsapp" / "android_us_12h.txt"


def convsim(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convsim", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def ok_json(*args) -> dict:
    r = convsim(*args, "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return json.loads(r.stdout)


def assert_user_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_import_writes_private_files_and_json_shape(tmp_path):
    out = tmp_path / "nested" / "data"
    j = ok_json("import", WA, "--out", out)
    assert isinstance(j["conversations"], int) and isinstance(j["messages"], int)
    assert j == {**j, "conversations": 3, "messages": 10, "speakers": {"Ben": 5, "Ana López": 4, "Caro": 1}}
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in j["speakers"].items())
    assert j["dropped"] == {"system": 2, "media": 1, "deleted": 1}
    assert j["scrubbed"]["EMAIL"] == 2 and j["scrubbed"]["PHONE"] == 1 and j["formats"] == ["whatsapp"]
    assert sorted(p.name for p in out.iterdir()) == ["conversations.jsonl", "import.json"]
    assert mode(out) == 0o700
    assert mode(out / "conversations.jsonl") == 0o600 and mode(out / "import.json") == 0o600
    convs = read_conversations(out)
    assert [c.id for c in convs] == ["c0001", "c0002", "c0003"]
    assert convs[1].messages[0].text == "morning! my new number is <PHONE_1>, mail <EMAIL_1>"
    assert convs[1].messages[1].text.startswith("got it. mine is still <EMAIL_1>")  # same address, same tag
    meta = json.loads((out / "import.json").read_text())
    assert meta["read"] == meta["messages"] + sum(meta["dropped"].values())
    assert meta["sources"][0]["date_order"].startswith("MDY") and meta["options"]["gap_minutes"] == 120
    assert "ana@example.com" not in (out / "import.json").read_text()


def test_written_file_matches_schema_writer(tmp_path):
    out = tmp_path / "d"
    ok_json("import", EXPORTS / "whatsapp" / "ios_lrm.txt", EXPORTS / "telegram" / "single_chat.json", "--out", out)
    convs = read_conversations(out)
    write_conversations(tmp_path / "again.jsonl", convs)
    assert (tmp_path / "again.jsonl").read_bytes() == (out / "conversations.jsonl").read_bytes()


def test_no_scrub_aliases_and_gap(tmp_path):
    j = ok_json(
        "import",
        WA,
        "--out",
        tmp_path / "a",
        "--no-scrub",
        "--speaker",
        "Ana López=Ana",
        "--speaker",
        "Caro=Ben",
        "--gap-minutes",
        "0",
    )
    assert j["speakers"] == {"Ben": 6, "Ana": 4} and j["conversations"] == 1 and j["scrubbed"] is None
    text = (tmp_path / "a" / "conversations.jsonl").read_text()
    assert "ana@example.com" in text and "+1 (555) 123-4567" in text
    j = ok_json("import", WA, "--out", tmp_path / "b", "--gap-minutes", "10000")
    assert j["conversations"] == 2  # 8 days apart still splits


def test_human_output_and_help(tmp_path):
    r = convsim("import", WA, "--out", tmp_path / "d")
    assert r.returncode == 0 and "kept 10 messages in 3 conversations" in r.stdout and "dropped" in r.stdout
    for cmd in ("import", "stats"):
        r = convsim(cmd, "--help")
        assert r.returncode == 0 and "examples:" in r.stdout and f"convsim {cmd}" in r.stdout


def test_existing_data_dir_keeps_other_files(tmp_path):
    out = tmp_path / "d"
    out.mkdir(mode=0o755)
    (out / "train.jsonl").write_text("keep me\n")
    (out / "conversations.jsonl").write_text("old\n")
    ok_json("import", WA, "--out", out)
    assert (out / "train.jsonl").read_text() == "keep me\n"
    assert read_conversations(out)[0].messages[0].speaker == "Ana López"
    assert mode(out) == 0o700 and mode(out / "conversations.jsonl") == 0o600


def test_error_leaves_existing_data_dir_as_it_was(tmp_path):
    out = tmp_path / "d"
    out.mkdir(mode=0o755)
    (out / "conversations.jsonl").write_text("old\n")
    assert_user_error(convsim("import", EXPORTS / "nothing-here.txt", "--out", out), "no such file")
    assert (out / "conversations.jsonl").read_text() == "old\n" and mode(out) == 0o755
    assert sorted(p.name for p in out.iterdir()) == ["conversations.jsonl"]


def test_errors_create_nothing(tmp_path):
    out = tmp_path / "new" / "data"
    assert_user_error(convsim("import", WA, "--out", out, "--speaker", "Nobody=Ana"), "no speaker named 'Nobody'")
    assert_user_error(convsim("import", WA, "--out", out, "--speaker", "no-equals-sign"), "ALIAS=NAME")
    assert_user_error(convsim("import", WA, "--out", out, "--max-messages", "3"), "--max-messages")
    assert_user_error(convsim("import", WA, "--out", out, "--top-pair"), "chitchat")
    assert_user_error(convsim("import", WA, "--out", out, "--chat", "Ana"), "no chat named 'Ana'", "android_us_12h")
    assert_user_error(convsim("import", WA, "--out", out, "--format", "telegram"), "not valid JSON")
    assert_user_error(convsim("import", WA, "--out", out, "--gap-minutes", "-5"), "--gap-minutes")
    assert_user_error(convsim("import", WA, "--out", out, "--max-input-mb", "0"), "--max-input-mb")
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    assert_user_error(convsim("import", WA, "--out", tmp_path / "file"), "not a directory")


def test_truncation_counted(tmp_path):
    j = ok_json("import", WA, "--out", tmp_path / "d", "--max-message-chars", "5")
    assert j["truncated"] == 8
    assert all(len(m.text) <= 5 for c in read_conversations(tmp_path / "d") for m in c.messages)


def test_several_sources_directory_and_zip(tmp_path):
    j = ok_json(
        "import",
        EXPORTS / "telegram",
        EXPORTS / "whatsapp" / "ios_export.zip",
        EXPORTS / "discord" / "dce.csv",
        "--out",
        tmp_path / "d",
    )
    assert j["formats"] == ["discord", "telegram", "whatsapp"]
    meta = json.loads((tmp_path / "d" / "import.json").read_text())
    assert [s["name"] for s in meta["sources"]] == [
        "telegram/account_export.json",
        "telegram/single_chat.json",
        "ios_export.zip/_chat.txt",
        "dce.csv",
    ]


def test_telegram_chat_choice(tmp_path):
    j = ok_json("import", EXPORTS / "telegram" / "account_export.json", "--chat", "Ana", "--out", tmp_path / "d")
    # the other chats' 6 messages: 3 their own importer drops (media, system), 3 left out by --chat
    assert j["speakers"] == {"Ana": 1, "Ben": 1} and j["dropped"]["chat_not_selected"] == 3
    assert j["read"] == j["messages"] + sum(j["dropped"].values())
    j = ok_json("import", EXPORTS / "telegram" / "account_export.json", "--chat", "777", "--out", tmp_path / "i")
    assert j["speakers"] == {"Mum": 1, "Ben": 1}  # 777 is the family group's id
    assert_user_error(
        convsim("import", EXPORTS / "telegram" / "account_export.json", "--chat", "Zed", "--out", tmp_path / "e"),
        "no chat named 'Zed'",
    )
    assert not (tmp_path / "e").exists()


def test_chitchat_top_pair_and_pair(tmp_path):
    j = ok_json("import", "chitchat", "--top-pair", "--out", tmp_path / "d", "--no-scrub")
    assert j["messages"] == 11_431 and sorted(j["speakers"]) == ["549cc1d1", "a54af4d5"]
    assert j["conversations"] == 64  # 62 chats; two of them have a silence over 120 minutes
    meta = json.loads((tmp_path / "d" / "import.json").read_text())
    assert meta["sources"][0]["pair"]["chats"] == 62
    assert meta["sources"][0]["speaker_names"]["a54af4d5"] == "a54af4d5-736a-4ef6-8f51-f45b6c5fdab7"
    j = ok_json("import", EXPORTS / "chitchat" / "mini.json", "--pair", "549cc1d1,a54af4d5", "--out", tmp_path / "e")
    assert j["messages"] == 7
    assert_user_error(convsim("import", "chitchat", "--pair", "549cc1d1", "--out", tmp_path / "f"), "A,B")
    assert_user_error(
        convsim("import", "chitchat", "--pair", "549cc1d1,a54af4d5", "--top-pair", "--out", tmp_path / "f"), "not both"
    )


def test_reimport_own_jsonl_roundtrip(tmp_path):
    ok_json("import", EXPORTS / "discord" / "dce.json", EXPORTS / "pairs" / "base.json", "--out", tmp_path / "a")
    j = ok_json("import", tmp_path / "a" / "conversations.jsonl", "--out", tmp_path / "b", "--format", "jsonl")
    assert j["formats"] == ["jsonl"]
    a, b = read_conversations(tmp_path / "a"), read_conversations(tmp_path / "b")
    assert [c.to_json() for c in a] == [c.to_json() for c in b]


def test_stats(tmp_path):
    ok_json("import", WA, "--out", tmp_path / "d")
    s = ok_json("stats", tmp_path / "d")
    assert s["conversations"] == 3 and s["messages"] == 10
    ben = s["speakers"]["Ben"]
    assert set(ben) >= {
        "messages",
        "chars_mean",
        "chars_median",
        "words_mean",
        "words_median",
        "burst_mean",
        "burst_median",
        "reply_delay_s_median",
    }
    assert ben["messages"] == 5 and ben["reply_delay_s_median"] == 120.0  # 60, 120, 300 s
    r = convsim("stats", tmp_path / "d")
    assert r.returncode == 0 and "Ana López" in r.stdout and "burst" in r.stdout
    assert_user_error(convsim("stats", tmp_path / "missing"), "no conversations.jsonl")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "conversations.jsonl").write_text('{"id": 1}\n')
    assert_user_error(convsim("stats", tmp_path / "bad"), "not a conversation record")


# Exports that are a folder of files read together, imported as that folder rather than file by file.
FOLDER_FIXTURES = ("slack/acme-slack-export", "googlechat/Takeout")


def _fixture_units() -> list[str]:
    units = set()
    for p in EXPORTS.rglob("*"):
        rel = p.relative_to(EXPORTS).as_posix()
        folder = next((f for f in FOLDER_FIXTURES if rel == f or rel.startswith(f + "/")), None)
        if folder is not None:
            units.add(folder)
        elif p.is_file():
            units.add(rel)
    return sorted(units)


@pytest.mark.parametrize("fixture", _fixture_units())
def test_every_fixture_imports(fixture, tmp_path, capsys):
    # In-process through the same entry point (cli.main) to keep the suite fast; the subprocess tests
    # above cover process-level behaviour.
    from convsim.cli import main

    assert main(["import", str(EXPORTS / fixture), "--out", str(tmp_path / "d"), "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["messages"] > 0 and len(j["speakers"]) >= 2
    assert j["messages"] == sum(j["speakers"].values())


@pytest.mark.parametrize("fixture", _fixture_units())
def test_every_fixture_lists(fixture, tmp_path, capsys, monkeypatch):
    from convsim.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["import", str(EXPORTS / fixture), "--list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["messages"] == sum(r["people"].values()) > 0 and r["chat"] for r in rows)
    assert list(tmp_path.iterdir()) == []  # --list writes nothing


def test_list_table_and_flag_errors(tmp_path):
    r = convsim("import", EXPORTS / "messenger", EXPORTS / "slack", "--list")
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["CHAT", "FORMAT", "MESSAGES"]
    assert any(
        line.startswith("Ben Kovač") and "messenger" in line and "Ana López 3, Ben Kovač 3" in line for line in lines
    )
    assert any(line.startswith("general") and "slack" in line for line in lines)
    assert lines[-1].startswith("4 chats, 18 messages")
    assert_user_error(
        convsim("import", EXPORTS / "messenger", "--list", "--out", tmp_path / "d"), "--list writes nothing"
    )
    assert_user_error(convsim("import", EXPORTS / "messenger"), "--out DATA_DIR is required")
    assert_user_error(convsim("import", EXPORTS / "messenger", "--list", "--person", "Zed"), "nobody named 'Zed'")
    assert not (tmp_path / "d").exists()


EXAMPLES = Path(__file__).parents[2] / "examples"


def test_examples_import_as_the_tutorial_shows(tmp_path):
    """The invented exports in examples/ (docs/TUTORIAL.md's import step): each alone, then both together with
    Telegram's spelling of the two names merged into WhatsApp's."""
    wa, tg = EXAMPLES / "whatsapp-chat.txt", EXAMPLES / "telegram-result.json"
    j = ok_json("import", wa, "--out", tmp_path / "wa")
    assert j["formats"] == ["whatsapp"] and set(j["speakers"]) == {"Maya", "Tomás"}
    assert j["dropped"] == {"system": 1, "media": 3, "deleted": 1} and j["messages"] > 150
    j = ok_json("import", tg, "--out", tmp_path / "tg")
    assert j["formats"] == ["telegram"] and set(j["speakers"]) == {"Maya Lind", "Tomás Ruiz"}
    assert j["dropped"] == {"system": 1, "media": 2} and j["messages"] > 90
    assert {k: v for k, v in j["scrubbed"].items() if v} == {"EMAIL": 1, "URL": 1}
    both = ok_json(
        "import", wa, tg, "--speaker", "Maya Lind=Maya", "--speaker", "Tomás Ruiz=Tomás", "--out", tmp_path / "d"
    )
    assert set(both["speakers"]) == {"Maya", "Tomás"} and both["formats"] == ["telegram", "whatsapp"]
    convs = read_conversations(tmp_path / "d")
    times = [m.time for c in convs for m in c.messages]
    assert sum(len(c.messages) for c in convs) == both["messages"] and all(times)
    assert any("\n" in m.text for c in convs for m in c.messages)  # WhatsApp's message of several lines
    names = ["--speaker", "Maya Lind=Maya", "--speaker", "Tomás Ruiz=Tomás"]
    r = convsim(
        "import",
        "examples/whatsapp-chat.txt",
        "examples/telegram-result.json",
        "--out",
        tmp_path / "h",
        *names,
        cwd=EXAMPLES.parent,
    )
    tutorial = (EXAMPLES.parent / "docs" / "TUTORIAL.md").read_text()
    assert r.returncode == 0 and all(line in tutorial for line in r.stdout.splitlines()[:4])  # as the page shows


def test_examples_are_what_their_script_writes(tmp_path, monkeypatch):
    """examples/make_chats.py is deterministic and the committed exports are its output."""
    import runpy

    script = runpy.run_path(str(EXAMPLES / "make_chats.py"))
    monkeypatch.setitem(script["main"].__globals__, "HERE", tmp_path)
    script["main"]()
    for name in ("whatsapp-chat.txt", "telegram-result.json"):
        assert (tmp_path / name).read_bytes() == (EXAMPLES / name).read_bytes(), name
