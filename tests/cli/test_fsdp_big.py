"""bench/fsdp_big.py (FSDP2 full-parameter training of a model too large for one GPU) on the CPU: two
processes under torchrun over gloo with the tiny Gemma-3-style model, the JSON rank 0 writes, and the
fp32-moment AdamW it uses checked against torch.optim.AdamW."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "fsdp_big.py"
# found the same way as in tests/cli/test_distributed.py
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")


def _has_fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
@pytest.mark.skipif(not _has_fully_shard(), reason="torch without FSDP2 (fully_shard)")
def test_fsdp2_two_process_cpu(tmp_path):
    out = tmp_path / "fsdp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    p = subprocess.run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc_per_node",
            "2",
            str(SCRIPT),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--tiny",
            "--steps",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    r = json.loads(out.read_text())
    assert r["status"] == "done" and "error" not in r, r
    assert r["world_size"] == 2 and r["engine"] == "torch FSDP2 fully_shard"
    assert r["params"] > 0 and r["bytes_per_param_plain"] == 12
    assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
    assert r["losses"][-1] < r["losses"][0]  # a fixed batch: training must lower the loss
    assert r["tokens_per_s"] > 0 and r["step_s_median"] > 0
    # each rank holds fp32 moments for its half of the parameters only (sharded, not replicated)
    for rank in r["per_rank"]:
        assert rank["opt_state_gib"] * 2**30 < 0.6 * 8 * r["params"]
    assert "[fsdp_big" in p.stdout and "step 3/3" in p.stdout


def test_adamw_fp32_state_matches_torch():
    spec = importlib.util.spec_from_file_location("fsdp_big", SCRIPT)
    fb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fb)
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(7, 5))
    b = torch.nn.Parameter(a.detach().clone())
    ours = fb.AdamWFp32State([a], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(7, 5)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    assert ours.state_bytes() == 2 * 4 * a.numel()
