"""Where a CPU training step of the embedded model goes, and what precision, threads and compiling do to it.

The model, the data and the loss are `convsim train`'s own (`prepare_data`, `build_model`, `prompt_format`,
`tokenize`, TRL's collator as the trainer builds it on a CPU, `reply_loss`, the Trainer's optimizer); only
the loop is written out, so each part of a step can be timed:

- profile (fp32, the CPU default here): timed hooks mark the phases of a step in wall-clock time: collation,
  embedding, the forward through the decoder layers, the output head + loss (at reply positions only), the
  backward through the head, through the layers and into the embedding rows, and the optimizer step.
  Inside the layers, hooks on the leaf modules split forward and backward into LoRA (lora_A, lora_B), the
  frozen projections (base_layer) and the rest (attention, norms, activations). Medians over the timed steps.
  `pad_share`: the share of pad tokens in random batches of the run's examples (every batch of one epoch).
- arms (`--arms`): the same steps without hooks, from the same weights and batches: fp32, forced bf16
  (bf16 frozen weights under bf16 autocast, what --frozen-dtype bfloat16 does), other thread counts
  (`threads1`, `threads4`), and compiled decoder layers (`compile`); tokens/s and the loss after the steps.

    convsim import chitchat --pair 549cc1d1,a54af4d5 --out /tmp/prof/data
    python bench/cpu_profile.py --data /tmp/prof/data --batch-size 8 --warmup 1 --steps 3 \\
        --arms fp32,bf16,threads1,compile --out bench/results/cpu-profile.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LORA_LEAVES = ("lora_A.default", "lora_B.default")
FROZEN_LEAVES = ("base_layer",)


# ----------------------------------------------------------------------------- the run's data and model


def setup(cfg, data_dir: str):
    """(model, tok, rows): what `convsim train` builds, on the CPU, with the training rows tokenized."""
    from convsim.training.backends import build_model
    from convsim.training.data import prepare_data, prompt_format, tokenize

    convs, speakers, targets, split, ex = prepare_data(cfg, data_dir)
    torch.manual_seed(cfg.seed)
    model, tok, spec, ids = build_model(cfg, speakers, "cpu")
    rows, _ = tokenize(tok, prompt_format(cfg, spec, speakers), ex["train"], cfg, whole=cfg.loss == "whole")
    return model, tok, rows


def batch_rows(rows, batch_size: int, seed: int) -> list[list[dict]]:
    """Random batches over one epoch (as the Trainer's random sampler draws them; the last partial one dropped)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [[rows[j] for j in order[i : i + batch_size]] for i in range(0, len(order) - batch_size + 1, batch_size)]


def pad_share(batches: list[list[dict]]) -> float:
    """Share of the token slots of padded batches that are padding."""
    slots = sum(len(b) * max(len(r["input_ids"]) for r in b) for b in batches)
    real = sum(len(r["input_ids"]) for b in batches for r in b)
    return 1 - real / slots


def collator(tok):
    """The collator SFTTrainer builds for `convsim train` on a CPU (no padding to a multiple, not padding-free)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=False, pad_to_multiple_of=None)


def optimizer(cfg, model):
    """The Trainer's optimizer for the run's settings."""
    from transformers import Trainer
    from trl import SFTConfig

    args = SFTConfig(output_dir="/tmp/cpu-profile-unused", use_cpu=True, learning_rate=cfg.learning_rate)
    cls, kw = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return cls([p for p in model.parameters() if p.requires_grad], **kw)


# ----------------------------------------------------------------------------- timing hooks


class StepClock:
    """Wall-clock marks and per-group sums inside a training step, from forward/backward hooks."""

    def __init__(self, model):
        from convsim.modeling.layers import backbone, decoder_layers

        self.marks: dict[str, float] = {}
        self.sums: dict[str, float] = defaultdict(float)
        self._open: dict[int, float] = {}
        self.handles = []
        bb, layers = backbone(model), decoder_layers(model)
        self.handles.append(bb.register_forward_pre_hook(lambda *a: self.mark("fwd_backbone_in")))
        self.handles.append(layers[0].register_forward_pre_hook(self._into_layers, with_kwargs=True))
        self.handles.append(bb.norm.register_forward_pre_hook(self._into_norm))
        for name, mod in layers.named_modules():
            group = "lora" if name.endswith(LORA_LEAVES) else "frozen_linear" if name.endswith(FROZEN_LEAVES) else None
            if group is None:
                continue
            self.handles += [
                mod.register_forward_pre_hook(self._start),
                mod.register_forward_hook(self._stop(f"fwd_{group}")),
                mod.register_full_backward_pre_hook(self._start),
                mod.register_full_backward_hook(self._stop(f"bwd_{group}")),
            ]

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def reset(self) -> None:
        self.marks, self.sums, self._open = {}, defaultdict(float), {}

    def _start(self, mod, *_):
        self._open[id(mod)] = time.perf_counter()

    def _stop(self, key: str):
        def hook(mod, *_):
            self.sums[key] += time.perf_counter() - self._open.pop(id(mod))

        return hook

    def _grad_mark(self, tensor, name: str) -> None:
        if torch.is_tensor(tensor) and tensor.requires_grad:
            tensor.register_hook(lambda g: self.mark(name))

    def _into_layers(self, mod, args, kwargs):
        self.mark("fwd_layers_in")
        self._grad_mark(args[0] if args else kwargs.get("hidden_states"), "bwd_layers_done")

    def _into_norm(self, mod, args):
        self.mark("fwd_norm_in")
        self._grad_mark(args[0], "bwd_head_done")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def parts(clock: StepClock, t: dict) -> dict[str, float]:
    """The seconds of each part of one step, from the clock's marks and sums and the loop's own marks `t`."""
    m, s = clock.marks, clock.sums
    layers_fwd = m["fwd_norm_in"] - m["fwd_layers_in"]
    head_done = m.get("bwd_head_done", t["bwd_end"])
    layers_done = m.get("bwd_layers_done", t["bwd_end"])
    layers_bwd = layers_done - head_done
    return {
        "collate": t["collated"] - t["start"],
        "embed_forward": m["fwd_layers_in"] - m["fwd_backbone_in"],
        "layers_forward_frozen_linear": s["fwd_frozen_linear"],
        "layers_forward_lora": s["fwd_lora"],
        "layers_forward_other": layers_fwd - s["fwd_frozen_linear"] - s["fwd_lora"],
        "head_forward": t["fwd_end"] - m["fwd_norm_in"],
        "head_backward": head_done - t["fwd_end"],
        "layers_backward_frozen_linear": s["bwd_frozen_linear"],
        "layers_backward_lora": s["bwd_lora"],
        "layers_backward_other": layers_bwd - s["bwd_frozen_linear"] - s["bwd_lora"],
        "embed_backward": t["bwd_end"] - layers_done,
        "optimizer": t["end"] - t["bwd_end"],
    }


# ----------------------------------------------------------------------------- the step


def train_step(model, opt, collate, rows, bf16: bool, marks: dict | None = None):
    """One training step as the Trainer runs it (collate, reply-only loss, backward, optimizer); the loss."""
    from convsim.modeling.loss import reply_loss

    t = marks if marks is not None else {}
    t["start"] = time.perf_counter()
    batch = collate(rows)
    t["collated"] = time.perf_counter()
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with cast:
        loss = reply_loss(model, batch)
    t["fwd_end"] = time.perf_counter()
    loss.backward()
    t["bwd_end"] = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t["end"] = time.perf_counter()
    return float(loss.detach()), int(batch["attention_mask"].sum())


def profile(cfg, data_dir, batch_size, warmup, steps, seed):
    model, tok, rows = setup(cfg, data_dir)
    model.train()
    epoch = batch_rows(rows, batch_size, seed)
    collate, opt, clock = collator(tok), optimizer(cfg, model), StepClock(model)
    per_step, totals = [], []
    for i, b in enumerate(epoch[: warmup + steps]):
        clock.reset()
        t: dict = {}
        train_step(model, opt, collate, b, bf16=False, marks=t)
        if i >= warmup:
            per_step.append(parts(clock, t))
            totals.append(t["end"] - t["start"])
    clock.remove()
    step_s = statistics.median(totals)
    med = {k: statistics.median(p[k] for p in per_step) for k in per_step[0]}
    timed = epoch[warmup : warmup + steps]
    return {
        "step_seconds": round(step_s, 3),
        "step_seconds_all": [round(x, 3) for x in totals],
        "breakdown": {k: {"seconds": round(v, 3), "share": round(v / step_s, 4)} for k, v in med.items()},
        "pad_share": round(pad_share(epoch), 4),
        "pad_share_timed_batches": round(pad_share(timed), 4),
        "tokens_per_step_padded": statistics.median(len(b) * max(len(r["input_ids"]) for r in b) for b in timed),
        "reply_token_share": round(
            sum(sum(x != -100 for x in r["labels"]) for b in timed for r in b)
            / sum(len(r["input_ids"]) for b in timed for r in b),
            4,
        ),
        "train_examples": len(rows),
    }


ARMS = {
    "fp32": {"frozen_dtype": "float32", "bf16": False},
    "bf16": {"frozen_dtype": "bfloat16", "bf16": True},
    "threads1": {"frozen_dtype": "float32", "bf16": False, "threads": 1},
    "threads4": {"frozen_dtype": "float32", "bf16": False, "threads": 4},
    "compile": {"frozen_dtype": "float32", "bf16": False, "compile": True},
}


def run_arm(cfg, data_dir, arm: str, batch_size, warmup, steps, seed):
    """Tokens/s (real tokens) over the timed steps and the loss of each step, from fresh weights."""
    from dataclasses import replace

    from convsim.training.model import compile_layers

    spec = ARMS[arm]
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.get("threads", threads))
    load = [os.getloadavg()[0]]
    try:
        model, tok, rows = setup(replace(cfg, frozen_dtype=spec["frozen_dtype"]), data_dir)
        model.train()
        t0 = time.perf_counter()
        compiled = compile_layers(model) if spec.get("compile") else 0
        compile_s = time.perf_counter() - t0
        epoch = batch_rows(rows, batch_size, seed)
        collate, opt = collator(tok), optimizer(cfg, model)
        losses, secs, toks = [], [], []
        for i, b in enumerate(epoch[: warmup + steps]):
            t: dict = {}
            loss, n = train_step(model, opt, collate, b, bf16=spec["bf16"], marks=t)
            losses.append(round(loss, 4))
            if i >= warmup:
                secs.append(t["end"] - t["start"])
                toks.append(n)
        load.append(os.getloadavg()[0])
        return {
            "threads": torch.get_num_threads(),
            "compiled_layers": compiled,
            "compile_seconds": round(compile_s, 1) if compiled else None,
            "tokens_per_s": round(sum(toks) / sum(secs), 1),
            "step_seconds": [round(x, 2) for x in secs],
            "losses": losses,
            "load_1min": load,
        }
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the record


def machine() -> str:
    from convsim.training.cpu import cpu_flags, cpu_has_native_bf16

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    vec = sorted(f for f in cpu_flags(info) if f.startswith(("avx512", "amx")) or f == "avx2")
    return (
        f"{name}, {os.cpu_count()} cores, {platform.system()}; vector flags {' '.join(vec) or 'none'}; "
        f"native bf16: {cpu_has_native_bf16()}; torch {torch.__version__}, capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads by default"
    )


def commit() -> str:
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv=None) -> int:
    from convsim.config import TrainConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a data dir from `convsim import`")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", default="", help=f"comma-separated, of {', '.join(ARMS)} (default: none)")
    p.add_argument("--no-profile", action="store_true", help="only the arms")
    p.add_argument("--out", help="JSON file to write (default: print)")
    a = p.parse_args(argv)
    cfg = TrainConfig(model=a.model, batch_size=a.batch_size, seed=a.seed, frozen_dtype="float32").validate()
    out = {
        "machine": machine(),
        "commit": commit(),
        "command": "python bench/cpu_profile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": a.model,
        "batch_size": a.batch_size,
        "warmup": a.warmup,
        "steps": a.steps,
        "load": {"start": list(os.getloadavg())},
    }
    if not a.no_profile:
        out.update(profile(cfg, a.data, a.batch_size, a.warmup, a.steps, a.seed))
        out["load"]["after_profile"] = list(os.getloadavg())
        print(json.dumps({k: out[k] for k in ("step_seconds", "breakdown", "pad_share")}, indent=1), flush=True)
    arms = {}
    for arm in [x for x in a.arms.split(",") if x]:
        arms[arm] = run_arm(cfg, a.data, arm, a.batch_size, a.warmup, a.steps, a.seed)
        print(arm, json.dumps(arms[arm]), flush=True)
    if arms:
        out["arms"] = arms
    out["load"]["end"] = list(os.getloadavg())
    text = json.dumps(out, indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
