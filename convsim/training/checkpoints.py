"""A run's checkpoints on disk: written into a staging dir and renamed into place whole, the newest
complete one resumed from, logs rewound to it, and the --keep-best weights in RUN_DIR/best/.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
from pathlib import Path


BEST = "best"


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _rank0() -> bool:
    import torch.distributed as dist

    return dist.get_rank() == 0 if _distributed() else int(os.environ.get("RANK", "0")) == 0


def from_rank0(value):
    """`value` as rank 0 has it, on every process: a collective under torchrun/accelerate (every process
    calls it), `value` itself in one process."""
    if not _distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def trained_tensors(model) -> dict:
    """The tensors that training changes, by parameter name, whole and copied to the CPU. Under FSDP each
    is a shard (a DTensor) and is gathered here: a collective, so every process calls this."""
    import torch

    out = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                whole = p.full_tensor() if hasattr(p, "full_tensor") else p
                out[n] = whole.detach().to("cpu", copy=True)
    return out


def save_best(run_dir: Path, model, step: int, eval_loss: float) -> None:
    """Keep the trained tensors as the best so far in RUN_DIR/best/, whole or not at all. Every process
    calls it (under FSDP the shards are gathered); rank 0 alone writes."""
    import torch
    from convsim.fsutil import atomic_dir

    tensors = trained_tensors(model)
    if not _rank0():
        return
    with atomic_dir(run_dir / BEST) as tmp:
        torch.save(tensors, tmp / "trained.pt")
        (tmp / "best.json").write_text(json.dumps({"step": step, "eval_loss": eval_loss}))


def best_record(run_dir: Path) -> dict | None:
    """{"step", "eval_loss"} of the kept best weights, or None."""
    try:
        return json.loads((run_dir / BEST / "best.json").read_text())
    except (OSError, ValueError):
        return None


def restore_best(run_dir: Path, model) -> dict | None:
    """Load the kept best tensors into `model` (by parameter name); their record, or None if none kept.

    Every process calls it: rank 0 reads RUN_DIR/best/ and sends each tensor to the others, so under DDP
    every replica, and under FSDP every shard, ends with the kept weights (the other ranks need not see
    the run directory)."""
    import torch

    rank0 = _rank0()
    rec = from_rank0(best_record(run_dir) if rank0 else None)
    if rec is None:
        return None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = load_state(run_dir / BEST / "trained.pt") if rank0 else {}
    if not from_rank0(set(saved) == set(params) if rank0 else None):
        raise RuntimeError(f"{run_dir / BEST} does not match this model's trained tensors")
    with torch.no_grad():
        for n, p in params.items():
            whole = saved[n].to(p.device, p.dtype) if rank0 else torch.empty(p.shape, dtype=p.dtype, device=p.device)
            if _distributed():
                import torch.distributed as dist

                dist.broadcast(whole, src=0)
            if hasattr(p, "device_mesh"):  # an FSDP shard: this process's part of the whole tensor
                from torch.distributed.tensor import distribute_tensor

                whole = distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(whole)
    return rec


# ----------------------------------------------------------------------------- checkpoints
# transformers writes checkpoint-N in place, file by file, and `get_last_checkpoint` takes the highest N
# whether or not it is whole; a run killed mid-write would resume from a broken checkpoint. Here each
# checkpoint is written into checkpoints/.staging/ and renamed into place when complete, old ones are
# renamed away before they are deleted, and resuming takes the newest complete one.

STAGING = ".staging"
LOSS_FILE = "convsim_loss.json"  # summed step losses so far: the whole run's train loss after a resume


def checkpoint_step(path: Path) -> int | None:
    name = path.name
    return int(name[len("checkpoint-") :]) if name.startswith("checkpoint-") and name[11:].isdigit() else None


def complete_checkpoint(path: Path) -> bool:
    """Everything resuming reads is there (ours are whole by the rename; this also rejects a checkpoint
    half-written by an older convsim or copied in part)."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # FSDP's sharded checkpoints hold the model and optimizer as folders of shards (pytorch_model_fsdp_0/,
    # optimizer_0/) or as one file each (pytorch_model_fsdp.bin, optimizer.bin)
    weights = (
        "adapter_model.safetensors",
        "model.safetensors",
        "adapter_model.bin",
        "pytorch_model.bin",
        "pytorch_model_fsdp_0",
        "pytorch_model_fsdp.bin",
    )
    optimizer = ("optimizer.pt", "optimizer_0", "optimizer.bin")
    return (
        state.get("global_step") == checkpoint_step(path)
        and (path / "scheduler.pt").is_file()
        and any((path / f).exists() for f in optimizer)
        and any(path.glob("rng_state*.pth"))
        and any((path / f).exists() for f in weights)
    )


# What resuming unpickles: transformers' Trainer reads optimizer.pt, scheduler.pt, rng_state*.pth (and scaler.pt,
# a PEFT adapter_model.bin) with torch.load. training_args.bin is written but never read back. A checkpoint dir is
# user-supplied input, so every such file is loaded here first with weights_only=True (tensors, plain containers
# and the numpy types RNG states hold; nothing that runs code) before the Trainer touches it: the safety does not
# rest on a library default, and a refused or damaged file ends the command with one clear line.
UNREAD = {"training_args.bin"}
PICKLED = ("*.pt", "*.pth", "*.bin")


def _numpy_globals() -> list:
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_state(path: Path):
    """A state file from a checkpoint, unpickled with weights_only=True (tensors, containers, numpy arrays)."""
    import torch

    with torch.serialization.safe_globals(_numpy_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def verify_checkpoint(path: Path, run_dir: Path) -> None:
    """Load every state file that resuming from `path` reads, safely; UserError naming the first bad one."""
    import pickle

    from convsim.errors import UserError

    fresh = f"to start fresh, delete {path} (or all of {path.parent}) or train into another --out than {run_dir}"
    files = sorted({f for pattern in PICKLED for f in path.glob(pattern) if f.name not in UNREAD})
    for f in files:
        try:
            load_state(f)
        except pickle.UnpicklingError:
            raise UserError(
                f"refusing to resume from {f}: it holds Python objects other than tensors and plain data "
                f"(loading it could run code); {fresh}"
            ) from None
        except Exception as e:  # truncated zip, bad magic number, short read: whatever torch raises
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise UserError(f"cannot resume from {f}: it is damaged or not a checkpoint ({reason}); {fresh}") from None
    for f in sorted(path.glob("*.safetensors")):
        from safetensors import safe_open

        try:
            with safe_open(f, framework="pt") as st:
                for k in st.keys():
                    st.get_slice(k)
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise UserError(f"cannot resume from {f}: it is damaged or not a checkpoint ({reason}); {fresh}") from None


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint-N in `ckpt_dir`, or None."""
    if not ckpt_dir.is_dir():
        return None
    found = sorted(
        (p for p in ckpt_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
        key=checkpoint_step,
        reverse=True,
    )
    return next((p for p in found if complete_checkpoint(p)), None)


def _remove_dir(path: Path) -> None:
    """Rename away, then delete: a kill during the delete leaves no half checkpoint-N behind."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_checkpoints(ckpt_dir: Path) -> None:
    """Before resuming: drop what a killed run left half-done (staging, incomplete checkpoint-N)."""
    if not ckpt_dir.is_dir():
        return
    for p in ckpt_dir.iterdir():
        if p.is_dir() and (p.name == STAGING or p.name.startswith(".trash-")):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_dir() and checkpoint_step(p) is not None and not complete_checkpoint(p):
            print(f"removing incomplete checkpoint {p} (a run stopped while writing it)", file=sys.stderr)
            _remove_dir(p)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_checkpoint(staged: Path, final: Path, keep: int | None) -> None:
    """Rename a fully written checkpoint into place, then keep only the newest `keep` complete ones."""
    _fsync_tree(staged)
    if final.exists():
        _remove_dir(final)
    os.replace(staged, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if keep:
        done = sorted(
            (
                p
                for p in final.parent.iterdir()
                if p.is_dir() and checkpoint_step(p) is not None and complete_checkpoint(p)
            ),
            key=checkpoint_step,
        )
        for old in done[:-keep]:
            _remove_dir(old)


def rewind_logs(run_dir: Path, step: int) -> None:
    """Resuming from `step`: drop the log rows a killed run wrote after it (and a torn last line), and kept
    best weights from after it (the resumed run meets that evaluation again)."""
    from convsim.fsutil import write_jsonl

    best = best_record(run_dir)
    if best is not None and best["step"] > step:
        _remove_dir(run_dir / BEST)
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = run_dir / name
        if not path.exists():
            continue
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                rows.append(row)
        write_jsonl(path, rows)


@contextlib.contextmanager
def adapter_only(*models):
    """Within: `save_pretrained` of these PEFT models writes no embedding layers. PEFT otherwise saves the
    whole resized embedding into every trainer checkpoint (for a large vocabulary, far larger than the
    adapter); the speaker rows are in the trainable-token delta, and a resumed run rebuilds the rest."""
    patched = []
    for m in {id(m): m for m in models}.values():
        if hasattr(m, "peft_config") and "save_pretrained" not in vars(m):
            m.save_pretrained = functools.partial(type(m).save_pretrained, m, save_embedding_layers=False)
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.save_pretrained


class AtomicCheckpoints:
    """Trainer mixin: checkpoints are written into a staging dir and renamed into place whole, hold the
    adapter without the embedding (`adapter_only`), and carry the summed step losses so a resumed run
    reports the whole run's train loss."""

    _staging: str | None = None
    loss_before = 0.0  # summed step losses up to the checkpoint this run resumed from
    step_before = 0

    def _get_output_dir(self, trial):
        return self._staging or super()._get_output_dir(trial)

    def _loss_sum(self) -> float | None:
        if self.loss_before is None:
            return None
        pending = getattr(self, "_tr_loss", 0.0)  # transformers' running sums since this train() began
        return self.loss_before + getattr(self, "_total_loss_scalar", 0.0) + float(pending)

    def _save(self, output_dir=None, state_dict=None):
        with adapter_only(self.model, self.accelerator.unwrap_model(self.model, keep_torch_compile=False)):
            super()._save(output_dir, state_dict)

    def _save_checkpoint(self, model, trial):
        root = Path(super()._get_output_dir(trial))
        self._staging = str(root / STAGING)
        staged = root / STAGING / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                (staged / LOSS_FILE).write_text(
                    json.dumps({"global_step": self.state.global_step, "loss_sum": self._loss_sum()}), encoding="utf-8"
                )
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every process has written its RNG state
        if self.args.should_save:
            publish_checkpoint(staged, root / staged.name, self.args.save_total_limit)
            shutil.rmtree(root / STAGING, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def resume_from(self, checkpoint: Path | None) -> None:
        if checkpoint is None:
            return
        self.step_before = checkpoint_step(checkpoint)
        try:
            self.loss_before = json.loads((checkpoint / LOSS_FILE).read_text(encoding="utf-8"))["loss_sum"]
        except (OSError, ValueError, KeyError):
            self.loss_before = None  # a checkpoint from before this file existed

    def run_loss(self, result) -> float:
        """Mean step loss over the whole run, including the steps before a resume."""
        steps = self.state.global_step
        if not self.step_before or self.loss_before is None or not steps:
            return result.training_loss
        since = getattr(self, "_total_loss_scalar", None)  # summed step losses since the resume
        if since is None:
            since = result.training_loss * (steps - self.step_before)
        # (not training_loss x steps since: transformers 5.17 divides that sum by global_step, 5.24 by the steps run)
        return (self.loss_before + since) / steps
