"""`convsim tda index` killed with SIGKILL (at the start, in the middle, while publishing) and run again: the
index resumes where the killed build stopped (or rebuilds a stale one) and answers the same queries as an
uninterrupted build, with nothing left behind; until then queries refuse the unfinished index rather than
answer from part of it: `pytest tests/cli/test_tda_kill.py`.

The killed builds are real processes. One kind SIGKILLs itself just before or just after a chosen write of
the build (every `os.fsync` and `os.replace` is a point: the centring mean, the empty store, each chunk's
rows and the index that publishes them), so each moment is hit exactly; the other is killed from outside at
random moments, as the import and training tests do.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import cli
from convsim.runs import open_run
from convsim.tda.index import IndexSpec, training_messages, update_index
from convsim.errors import UserError
from convsim.tda.query import Attributor, open_for_query
from convsim.tda.store import CorruptStore, NoStore, VectorStore

CHUNK = 32  # rows per commit in the killed builds, so a build of the tiny run commits several times

# Runs `convsim tda index ARGS` in a process that writes one line per fsync/replace to MARKS (the operation and
# the file) and SIGKILLs itself just before or after the POINT-th of them (0: never).
KILLER = r"""
import os, signal, sys
point, when, marks, chunk, *args = sys.argv[1:]
point, fd = int(point), os.open(marks, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
import convsim.tda.index
convsim.tda.index.CHUNK = int(chunk)
count = [0]

def wrap(fn, name):
    def inner(*a, **k):
        count[0] += 1
        target = a[1] if name == "replace" else os.readlink(f"/proc/self/fd/{a[0]}")
        os.write(fd, f"{name} {os.path.basename(target)}\n".encode())
        if count[0] == point and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = fn(*a, **k)
        if count[0] == point and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return inner

os.replace, os.fsync = wrap(os.replace, "replace"), wrap(os.fsync, "fsync")
from convsim.cli import main
sys.exit(main(["tda", "index", *args]))
"""

QUERIES = [
    ("see you at the lake!", "Ana"),
    ("i love pizza so much", "Ana"),
    ("Maybe tomorrow then.", "Ben"),
    ("ok", "Ben"),
]


def killer(run: Path, point: int, when: str, marks: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", KILLER, str(point), when, str(marks), str(CHUNK), str(run), "--json", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def fresh_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "logs", "tda"))
    return dst


def committed_rows(run: Path) -> int:
    """Rows the killed build committed: 0 without a store; a damaged store fails the test (a kill must
    leave the last committed store whole)."""
    try:
        return VectorStore.open(run / "tda" / "activations").n
    except NoStore:
        return 0
    except CorruptStore as e:
        pytest.fail(f"the kill left a damaged index: {e}")


@pytest.fixture(scope="module")
def base(tiny_run, tmp_path_factory):
    return fresh_copy(tiny_run, tmp_path_factory.mktemp("tdakill") / "base")


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """An uninterrupted build through the same killer process (point 0), and the points it went through."""
    run = fresh_copy(base, tmp_path_factory.mktemp("tdakill") / "ref")
    marks = run.parent / "marks"
    p = killer(run, 0, "never", marks)
    assert p.returncode == 0, p.stderr[-3000:]
    return run, marks.read_text().splitlines()


@pytest.fixture(scope="module")
def loaded(base):
    run = open_run(base)
    model, tok = run.load(device="cpu")
    return model, tok, training_messages(run)


def assert_same_index(run: Path, ref: Path, loaded) -> None:
    """`run`'s index holds what the uninterrupted build holds, vector for vector, answers the same queries,
    and its directory holds nothing else (no temporary file, no orphaned mean or data file)."""
    model, tok, items = loaded
    where = run / "tda" / "activations"
    files = sorted(p.name for p in where.iterdir())
    assert len(files) == 3 and files[1] == "index.json", files
    assert files[0].startswith("center-") and files[2] in ("vectors.f16", "vectors.1.f16"), files
    got, want = VectorStore.open(where), VectorStore.open(ref / "tda" / "activations")
    got.verify(full=True)
    assert got.n == want.n and not got.dead
    assert got.meta == want.meta
    for it in items:
        np.testing.assert_allclose(
            got.vectors[got.row_of(it)].astype(np.float32), want.vectors[want.row_of(it)].astype(np.float32), atol=2e-3
        )
    a, b = Attributor(open_run(run), model, tok, k=5), Attributor(open_run(ref), model, tok, k=5)
    for text, who in QUERIES:
        ha, hb = a.query(text, who), b.query(text, who)
        assert [(h["speaker"], h["text"]) for h in ha] == [(h["speaker"], h["text"]) for h in hb], text
        np.testing.assert_allclose([h["score"] for h in ha], [h["score"] for h in hb], atol=2e-3)


def moments(marks: list[str]) -> dict[str, tuple[int, str]]:
    """Named kill points (1-based, before/after) in the sequence of writes of a fresh build."""
    index_commits = [i + 1 for i, m in enumerate(marks) if m == "replace index.json"]
    data_syncs = [i + 1 for i, m in enumerate(marks) if m.startswith("fsync vectors")]
    center = next(i + 1 for i, m in enumerate(marks) if m.startswith("replace center"))
    # the empty store, one commit per chunk of rows, and the one that says the build is finished
    assert len(index_commits) == len(data_syncs) + 1 >= 5, marks
    mid = len(data_syncs) // 2
    return {
        "start: the centring mean written, not yet synced": (1, "before"),
        "the centring mean published, no store yet": (center, "after"),
        "the empty store published": (index_commits[0], "after"),
        "middle: a chunk's rows written past the committed ones": (data_syncs[mid], "after"),
        "middle: while publishing a chunk": (index_commits[mid], "before"),
        "middle: a chunk just published": (index_commits[mid], "after"),
        "while publishing the last chunk": (index_commits[-2], "before"),
        "while publishing that the build is finished": (index_commits[-1], "before"),
        "the finished index published, its directory not yet synced": (index_commits[-1] + 1, "before"),
    }


@pytest.fixture(scope="module")
def stale(base, tmp_path_factory):
    """An index of the tiny run built with another pooling: a default build finds it stale and replaces it."""
    run = fresh_copy(base, tmp_path_factory.mktemp("tdakill") / "stale")
    cli("tda", "index", run, "--pool", "last", "--json")
    return run / "tda"


@pytest.mark.parametrize("start", ["no index", "a stale index"])
def test_tda_index_killed_at_each_moment_resumes_to_the_same_answers(start, base, reference, stale, loaded, tmp_path):
    ref, marks = reference
    model, tok, items = loaded
    total = len({(it.speaker, it.time, it.text) for it in items})
    assert total > 3 * CHUNK
    finished = [i + 1 for i, m in enumerate(marks) if m == "replace index.json"][-1]
    for k, (what, (point, when)) in enumerate(moments(marks).items()):
        run = fresh_copy(base, tmp_path / f"k{k}")
        if start == "a stale index":
            shutil.copytree(stale, run / "tda")
        p = killer(run, point, when, tmp_path / f"k{k}.marks")
        assert p.returncode == -signal.SIGKILL, (what, p.returncode, p.stderr[-2000:])
        before = committed_rows(run)
        left = (
            VectorStore.open(run / "tda" / "activations").meta
            if (run / "tda" / "activations" / "index.json").exists()
            else {}
        )
        still_stale = left.get("pool") == "last"
        if left and not still_stale:  # the killed build's own store: queried only once it is finished
            published = point > finished or (point == finished and when == "after")
            assert left.get("unfinished", False) == (not published), (what, before)
            if not published:
                with pytest.raises(UserError, match="not finished"):
                    open_for_query(open_run(run), "activations")
        stats = update_index(open_run(run), IndexSpec(), model, tok, progress=False, log=lambda _msg: None)
        # a store of the killed build is resumed; only the stale one (killed before its replacement was
        # published) is rebuilt
        assert (stats["rebuilt"] is not None) == still_stale, (what, stats)
        assert stats["computed"] == total - (0 if still_stale else before), (what, before, stats)
        assert stats["rows"] == total, (what, stats)
        assert_same_index(run, ref, loaded)


def test_tda_index_killed_at_random_moments_then_run_again(base, reference, loaded, tmp_path):
    ref, _ = reference
    span_run = fresh_copy(base, tmp_path / "timed")
    t0 = time.monotonic()
    cli("tda", "index", span_run, "--json")
    span = time.monotonic() - t0
    rng = random.Random(6)
    killed = 0
    for k in range(3):
        run = fresh_copy(base, tmp_path / f"r{k}")
        p = subprocess.Popen(
            [sys.executable, "-m", "convsim", "tda", "index", str(run), "--json"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.3 * span, span * 1.05))  # the first third of a run is starting python and torch
        p.send_signal(signal.SIGKILL)
        killed += p.wait() == -signal.SIGKILL
        before = committed_rows(run)
        again = json.loads(cli("tda", "index", run, "--json").stdout)
        assert again["rebuilt"] is None and again["computed"] == again["rows"] - before, (before, again)
        assert_same_index(run, ref, loaded)
    assert killed, "every build ended before its kill"
    assert_same_index(span_run, ref, loaded)
