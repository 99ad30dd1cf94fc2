"""The CPU recipe: what `convsim train` trains when no GPU is found and the flags choose no recipe.

A CPU trains a few hundred tokens a second, so the GPU recipe (16 messages of context, the people's other
chats, two epochs) would take many hours. The CPU recipe trains the chat's own replies with 8 messages of
context, in batches of 8, for an **amount of work** sized by a short speed probe: the probe measures this
process's CPU seconds per token on real batches with one thread, and the work is what `minutes` of this
machine's threads do at that rate. A machine busy with other jobs gives this process less of each second but
about the same CPU seconds per token, so it takes longer rather than training less.
Its learning rate is `convsim train`'s; the fidelity suite's CPU round (bench/fidelity_suite.py, CPU_ROUND)
compares learning rates and batch sizes at this work on the development pairs (docs/PERFORMANCE.md).

    recipe_for(device, "auto")                                # "cpu" on a machine without a GPU
    apply_cpu_recipe(cfg, given)                              # its values, where the flags gave none
    probe_cpu_seconds_per_token(model, rows, 8, pad_id)       # the speed probe
    work_tokens(per_token, threads=2, minutes=50)             # -> the --train-tokens of the run
    recipe_line(changed), work_line(tokens, per_token, 2, 50)  # what `convsim train` prints
"""

from __future__ import annotations

import random
import time
from dataclasses import replace

from convsim.config import TrainConfig

CPU_MINUTES = 50.0  # the work of this many minutes of the machine's threads; the whole run also loads,
# validates and saves, so a quiet 2-core machine finishes `convsim train` within about an hour
# training's tokens per CPU second of each thread over the probe's one thread, less a margin for the rest of a run
# (loading, the probe itself, validation, checkpoints): the probe's short batches read slower than steady
# training does (measured in docs/PERFORMANCE.md)
EFFICIENCY = 1.2
CPU_RECIPE = {
    "context_size": 8,
    "batch_size": 8,
    "auto_extra_data": False,
    "eval_steps": 1_000_000,  # validation once, at the end: on a CPU each pass costs minutes
}
WORK_FIELDS = ("max_steps", "train_tokens", "epochs", "time_budget")  # any of these given: no sizing


def recipe_for(device: str, asked: str = "auto") -> str:
    """ "cpu" or "gpu": as asked, else by the device the run trains on."""
    if asked != "auto":
        return asked
    return "gpu" if device.startswith("cuda") or device.startswith("mps") else "cpu"


def apply_cpu_recipe(cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, dict]:
    """The config with CPU_RECIPE's values for the fields not in `given` (set by a flag or YAML), and
    {field: value} of those it set."""
    changed = {k: v for k, v in CPU_RECIPE.items() if k not in given and getattr(cfg, k) != v}
    return replace(cfg, **changed), changed


def sizes_the_work(given: set[str]) -> bool:
    """Whether the probe should size the work: only where no flag says how much to train."""
    return not any(f in given for f in WORK_FIELDS)


def work_tokens(seconds_per_token: float, threads: int, minutes: float = CPU_MINUTES) -> int:
    """Real training tokens that `minutes` of `threads` CPU threads train at `seconds_per_token` CPU
    seconds of one thread each, as the probe reads it (EFFICIENCY: steady training's rate over the probe's)."""
    return max(1, int(minutes * 60 * threads * EFFICIENCY / seconds_per_token))


def probe_batches(rows: list[dict], batch_size: int, n: int, seed: int = 0) -> list[list[dict]]:
    """n batches of rows drawn at random and grouped by length, as the training sampler groups them."""
    rng = random.Random(seed)
    pick = sorted(rng.sample(rows, min(len(rows), n * batch_size)), key=lambda r: len(r["input_ids"]))
    return [pick[i : i + batch_size] for i in range(0, len(pick), batch_size) if pick[i : i + batch_size]]


def probe_cpu_seconds_per_token(
    model, rows: list[dict], batch_size: int, pad_id: int, batches: int = 3, threads: int = 1
) -> float:
    """CPU seconds of `threads` threads (default one) per real token of a training step (forward and backward of the reply-only
    loss) on `batches` batches of `rows`; the first batch warms up and is not counted. One thread: with
    several, a thread that waits for a descheduled one spins and burns CPU time, so on a busy machine the
    CPU time per token grows with the load (measured in docs/PERFORMANCE.md); one thread's does much less.
    The gradients are dropped after, so the run starts from the same weights."""
    import torch

    from convsim.modeling.loss import reply_loss

    was_training, was_threads = model.training, torch.get_num_threads()
    torch.set_num_threads(threads)
    model.train()
    spent, tokens = 0.0, 0
    try:
        for i, batch in enumerate(probe_batches(rows, batch_size, batches)):
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, r in enumerate(batch):
                n = len(r["input_ids"])
                ids[j, :n] = torch.tensor(r["input_ids"])
                labels[j, :n] = torch.tensor(r["labels"])
                mask[j, :n] = 1
            t = time.process_time()
            reply_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}).backward()
            if i:
                spent += time.process_time() - t
                tokens += int(mask.sum())
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        torch.set_num_threads(was_threads)
    if not tokens:  # too few rows for a counted batch: time the one there was
        return max(spent, 1e-6) / max(1, sum(len(r["input_ids"]) for r in rows[:batch_size]))
    return spent / tokens


def recipe_line(changed: dict) -> str:
    """The line `convsim train` prints first on a CPU: the recipe's values this run took."""
    if not changed:
        return "CPU recipe: the flags and the config chose every value it sets (--recipe gpu: the GPU recipe)"
    names = {
        "context_size": "{} messages of context",
        "batch_size": "batches of {}",
        "learning_rate": "learning rate {:g}",
        "eval_steps": "validation at the end only",
    }
    parts = [names[k].format(v) for k, v in changed.items() if k in names]
    if changed.get("auto_extra_data") is False:
        parts.append("the chat's own replies only (data/extra left out)")
    return "CPU recipe: " + ", ".join(parts) + " (--recipe gpu: the GPU recipe; flags given always win)"


def work_line(tokens: int, per_token: float, threads: int, minutes: float) -> str:
    """The line that says how much work the probe chose."""
    return (
        f"CPU recipe work: {tokens:,} tokens, what {minutes:g} min of {threads} threads train at the probed "
        f"{1 / per_token:,.0f} tokens per CPU second of one thread (a busy machine takes longer, not less; --cpu-minutes)"
    )
