"""A checkpoint dir is user-supplied input: resuming from one whose state files would run code when unpickled,
or that are damaged, ends with one `error:` line (exit 2) naming the file and how to start fresh; the planted
code never runs and nothing of the run is changed.

    pytest tests/cli/test_checkpoint_safety.py      # one tiny-gemma3 run, then a few refused resumes
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from convsim.training.checkpoints import last_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


class Payload:
    """Unpickling this calls os.system, which creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def convsim(*args):
    return subprocess.run(
        [sys.executable, "-m", "convsim", *map(str, args)], capture_output=True, text=True, env=ENV, timeout=600
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("safety") / "run"
    args = ["train", data_dir, "--out", run, "--model", "tiny-gemma3", "--max-steps", 4, "--save-steps", 2]
    p = convsim(*args, "--batch-size", 4, "--eval-steps", 1000, "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    return run


def _snapshot(run):
    return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
@pytest.mark.parametrize("kind", ["malicious", "truncated"])
def test_refused_or_damaged_checkpoint_is_one_error_line(tmp_path, data_dir, trained, name, kind):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckpt = last_checkpoint(run / "checkpoints")
    # the run is left as if killed before its end: resuming continues from its last checkpoint
    (run / "adapter").exists() and shutil.rmtree(run / "adapter")
    target, marker = ckpt / name, tmp_path / "pwned"
    if kind == "malicious":
        torch.save({"state": Payload(marker)}, target)  # the form torch.save writes, with a code-running pickle
    else:
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    before = _snapshot(run)
    p = convsim("train", data_dir, "--out", run, "--continue-training", "--max-steps", 6, "--json")
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    assert "Traceback" not in p.stderr and str(target) in lines[0]
    assert "to start fresh" in lines[0] and "--out" in lines[0]
    assert ("could run code" in lines[0]) == (kind == "malicious")
    assert not marker.exists(), "the planted pickle ran"
    assert _snapshot(run) == before, "a refused resume changed the run"
    assert p.stdout == ""


def test_a_checkpoint_convsim_wrote_passes_the_check(trained):
    from convsim.training.checkpoints import verify_checkpoint

    ckpt = last_checkpoint(trained / "checkpoints")
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {f.name for f in ckpt.iterdir()}
    verify_checkpoint(ckpt, trained)  # raises UserError if any state it holds is refused
