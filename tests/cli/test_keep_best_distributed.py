"""--keep-best under several processes, over gloo on the CPU: `convsim train --keep-best` under torchrun (DDP)
ends every process with the kept weights and saves them; under FSDP2 the kept weights are gathered from the
shards and restored into every shard (the path `accelerate launch --config_file configs/accelerate/fsdp.yaml`
takes, with the stand-in Accelerator of test_fsdp_tied.py, since accelerate will not run FSDP on the CPU).

    pytest tests/cli/test_keep_best_distributed.py
    torchrun --nproc_per_node 2 tests/cli/test_keep_best_distributed.py OUT     # the FSDP2 worker
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")


def torchrun(*args, env=ENV, timeout=300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS`; on a timeout (ranks waiting on each other) the whole
    process group is killed, so no worker outlives the test."""
    p = subprocess.Popen(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s (a collective that not every rank joined?)\n{err[-3000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _has_fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
def test_keep_best_under_two_process_ddp(tmp_path):
    from safetensors.torch import load_file

    from convsim.data.schema import write_conversations
    from test_keep_best import _contrary_conversations

    data_dir, out = tmp_path / "data", tmp_path / "run"
    write_conversations(data_dir / "conversations.jsonl", _contrary_conversations())
    conf = tmp_path / "c.yaml"
    conf.write_text("logging_steps: 2\nsamples: 0\n")
    args = ["--out", out, "--model", "tiny-gemma3", "--max-steps", "8", "--batch-size", "4"]
    args += ["--learning-rate", "1e-1", "--eval-steps", "2", "--save-steps", "100", "--seed", "0"]
    args += ["--keep-best", "--target", "Ana", "--config", conf, "--json"]
    p = torchrun("-m", "convsim", "train", data_dir, *args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len([line for line in p.stdout.splitlines() if line.startswith('{"')]) == 1  # rank 0 alone reports
    meta = json.loads((out / "run.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert meta["world_size"] == 2 and meta["global_step"] == 8
    assert best_step < 8 and [l for s, l in evals if s == 8][0] > best_loss + 1e-3, evals  # by construction
    assert meta["kept_best"]["step"] == best_step
    # the last evaluation ran over both processes' halves of the validation set: it equals the kept loss only
    # if both replicas hold the kept weights, not just rank 0's
    assert meta["eval_loss"] == pytest.approx(best_loss, abs=1e-5)
    kept = torch.load(out / "best" / "trained.pt", weights_only=True)
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    lora = [n for n in kept if ".lora_" in n]
    assert lora
    for n in lora:
        assert torch.equal(saved[n.replace(".default.", ".")].float(), kept[n].float()), n


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
@pytest.mark.skipif(not _has_fully_shard(), reason="torch without FSDP2 (fully_shard)")
def test_keep_best_under_fsdp2_gathers_and_restores_every_shard(tmp_path):
    env = dict(ENV, ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    p = torchrun(Path(__file__), tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        assert r["sharded"] and r["moved"], r  # the shards changed after the kept step ...
        assert r["restored"] and r["record"] == {"step": 1, "eval_loss": 0.5}, r  # ... and are back on every rank
    assert results[0]["file_is_the_gathered_weights"]
    assert not (tmp_path / "rank1-elsewhere").exists()  # rank 1 neither wrote nor needed to read the run dir


def worker(out: Path) -> None:
    """Two processes: shard the model, train a step, keep it (save_best), train on, restore_best; report."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from convsim.modeling.loss import reply_loss
    from convsim.training.checkpoints import BEST, load_state, restore_best, save_best, trained_tensors
    from test_fsdp_tied import _batch, _build, fsdp2_cpu

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    run_dir = out if rank == 0 else out / f"rank{rank}-elsewhere"  # only rank 0 sees the run directory
    model, ids = _build()
    model = fsdp2_cpu(model, rank)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def step():
        reply_loss(model, _batch(ids)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    save_best(run_dir, model, 1, 0.5)
    kept = trained_tensors(model)  # whole tensors, gathered from the shards
    step()
    step()
    moved = trained_tensors(model)
    record = restore_best(run_dir, model)
    back = trained_tensors(model)
    result = {
        "sharded": isinstance(model, FSDPModule) and any(hasattr(p, "device_mesh") for p in model.parameters()),
        "moved": any(not torch.equal(kept[n], moved[n]) for n in kept),
        "restored": sorted(back) == sorted(kept) and all(torch.equal(back[n], kept[n]) for n in kept),
        "record": record,
    }
    if rank == 0:
        on_disk = load_state(out / BEST / "trained.pt")
        result["file_is_the_gathered_weights"] = sorted(on_disk) == sorted(kept) and all(
            torch.equal(on_disk[n], kept[n]) for n in kept
        )
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    worker(Path(sys.argv[1]))
