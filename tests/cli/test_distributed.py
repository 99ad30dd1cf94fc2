"""`convsim train` under torchrun with two processes (DDP over gloo on the CPU): the path multi-GPU
training takes under `accelerate launch`/`torchrun`. Checks that the reply-only loss goes through the
DDP wrapper, that only rank 0 writes the run, and that the run records the world size."""

import json
import os
import shutil
import subprocess
import sys

import pytest


TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
def test_two_process_ddp_training(data_dir, tmp_path):
    torchrun = TORCHRUN
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "-m",
            "convsim",
            "train",
            str(data_dir),
            "--out",
            str(out),
            "--model",
            "tiny-gemma3",
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--eval-steps",
            "100",
            "--save-steps",
            "100",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    summaries = [json.loads(l) for l in p.stdout.splitlines() if l.startswith('{"')]
    assert len(summaries) == 1  # only rank 0 reports and writes
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "done" and meta["world_size"] == 2 and meta["global_step"] == 3
    assert (out / "adapter" / "adapter_model.safetensors").exists()
