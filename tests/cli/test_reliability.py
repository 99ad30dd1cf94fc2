"""Reliability and security (issue #12): bad files given to every command that reads user files, owner-only
permissions, crash safety under SIGKILL (import, saving a conversation), no pickle, names that cannot
become paths, resource bounds, and property-based fuzzing of the non-import readers.

    python -m pytest tests/cli/test_reliability.py -q

`convsim import` against the whole corpus is tests/cli/test_import_bad.py; here the same corpus
(tests/data/bad/, rebuilt by its `_make.py`) goes to `reply --history`, `train --config`, `steer build
--phrases/--pairs`, `history --db` and `train`/`stats DATA_DIR` (as a data dir's conversations.jsonl).
Every one must end with exit code 2, one `error:` line naming the file, no traceback and nothing
written. Commands run in-process through `convsim.cli.main` (a subprocess costs seconds to import torch
here); the kill tests use real subprocesses (seeded random moments) and forked children killed at each
rename/fsync of an atomic write.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convsim.cli import main
from convsim.errors import UserError

BAD = Path(__file__).parents[1] / "data" / "bad"
EXPORTS = Path(__file__).parents[1] / "data" / "exports"
CORPUS = sorted(p for p in BAD.iterdir() if not p.name.startswith(("_", ".")) and p.name != "README.md")
FILES = [p for p in CORPUS if p.is_file()]
SETTINGS = settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
WA = "01/02/2024, 10:00 - Ana: hola\n01/02/2024, 10:01 - Ben: qué tal\n"
pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="Linux: fork, FIFOs, modes")


# ----------------------------------------------------------------------------- helpers


def cli(capsys, *args) -> tuple[int, str, str]:
    """`convsim ARGS` in this process; an exception escaping main() fails the test (it would be a traceback)."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return rc, out.out, out.err


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """path -> (mode, sha256) of everything under root (a snapshot to prove nothing was written)."""
    snap = {}
    for p in sorted(root.rglob("*")):
        st_ = os.lstat(p)
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st_.st_mode) else ""
        snap[str(p.relative_to(root))] = (st_.st_mode, digest)
    return snap


def assert_one_error(rc: int, out: str, err: str, mentions: str | None = None) -> None:
    assert "Traceback" not in err, err
    assert rc == 2, (rc, out[-300:], err[-300:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > 15, err
    if mentions is not None:
        assert mentions in lines[0], (mentions, lines[0])
    assert out == ""


@pytest.fixture(scope="module")
def special(tmp_path_factory) -> dict[str, Path]:
    """Inputs that cannot be committed: a FIFO, links to a device and to nothing, a 100 MiB sparse file."""
    d = tmp_path_factory.mktemp("special")
    os.mkfifo(d / "fifo.yaml")
    (d / "zero.yaml").symlink_to("/dev/zero")
    (d / "dangling.yaml").symlink_to(d / "nothing-here")
    with open(d / "sparse_100mb.yaml", "wb") as f:
        f.truncate(100 << 20)
    (d / "a_directory").mkdir()
    return {p.name: p for p in d.iterdir()} | {"missing.yaml": d / "missing.yaml"}


@pytest.fixture()
def fake_run(tmp_path) -> Path:
    """A run directory good enough for `open_run` (no weights): the commands must fail on the bad file
    before they would load a model."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "run.json").write_text(
        json.dumps(
            {
                "model": "tiny-llama",
                "prompt_style": "base",
                "special_tokens": True,
                "speakers": ["Ana", "Ben"],
                "targets": ["Ana", "Ben"],
                "split": {"train": [], "val": [], "test": []},
            }
        )
    )
    return run


# ----------------------------------------------------------------------------- bad files, every command


def test_corpus_covers_the_issue():
    names = {p.name for p in CORPUS}
    assert len(CORPUS) >= 60
    for needle in (
        "truncated",
        "binary",
        "latin1",
        "utf16",
        "enormous_line",
        "deep_nesting",
        "formula_injection",
        "zip_bomb",
        "zip_dotdot",
        "empty",
        "one_person",
        "config_",
        "phrases_",
        "pairs_",
        "history_",
        "conversations_",
        "sqlite_",
    ):
        assert any(needle in n for n in names), needle


# Valid as a --config (no settings: the defaults), so not run here: training would start.
VALID_CONFIG = {"empty.txt", "bom_only.txt", "json_null.json"}  # no settings = defaults


def test_reply_history(capsys, fake_run, special):
    before = tree(fake_run)
    for p in [*CORPUS, *special.values()]:
        rc, out, err = cli(capsys, "reply", fake_run, "--as", "Ana", "--history", p)
        assert_one_error(rc, out, err, mentions=p.name)
    assert tree(fake_run) == before


def test_train_config(capsys, tmp_path, special, data_dir):
    for p in [*CORPUS, *special.values()]:
        out = tmp_path / "runs" / p.name
        rc, so, se = (
            cli(capsys, "train", data_dir, "--out", out, "--model", "tiny-llama", "--max-steps", "1", "--config", p)
            if p.name not in VALID_CONFIG
            else (None, "", "")
        )
        if rc is None:
            continue
        assert_one_error(rc, so, se, mentions=p.name)
        assert not (tmp_path / "runs").exists(), p.name
    assert not Path("/tmp/convsim-pwned").exists()  # config_python_tag.yaml ran nothing


def test_train_config_types_are_checked(capsys, tmp_path, data_dir):
    for name, needle in (
        ("config_wrong_types.yaml", "batch_size must be an integer"),
        ("config_billion_laughs.yaml", "targets must be a list of strings"),
        ("config_deep_nesting.yaml", "exceeded maximum nesting depth"),
        ("config_python_tag.yaml", "not valid YAML"),
        ("config_mixed_keys.yaml", "unknown setting(s) 1, None, batchsize"),
    ):
        rc, out, err = cli(capsys, "train", data_dir, "--out", tmp_path / "r", "--config", BAD / name)
        assert_one_error(rc, out, err, mentions=needle)


def test_steer_phrases_and_pairs(capsys, fake_run, special, tmp_path):
    before = tree(fake_run)
    for p in [*CORPUS, *special.values()]:
        for flag in ("--phrases", "--pairs"):
            vec = tmp_path / "v.safetensors"
            rc, out, err = cli(capsys, "steer", "build", fake_run, flag, p, "--out", vec)
            assert_one_error(rc, out, err, mentions=p.name)
            assert not vec.exists()
    assert tree(fake_run) == before
    for name, flag, needle in (
        ("phrases_bad_weights.yaml", "--phrases", "finite number"),
        ("phrases_layer_not_int.yaml", "--phrases", "layer must be an integer"),
        ("pairs_wrong_shape.yaml", "--pairs", "pair 1 must be"),
        ("pairs_deep_nesting.jsonl", "--pairs", "nested too deeply"),
        ("config_deep_nesting.yaml", "--phrases", "exceeded maximum nesting depth"),
    ):
        rc, out, err = cli(capsys, "steer", "build", fake_run, flag, BAD / name, "--out", tmp_path / "v.st")
        assert_one_error(rc, out, err, mentions=needle)


def test_history_db(capsys, tmp_path, special):
    for p in [*CORPUS, *special.values()]:
        if not os.path.lexists(p):
            continue
        before = (os.lstat(p).st_mode, p.read_bytes() if p.is_file() and p.stat().st_size < 1 << 20 else None)
        rc, out, err = cli(capsys, "history", tmp_path, "--db", p)
        assert_one_error(rc, out, err, mentions=p.name)
        assert (os.lstat(p).st_mode, p.read_bytes() if p.is_file() and p.stat().st_size < 1 << 20 else None) == before
    assert list(tmp_path.iterdir()) == []
    rc, out, err = cli(capsys, "history", tmp_path, "--db", BAD / "sqlite_other_schema.sqlite")
    assert "without convsim's sessions and messages tables" in err


def test_train_and_stats_on_a_corrupt_data_dir(capsys, tmp_path, special):
    for i, p in enumerate([*FILES, special["fifo.yaml"], special["zero.yaml"], special["a_directory"]]):
        d = tmp_path / f"d{i}"
        d.mkdir()
        target = d / "conversations.jsonl"
        if p.is_file() and not p.is_symlink():
            shutil.copy(p, target)
        elif p.is_dir():
            target.mkdir()
        else:
            os.symlink(p, target)
        before = tree(d)
        rc, out, err = cli(capsys, "stats", d)
        assert_one_error(rc, out, err)
        rc, out, err = cli(
            capsys, "train", d, "--out", tmp_path / "runs" / p.name, "--model", "tiny-llama", "--max-steps", "1"
        )
        assert_one_error(rc, out, err)
        assert "conversations.jsonl" in err or "speaker" in err, (p.name, err)
        assert not (tmp_path / "runs").exists() and tree(d) == before
    for name, needle in (
        ("conversations_time_not_iso.jsonl", "ISO 8601"),
        ("random_binary.bin", "not UTF-8"),
        ("deep_nesting_array.json", "nested too deeply"),
        ("truncated_telegram.json", ":1:"),
    ):
        d = tmp_path / f"x-{name}"
        d.mkdir()
        shutil.copy(BAD / name, d / "conversations.jsonl")
        assert_one_error(*cli(capsys, "stats", d), mentions=needle)


def test_a_few_real_subprocesses(tmp_path, fake_run):
    """The same answers from the console entry point: one `error:` line, exit 2, no traceback."""
    for args in (
        ["reply", fake_run, "--as", "Ana", "--history", BAD / "random_binary.bin"],
        ["history", tmp_path, "--db", BAD / "sqlite_truncated.sqlite"],
    ):
        r = subprocess.run(
            [sys.executable, "-m", "convsim", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert_one_error(r.returncode, r.stdout, r.stderr)


# ----------------------------------------------------------------------------- permissions


def modes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): oct(os.lstat(p).st_mode & 0o777) for p in [root, *root.rglob("*")]}


def test_data_dir_is_owner_only_whatever_the_umask(capsys, tmp_path):
    (tmp_path / "chat.txt").write_text(WA)
    old = os.umask(0)
    try:
        rc, _, err = cli(capsys, "import", tmp_path / "chat.txt", "--out", tmp_path / "new" / "data")
        assert rc == 0, err
        (tmp_path / "existing").mkdir(mode=0o777)
        (tmp_path / "existing" / "notes.txt").write_text("mine")  # another file: per-file replacement
        rc, _, err = cli(capsys, "import", tmp_path / "chat.txt", "--out", tmp_path / "existing")
        assert rc == 0, err
    finally:
        os.umask(old)
    for d in ("new/data", "existing"):
        m = modes(tmp_path / d)
        assert m["."] == "0o700", m
        assert m["conversations.jsonl"] == m["import.json"] == "0o600", m
    assert oct(os.stat(tmp_path / "new").st_mode & 0o777) == "0o700"  # a parent convsim created


def test_run_dir_is_owner_only(capsys, tmp_path, data_dir):
    """Training under a permissive umask: the run dir, its data and every file a library writes in it
    (checkpoints, tokenizer, logs, metrics) are owner-only."""
    old = os.umask(0o022)
    try:
        rc, out, err = cli(
            capsys,
            "train",
            data_dir,
            "--out",
            tmp_path / "runs" / "r",
            "--model",
            "tiny-llama",
            "--max-steps",
            "1",
            "--batch-size",
            "4",
            "--eval-steps",
            "1",
            "--save-steps",
            "1",
            "--max-val-examples",
            "4",
            "--json",
        )
    finally:
        os.umask(old)
    assert rc == 0, err[-2000:]
    m = modes(tmp_path / "runs" / "r")
    assert m["."] == m["data"] == "0o700" and m["data/conversations.jsonl"] == "0o600", m
    assert m["run.json"] == m["config.yaml"] == "0o600", m
    loose = {k: v for k, v in m.items() if v not in ("0o700", "0o600")}
    assert not loose, loose
    assert oct(os.stat(tmp_path / "runs").st_mode & 0o777) == "0o700"


def test_conversation_db_is_owner_only(tmp_path):
    from convsim.data.schema import Message
    from convsim.chat.history import connect, save_session

    old = os.umask(0o022)
    try:
        db_path = tmp_path / "new" / "conversations.sqlite"
        save_session(db_path, "chat", [Message("Ana", "hi"), Message("Ben", "yo")], "m", "h", {}, None)
        db = connect(db_path)  # while open, the WAL and shared-memory files exist
        db.execute("INSERT INTO sessions (kind) VALUES ('x')")
        db.commit()
        side = {p.name: oct(p.stat().st_mode & 0o777) for p in db_path.parent.iterdir()}
        db.close()
    finally:
        os.umask(old)
    assert side == {
        "conversations.sqlite": "0o600",
        "conversations.sqlite-wal": "0o600",
        "conversations.sqlite-shm": "0o600",
    }, side
    assert oct(os.stat(tmp_path / "new").st_mode & 0o777) == "0o700"


# ----------------------------------------------------------------------------- no pickle

UNSAFE = [
    # importing pickle for its error class is fine; reading with it is not
    (re.compile(r"\bpickle\.(loads?|Unpickler)\b|\bcPickle\b|\bdill\b|\bjoblib\.load\("), "pickle"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy pickle"),
    (re.compile(r"yaml\.(unsafe_)?load\((?![^)]*SafeLoader)|yaml\.full_load|yaml\.unsafe_load"), "unsafe YAML"),
    (re.compile(r"(?<![.\w])(eval|exec)\("), "eval/exec"),
]


def call_text(text: str, start: int) -> str:
    """The source of the call whose name starts at `start` (balanced parentheses)."""
    depth, i = 0, text.index("(", start)
    while True:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start : i + 1]
        i += 1


def test_no_pickle_or_unsafe_loading_in_convsim():
    src = Path(__file__).parents[2] / "convsim"
    found = []
    for f in src.rglob("*.py"):
        text = f.read_text(encoding="utf-8")
        for rx, what in UNSAFE:
            found += [f"{f.name}: {what}: {m.group(0)}" for m in rx.finditer(text)]
        for m in re.finditer(r"torch\.load\(", text):  # allowed only as torch.load(..., weights_only=True)
            if "weights_only=True" not in call_text(text, m.start()):
                found.append(f"{f.name}: {call_text(text, m.start())}")
    assert not found, found


def test_dependencies_resume_without_unrestricted_pickle():
    """Resuming training (HF Trainer) and loading adapters (PEFT) read checkpoint .pt/.bin files with
    torch.load(weights_only=True); guard against an upgrade that changes that."""
    import peft.utils.save_and_load as peft_io
    import transformers.trainer as trainer

    text = Path(trainer.__file__).read_text()
    calls = [call_text(text, m.start()) for m in re.finditer(r"torch\.load\(", text)]
    assert calls and all("weights_only=True" in c for c in calls), [c for c in calls if "weights_only=True" not in c]
    assert "def torch_load(*args, weights_only=True" in Path(peft_io.__file__).read_text()


def test_pickled_adapter_is_refused(tmp_path):
    from convsim.modeling.models import load

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter" / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(UserError, match="never pickled"):
        load("tiny-llama", adapter=tmp_path / "adapter", device="cpu")


# ----------------------------------------------------------------------------- names that become paths


@SETTINGS
@given(st.text(max_size=120), st.text(max_size=120))
def test_safe_name_is_never_a_path_and_never_collides(a, b):
    from convsim.fsutil import safe_name

    for name in (a, b):
        s = safe_name(name)
        assert s and len(s) <= 80 and s not in (".", "..") and not s.startswith(".")
        assert "/" not in s and "\\" not in s and "\0" not in s and ".." not in s
        assert safe_name(name) == s
    if a != b:
        assert safe_name(a) != safe_name(b)


def test_path_like_speaker_names_stay_inside(capsys, tmp_path):
    from convsim.fsutil import safe_name

    src = tmp_path / "in" / "chat.txt"
    src.parent.mkdir()
    src.write_text(
        "01/02/2024, 10:00 - ../../evil: hi\n01/02/2024, 10:01 - /etc/passwd: yo\n01/02/2024, 10:02 - ..: x\n"
    )
    rc, _, err = cli(capsys, "import", src, "--out", tmp_path / "out" / "data")
    assert rc == 0, err
    made = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}
    assert made == {"in", "in/chat.txt", "out", "out/data", "out/data/conversations.jsonl", "out/data/import.json"}
    for name in ("../../evil", "/etc/passwd", "..", "a\\..\\b", "CON"):
        assert (tmp_path / safe_name(name)).parent == tmp_path


# ----------------------------------------------------------------------------- crash safety: import


def _wa(n: int, seed: int, who=("Ana", "Ben")) -> str:
    r = random.Random(seed)
    return "".join(
        f"01/02/2024, {10 + i // 3600 % 12:02d}:{i // 60 % 60:02d} - {r.choice(who)}: msg {i} {seed}\n"
        for i in range(n)
    )


def _state(out: Path) -> tuple[str, str] | None:
    """(sha of conversations.jsonl, the source name import.json records), checking the pair is whole and
    consistent; None when DATA_DIR does not exist."""
    if not out.exists():
        return None
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["conversations.jsonl", "import.json"]
    rows = [json.loads(line) for line in (out / "conversations.jsonl").read_text().splitlines()]
    meta = json.loads((out / "import.json").read_text())
    assert meta["messages"] == sum(len(r["messages"]) for r in rows)  # both files from one import
    assert all(r["source"].startswith(f"whatsapp:{meta['sources'][0]['name']}") for r in rows)
    return hashlib.sha256((out / "conversations.jsonl").read_bytes()).hexdigest(), meta["sources"][0]["name"]


def _leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith((".tmp", ".old"))]


def _import(src: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "convsim", "import", str(src), "--out", str(out), "--gap-minutes", "0", "--no-scrub"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_import_killed_at_random_moments(tmp_path):
    old_src, new_src = tmp_path / "old.txt", tmp_path / "new.txt"
    old_src.write_text(_wa(300, 1))
    new_src.write_text(_wa(25_000, 2))
    ref = tmp_path / "ref"
    t0 = time.monotonic()
    assert _import(new_src, ref / "data").wait() == 0
    span = time.monotonic() - t0
    new = _state(ref / "data")
    rng = random.Random(12)
    outcomes = []
    for i in range(8):
        root = tmp_path / f"k{i}"
        out = root / "data"
        existing = i % 2 == 1
        if existing:
            assert _import(old_src, out).wait() == 0
        old = _state(out)
        p = _import(new_src, out)
        time.sleep(rng.uniform(0.02, span * 1.1))
        p.send_signal(signal.SIGKILL)
        rc = p.wait()
        got = _state(out)
        assert got in (old, new), (i, got)
        outcomes.append((rc, got == new))
        assert _import(new_src, out).wait() == 0  # a rerun finishes
        assert _state(out) == new
        assert _leftovers(root) == [], _leftovers(root)  # and cleans what the killed one left
    assert any(rc == -signal.SIGKILL for rc, _ in outcomes)


def _kill_at(point: int, when: str, src: Path, out: Path) -> int:
    """Fork a child that imports src into out and SIGKILLs itself just before/after the point-th rename,
    exchange or fsync an atomic write makes; returns the number of such points the child reached."""
    import convsim.data.import_cli  # noqa: F401  (imported once, before forking)
    import convsim.fsutil as fs

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        count = [0]

        def wrap(fn):
            def inner(*a, **k):
                count[0] += 1
                os.write(w, b".")
                if count[0] == point and when == "before":
                    os.kill(os.getpid(), signal.SIGKILL)
                res = fn(*a, **k)
                if count[0] == point and when == "after":
                    os.kill(os.getpid(), signal.SIGKILL)
                return res

            return inner

        fs.os.replace = wrap(os.replace)
        fs.os.fsync = wrap(os.fsync)
        fs._exchange = wrap(fs._exchange)
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            main(["import", str(src), "--out", str(out), "--gap-minutes", "0", "--no-scrub"])
        finally:
            os._exit(0)
    os.close(w)
    reached = b""
    while chunk := os.read(r, 4096):
        reached += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return len(reached)


def test_import_killed_at_every_rename_and_fsync(tmp_path):
    old_src, new_src = tmp_path / "old.txt", tmp_path / "new.txt"
    old_src.write_text(_wa(50, 3))
    new_src.write_text(_wa(80, 4))
    ref = tmp_path / "ref" / "data"
    assert main(["import", str(new_src), "--out", str(ref), "--gap-minutes", "0", "--no-scrub"]) == 0
    new = _state(ref)
    for layout in ("fresh", "existing", "existing+other"):
        total = None
        for point in range(0, 1000):
            for when in ("before", "after"):
                root = tmp_path / f"{layout}-{point}-{when}"
                out = root / "data"
                if layout != "fresh":
                    assert main(["import", str(old_src), "--out", str(out), "--gap-minutes", "0"]) == 0
                if layout == "existing+other":
                    (out / "notes.txt").write_text("kept")
                old = _state(out) if layout != "existing+other" else None
                reached = _kill_at(point or 10**9, when, new_src, out)
                if point == 0:  # a run without a kill: count the points, check it completed
                    total = reached
                    assert layout == "existing+other" or _state(out) == new
                    break
                if layout == "existing+other":
                    # per-file replacement: each file whole (old or new); the pair may mix until the rerun
                    json.loads((out / "import.json").read_text())
                    [json.loads(x) for x in (out / "conversations.jsonl").read_text().splitlines()]
                    assert (out / "notes.txt").read_text() == "kept"
                else:
                    assert _state(out) in (old, new), (layout, point, when)
                assert main(["import", str(new_src), "--out", str(out), "--gap-minutes", "0", "--no-scrub"]) == 0
                if layout != "existing+other":
                    assert _state(out) == new
                assert _leftovers(root) == [], (layout, point, when, _leftovers(root))
            if point >= total:
                break
        assert total >= 6, (layout, total)  # fsync + rename + directory fsync of each of the two files


def test_atomic_dir_swaps_in_one_step_and_repairs_the_fallback(tmp_path, monkeypatch):
    import convsim.fsutil as fs

    target = tmp_path / "d"
    with fs.atomic_dir(target) as tmp:
        (tmp / "v").write_text("1")
    with fs.atomic_dir(target) as tmp:
        (tmp / "v").write_text("2")
    assert (target / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    # the fallback (no renameat2) killed between its two renames: the next atomic_dir restores the old one
    (tmp_path / ".d.old").mkdir()
    (tmp_path / ".d.old" / "v").write_text("2")
    shutil.rmtree(target)
    monkeypatch.setattr(fs, "_exchange", lambda a, b: False)
    with pytest.raises(RuntimeError):
        with fs.atomic_dir(target):
            assert (target / "v").read_text() == "2"
            raise RuntimeError("fail after the repair")
    assert (target / "v").read_text() == "2"
    with fs.atomic_dir(target) as tmp:
        (tmp / "v").write_text("3")
    assert (target / "v").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_stale_temporaries_of_live_processes_are_kept(tmp_path):
    from convsim.fsutil import clean_stale_temps, write_text

    live = tmp_path / f".f.{os.getppid()}.abc.tmp"
    live.write_text("someone else is writing")
    dead = tmp_path / ".f.999999999.abc.tmp"
    dead.write_text("killed")
    write_text(tmp_path / "f", "x")
    assert live.exists() and not dead.exists() and clean_stale_temps(tmp_path / "f") == 0


# ----------------------------------------------------------------------------- crash safety: saving a conversation

SAVER = """
import sys
from convsim.data.schema import Message
from convsim.chat.history import save_session
db, start = sys.argv[1], int(sys.argv[2])
for s in range(start, start + 10_000):
    msgs = [Message("Ana" if i % 2 else "Ben", f"session {s} message {i} " + "x" * (i % 97)) for i in range(300)]
    save_session(db, "chat", msgs, "tiny-llama", "abc", {"temperature": 0.7, "n": s}, None, generated={1, 3})
    print(s, flush=True)
"""


def _check_db(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        sessions = db.execute("SELECT id, sampling FROM sessions ORDER BY id").fetchall()
        for sid, sampling in sessions:
            n = json.loads(sampling)["n"]
            rows = db.execute(
                "SELECT idx, speaker, text, generated FROM messages WHERE session=? ORDER BY idx", (sid,)
            ).fetchall()
            assert len(rows) == 300, (sid, len(rows))  # never a half-saved session
            assert rows[-1][2] == f"session {n} message 299 " + "x" * (299 % 97)
            assert [r[3] for r in rows[:4]] == [0, 1, 0, 1]
        return len(sessions)
    finally:
        db.close()


def test_saving_conversations_killed_at_random_moments(tmp_path):
    path = tmp_path / "run" / "conversations.sqlite"
    rng = random.Random(5)
    saved = 0
    for k in range(6):
        p = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(path), str(k * 10_000)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(rng.uniform(0.15, 0.9))
        p.send_signal(signal.SIGKILL)
        printed = p.stdout.read().split()
        p.wait()
        n = _check_db(path)
        assert n >= saved + len(printed)  # every session reported saved is there, whole
        saved = n
        assert oct(path.stat().st_mode & 0o777) == "0o600"
    r = subprocess.run(
        [sys.executable, "-c", SAVER.replace("10_000)", "1)"), str(path), "99"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert _check_db(path) == saved + 1  # and saving goes on after the kills


# ----------------------------------------------------------------------------- resource bounds


def test_import_bounds(capsys, tmp_path):
    src = tmp_path / "chat.txt"
    src.write_text("01/02/2024, 10:00 - Ana: " + "long " * 100 + "\n01/02/2024, 10:01 - Ben: short\n")
    rc, out, err = cli(capsys, "import", src, "--out", tmp_path / "d", "--max-message-chars", "50")
    assert rc == 0 and "truncated 1 messages longer than 50 characters" in out, (out, err)
    assert json.loads((tmp_path / "d" / "import.json").read_text())["truncated"] == 1
    rc, out, err = cli(capsys, "import", src, "--out", tmp_path / "e", "--max-messages", "1")
    assert_one_error(rc, out, err, mentions="--max-messages")
    rc, out, err = cli(capsys, "import", src, "--out", tmp_path / "e", "--max-message-chars", "0")
    assert_one_error(rc, out, err, mentions="--max-message-chars must be at least 1")
    assert not (tmp_path / "e").exists()


def test_a_model_that_does_not_fit_is_a_clear_error(capsys, tmp_path, data_dir):
    model = tmp_path / "huge-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 140 << 30}, "weight_map": {}})
    )
    rc, out, err = cli(capsys, "train", data_dir, "--out", tmp_path / "r", "--model", model, "--max-steps", "1")
    assert_one_error(rc, out, err, mentions="does not fit in memory")
    assert "280.0 GiB" in err and "GiB free" in err  # bf16 on disk, float32 on the CPU
    assert not (tmp_path / "r").exists()


def test_out_of_memory_while_loading_is_a_user_error(monkeypatch):
    import convsim.modeling.models as models

    def boom(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(models, "_tiny_model", boom)
    with pytest.raises(UserError, match=r"out of memory loading tiny-llama \(.*GiB free on cpu\)"):
        models.load_base("tiny-llama", device="cpu")


def test_torch_out_of_memory_is_one_error_line(capsys):
    import types

    import torch

    from convsim.cli import _run

    def run(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert _run(types.SimpleNamespace(run=run), None) == 2
    assert_one_error(2, "", capsys.readouterr().err, mentions="out of accelerator memory")


def test_user_text_files_are_bounded(tmp_path):
    from convsim.fsutil import read_user_text

    (tmp_path / "big.yaml").write_bytes(b"a: 1\n" * 300_000)
    with pytest.raises(UserError, match="larger than|more than"):
        read_user_text(tmp_path / "big.yaml", "config file", max_bytes=1 << 20)
    assert read_user_text(BAD.parent / "bad" / "csv_formula_injection.csv", "x").startswith("AuthorID")


# ----------------------------------------------------------------------------- fuzzing the other readers


def _user_error_or_value(fn, *args):
    try:
        return fn(*args)
    except UserError as e:
        assert str(e).strip()
        return None


HISTORY_PIECES = st.sampled_from(
    [
        "[Ana] ",
        "[Ben] ",
        "[",
        "]",
        "[Eve] ",
        "\n",
        "{",
        "}",
        '"speaker": "Ana"',
        '"text": "hi"',
        '"messages": [',
        ", ",
        ":",
        "null",
        "\ufeff",
        "\0",
        "😀",
    ]
)


@SETTINGS
@given(st.lists(HISTORY_PIECES | st.text(max_size=8), max_size=40).map("".join))
def test_fuzz_history(text):
    from convsim.data.transcript import parse_transcript

    msgs = _user_error_or_value(parse_transcript, text, ["Ana", "Ben"])
    for m in msgs or []:
        assert m.speaker in ("Ana", "Ben") and isinstance(m.text, str) and (m.time is None or isinstance(m.time, str))


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=10)
    | st.sampled_from(["2024-01-02T10:00:00", "Ana", "Ben", "yesterday"]),
    lambda kids: (
        st.lists(kids, max_size=3)
        | st.dictionaries(st.sampled_from(["id", "messages", "speaker", "text", "time", "source"]), kids, max_size=4)
    ),
    max_leaves=10,
)


@SETTINGS
@given(
    st.lists(JSON_VALUES.map(lambda v: json.dumps(v, ensure_ascii=False).encode()) | st.binary(max_size=40), max_size=4)
)
def test_fuzz_conversations_jsonl(tmp_path_factory, lines):
    from convsim.data.schema import read_conversations

    d = tmp_path_factory.mktemp("fz")
    (d / "conversations.jsonl").write_bytes(b"\n".join(lines))
    for c in _user_error_or_value(read_conversations, d) or []:
        for m in c.messages:
            assert isinstance(m.speaker, str) and isinstance(m.text, str)
            assert m.time is None or m.dt() is not None


YAML_PIECES = st.sampled_from(
    [
        "model: ",
        "targets: ",
        "batch_size: ",
        "learning_rate: ",
        "phrases: ",
        "pairs: ",
        "- ",
        "[",
        "]",
        "{",
        "}",
        ": ",
        "\n",
        "  ",
        "&a ",
        "*a",
        "!!python/object ",
        "1",
        "-2.5",
        ".nan",
        "null",
        "true",
        "Ana",
        "'x'",
        "lora_r: ",
        "speaker_references: ",
        "positive: ",
        "negative: ",
        "layer: ",
        "pool: ",
        "# c",
        "2024-13-45",
        "!!binary ",
        "? ",
    ]
)


@SETTINGS
@given(st.lists(YAML_PIECES | st.text(max_size=6), max_size=30).map("".join))
def test_fuzz_config_phrases_pairs(tmp_path_factory, text):
    from convsim.config import TrainConfig, load_yaml
    from convsim.steering.files import load_pairs, load_phrase_set

    d = tmp_path_factory.mktemp("fy")
    f = d / "f.yaml"
    f.write_text(text, encoding="utf-8")
    data = _user_error_or_value(load_yaml, f)
    if data is not None:
        try:
            TrainConfig(**data).validate()
        except UserError:
            pass
    _user_error_or_value(load_phrase_set, f)
    pairs = _user_error_or_value(load_pairs, f)
    assert pairs is None or all(isinstance(a, str) and isinstance(b, str) for a, b in pairs)
