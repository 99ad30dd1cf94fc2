"""The bad-input corpus: every file in tests/data/bad/ (rebuilt by its `_make.py`) and inputs made at
test time (symlinks, a FIFO, a million speakers, a 30 MB line) must end `convsim import` with exit code
2, one `error:` line on stderr, no traceback, and no DATA_DIR.

    python -m pytest tests/cli/test_import_bad.py -q

Each input runs in its own process: forked from this one (so the interpreter's start-up is not paid 60
times), with stdout and stderr on their own files, calling `convsim.cli.main`, the console script's
entry point; an exception escaping it is printed as the interpreter would print it. A handful also run
as real `python -m convsim import` subprocesses (test_real_subprocesses_agree).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(os, "mkfifo"), reason="needs fork and FIFOs")

BAD = Path(__file__).parents[1] / "data" / "bad"
EXPORTS = Path(__file__).parents[1] / "data" / "exports"
CORPUS = sorted(p.name for p in BAD.iterdir() if not p.name.startswith(("_", ".")) and p.name != "README.md")
IMPORTS_FINE = {"csv_formula_injection.csv"}  # cells like =HYPERLINK(...) are kept as text; nothing evaluates them
WA = "01/02/2024, 10:00 - Ana: hola\n01/02/2024, 10:01 - Ben: qué tal\n"

# name -> how to build it under a directory; returns the extra command-line arguments
RUNTIME = {}


def runtime(fn):
    RUNTIME[fn.__name__] = fn
    return fn


@runtime
def symlink_dangling(d: Path) -> list:
    (d / "link.txt").symlink_to(d / "does-not-exist.txt")
    return [d / "link.txt"]


@runtime
def symlink_loop(d: Path) -> list:
    (d / "a").symlink_to(d / "b")
    (d / "b").symlink_to(d / "a")
    return [d / "a"]


@runtime
def symlink_to_dev_zero(d: Path) -> list:
    (d / "zero.txt").symlink_to("/dev/zero")
    return [d / "zero.txt"]


@runtime
def fifo(d: Path) -> list:
    os.mkfifo(d / "pipe.txt")  # opening it for reading would block forever
    return [d / "pipe.txt"]


@runtime
def dir_with_only_symlinked_export(d: Path) -> list:
    (d / "outside.txt").write_text(WA)
    (d / "src").mkdir()
    (d / "src" / "chat.txt").symlink_to(d / "outside.txt")  # links inside a SRC directory are not followed
    (d / "src" / "loop").symlink_to(d / "src")
    return [d / "src"]


@runtime
def zip_with_symlink_entry(d: Path) -> list:
    zi = zipfile.ZipInfo("_chat.txt")
    zi.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(d / "links.zip", "w") as z:
        z.writestr(zi, "/etc/passwd")
    return [d / "links.zip"]


@runtime
def million_distinct_speakers(d: Path) -> list:
    with open(d / "crowd.txt", "w", encoding="utf-8") as f:
        f.writelines(f"01/02/2024, 10:00 - Person {i}: hi\n" for i in range(1_000_000))
    return [d / "crowd.txt"]


@runtime
def line_of_30_mb(d: Path) -> list:
    (d / "line.txt").write_bytes(b"01/02/2024, 10:00 - Ana: " + b"x" * (30 << 20))
    return [d / "line.txt", "--max-input-mb", "20"]


@runtime
def thirty_mb_without_newline(d: Path) -> list:
    (d / "blob.txt").write_bytes(b"y" * (30 << 20))
    return [d / "blob.txt"]


@runtime
def too_many_messages(d: Path) -> list:
    return [EXPORTS / "whatsapp" / "android_us_12h.txt", "--max-messages", "5"]


@runtime
def too_many_speakers_for_the_flag(d: Path) -> list:
    return [EXPORTS / "whatsapp" / "android_us_12h.txt", "--max-speakers", "2"]


@runtime
def directory_missing(d: Path) -> list:
    return [d / "no" / "such" / "dir"]


@runtime
def unknown_format_forced(d: Path) -> list:
    return [EXPORTS / "telegram" / "single_chat.json", "--format", "discord"]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def _child(args: list, out, err) -> int:
    """Fork a child that runs `convsim import ARGS` with stdout/stderr on `out`/`err`; returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    rc = 1
    try:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
        from convsim.cli import main

        try:
            rc = main(["import", *map(str, args)])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()  # what the interpreter would show
            rc = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(rc)


def _run_forked(jobs: dict[str, list], parallel: int = 3) -> dict[str, Result]:
    """Run every job in its own forked process, `parallel` at a time (forked from this thread only)."""
    import convsim.data.import_cli  # noqa: F401  (compile the modules and regexes once, before forking)
    from convsim.data import importers

    for fmt in importers.FORMATS:
        importers.module(fmt)
    pending = list(jobs.items())
    running: dict[int, tuple] = {}
    done: dict[str, Result] = {}
    while pending or running:
        while pending and len(running) < parallel:
            name, args = pending.pop(0)
            out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
            running[_child(args, out, err)] = (name, out, err)
        pid, status = os.wait()
        if pid not in running:
            continue
        name, out, err = running.pop(pid)
        out.seek(0)
        err.seek(0)
        done[name] = Result(
            os.waitstatus_to_exitcode(status),
            out.read().decode("utf-8", "replace"),
            err.read().decode("utf-8", "replace"),
        )
        out.close()
        err.close()
    return done


def _run_subprocess(args: list) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convsim", "import", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, list]:
    """name -> command-line arguments (SRC and options; --out is added per run)."""
    base = tmp_path_factory.mktemp("bad-in")
    jobs = {name: [BAD / name] for name in CORPUS}
    for name, build in RUNTIME.items():
        d = base / name
        d.mkdir(parents=True)
        jobs[name] = build(d)
    return jobs


@pytest.fixture(scope="module")
def results(inputs, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad-out")
    done = _run_forked({name: [*args, "--out", base / name / "data"] for name, args in inputs.items()})
    return {name: (done[name], base / name) for name in inputs}


@pytest.mark.parametrize("name", [n for n in CORPUS if n not in IMPORTS_FINE] + sorted(RUNTIME))
def test_bad_input_is_one_clean_error(name, results):
    r, out_parent = results[name]
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-500:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > 20, r.stderr
    assert r.stdout == ""
    assert not out_parent.exists(), "DATA_DIR (or its parent) was created"


def test_formula_injection_is_kept_as_text(results):
    r, out_parent = results["csv_formula_injection.csv"]
    assert r.returncode == 0 and "Traceback" not in r.stderr
    rows = [json.loads(line) for line in (out_parent / "data" / "conversations.jsonl").read_text().splitlines()]
    texts = [m["text"] for row in rows for m in row["messages"]]
    assert texts == ['=HYPERLINK("<URL_1>","click me")', "+1+1", "@SUM(A1:A9)", "-2+3"]
    assert rows[0]["messages"][0]["speaker"] == "=cmd|' /C calc'!A0"


def test_specific_messages(results):
    """A few errors should say what went wrong, not just that something did."""
    expect = {
        "zip_dotdot_entry.zip": "outside the archive",
        "zip_bomb_bz2.zip": "zip bomb",
        "zip_bomb_many_entries.zip": "zip bomb",
        "zip_no_chat.zip": "zip without a chat export",
        "deep_nesting_array.json": "nested too deeply",
        "whatsapp_one_person.txt": "only one speaker",
        "whatsapp_only_system.txt": "0 messages kept",
        "utf16le_no_bom.txt": "UTF-16",
        "latin1_chat.txt": "not UTF-8",
        "random_binary.bin": "binary",
        "empty.txt": "empty file",
        "dir_without_export": "directory without a chat export",
        "dir_telegram_html": "HTML",
        "symlink_dangling": "symlink to nothing",
        "symlink_to_dev_zero": "not a regular file",
        "fifo": "not a regular file",
        "million_distinct_speakers": "--max-speakers",
        "line_of_30_mb": "--max-input-mb",
        "too_many_messages": "--max-messages",
        "truncated_telegram.json": "truncated",
        "zip_encrypted_flag.zip": "encrypted",
        "zip_nested_only.zip": "zips inside a zip",
        "discord_csv_unterminated_quote.csv": "malformed CSV",
    }
    for name, needle in expect.items():
        assert needle in results[name][0].stderr, (name, results[name][0].stderr)


@pytest.mark.parametrize(
    "name",
    [
        "zip_bomb_bz2.zip",
        "zip_dotdot_entry.zip",
        "deep_nesting_array.json",
        "random_binary.bin",
        "whatsapp_one_person.txt",
        "symlink_loop",
        "fifo",
    ],
)
def test_real_subprocesses_agree(name, inputs, results, tmp_path):
    r = _run_subprocess([*inputs[name], "--out", tmp_path / "x" / "data"])
    assert "Traceback" not in r.stderr and r.returncode == 2
    assert r.stderr == results[name][0].stderr  # the same one line as the forked run
    assert r.stderr.count("\n") == 1 and not (tmp_path / "x").exists()


def test_corpus_is_big_and_files_small():
    assert len(CORPUS) >= 30
    for p in BAD.rglob("*"):
        if p.is_file():
            assert p.stat().st_size < 50_000, p
