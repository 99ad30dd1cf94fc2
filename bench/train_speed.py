"""Training throughput: `convsim train` against a plain transformers + PEFT loop, side by side.

Same model, same data (the run's rendered training examples), same batch size, same LoRA settings
(r, targets, the speaker tokens trained through PEFT's `trainable_token_indices`), same device, in one
process, one after the other. Tokens are real (non-pad) tokens of the batches.

- ours: `convsim train` itself (convsim.cli.main) with its defaults, --max-steps N, evaluation off; tokens/s
  is real tokens over time across its logging intervals but the first (the Trainer's own per-interval
  `tokens_per_s` weighted by interval length), so the compile of the first steps is not counted.
  `--variants` adds arms that switch one speed-up off at a time (compiled layers, bf16 frozen weights,
  length-grouped batches, padding-free batches, Liger's fused head + loss, activation checkpointing) to show
  what each is worth.
- plain: the loop a user would write: PEFT's stock layers, `model(input_ids, attention_mask, labels)`
  (the head over every position), AdamW, fp32 weights with bf16 autocast on CUDA, random batches; tokens
  over time for the same number of steps after warm-up. `--plain-bf16` adds the same loop with bf16 base
  weights (PEFT keeps LoRA in float32), a second baseline for the weights' dtype alone.

    python bench/train_speed.py --data DATA_DIR --device cuda --batch-size 32 --steps 40 --out speed.json
    python bench/train_speed.py --data DATA_DIR --device cpu --batch-size 8 --steps 6 --warmup 1 --out cpu.json

MFU counts the useful model FLOPs: 6 x (non-embedding parameters) per token plus 6 x hidden x vocab per
token that carries loss, against the card's dense bf16 peak (`--peak-tflops`, default 989 for an H100 SXM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def batches(rows, batch_size, pad_id, seed, device):
    import random

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    for i in range(0, len(order) - batch_size + 1, batch_size):
        chunk = [rows[j] for j in order[i : i + batch_size]]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in chunk])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in chunk])
        lab = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in chunk])
        yield ids.to(device), mask.to(device), lab.to(device)


def plain_loop(cfg, data_dir, device, steps, warmup, dtype=torch.float32):
    """The stock way: PEFT LoRA + trainable tokens, full-vocabulary logits, HF loss; base weights in
    `dtype` (float32 with bf16 autocast by default; bfloat16 for the `--plain-bf16` arm)."""
    from peft import LoraConfig, get_peft_model
    from convsim.data.examples import PromptFormat
    from convsim.modeling.models import load_base, resolve
    from convsim.modeling.speakers import add_speaker_tokens
    from convsim.training.data import prepare_data, tokenize

    convs, speakers, targets, split, ex = prepare_data(cfg, data_dir)
    spec = resolve(cfg.model)
    torch.manual_seed(cfg.seed)
    model, tok = load_base(cfg.model, device=device, dtype=dtype)
    ids = add_speaker_tokens(model, tok, speakers, {}, spec.reference_words, seed=cfg.seed)
    fmt = PromptFormat(style=spec.prompt_style, speakers=tuple(speakers), special_tokens=True)
    rows, _ = tokenize(tok, fmt, ex["train"], cfg)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_r,
        use_rslora=True,
        target_modules=list(spec.attn_targets) + list(spec.mlp_targets),
        trainable_token_indices={"embed_tokens": sorted(ids.values())},
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)  # PEFT keeps LoRA in float32 over bf16 weights (autocast_adapter_dtype)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    cuda = device.startswith("cuda")
    times, toks, losses = [], [], []
    it = (
        b for epoch in range(10**6) for b in batches(rows, cfg.batch_size, tok.pad_token_id, cfg.seed + epoch, device)
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        x, m, y = next(it)
        sync(device)
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=x, attention_mask=m, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        losses.append(float(loss))
        if step >= warmup:
            times.append(time.perf_counter() - t)
            toks.append(int(m.sum()))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    loss_tokens = sum(sum(1 for v in r["labels"] if v != -100) for r in rows) / sum(len(r["input_ids"]) for r in rows)
    fpt = flops_per_token(model.get_base_model().config, loss_tokens)
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return {
        "tokens_per_s": sum(toks) / sum(times),
        "step_s_median": statistics.median(times),
        "peak_gib": peak,
        "steps": steps,
        "loss_token_fraction": loss_tokens,
        "final_loss": float(loss),
        "losses": losses,
        "steps_per_epoch": len(rows) // cfg.batch_size,
        "useful_flops_per_token": fpt,
        "dtype": str(dtype).replace("torch.", ""),
    }


def ours(cfg, data_dir, device, steps, work: Path, flags=(), env=None):
    """`convsim train` as users run it (plus `flags`, with `env` set), evaluation and checkpoints out of the
    way."""
    from unittest.mock import patch
    from convsim.cli import main

    flags = list(flags)
    conf = work / "bench.yaml"
    conf.write_text(
        f"logging_steps: {max(2, steps // 8)}\neval_steps: 100000\nsave_steps: 100000\nsamples: 0\n"
        f"max_val_examples: 8\n"
    )
    out = work / ("run" + "".join(f.replace("--", "_") for f in flags))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with patch.dict(os.environ, env or {}):
        rc = main(
            [
                "train",
                str(data_dir),
                "--out",
                str(out),
                "--model",
                cfg.model,
                "--batch-size",
                str(cfg.batch_size),
                "--max-steps",
                str(steps + steps // 4),
                "--lora-r",
                str(cfg.lora_r),
                "--config",
                str(conf),
                "--seed",
                str(cfg.seed),
                *flags,
            ]
        )
        liger = _liger_used()
    assert rc == 0, rc
    meta = json.loads((out / "run.json").read_text())
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {
        "tokens_per_s": interval_rate(out / "metrics.jsonl"),
        "tokens_per_s_median_interval": meta["tokens_per_s"],
        "frozen_dtype": meta.get("frozen_dtype"),
        "group_by_length": meta.get("group_by_length"),
        "peak_gib": peak,
        "steps": meta["global_step"],
        "train_loss": meta["train_loss"],
        "flags": flags,
        "compiled_layers": meta.get("compiled_layers"),
        "activation_checkpointing": meta.get("activation_checkpointing"),
        "liger": liger,
    }


def interval_rate(metrics: Path) -> float | None:
    """Real tokens per second over all logging intervals but the first (compilation, warm-up): the
    Trainer's per-interval `tokens_per_s` weighted by each interval's length, i.e. tokens / time. With
    length-grouped batches intervals differ a lot, so this, not the median interval, is the run's rate."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "tokens_per_s" in r or "loss" in r]
    tokens = seconds = 0.0
    for prev, row in zip(rows, rows[1:]):
        if "tokens_per_s" in row and "tokens_per_s" in prev:  # prev logged too: row's interval is steady
            dt = row["time"] - prev["time"]
            tokens += row["tokens_per_s"] * dt
            seconds += dt
    return round(tokens / seconds, 1) if seconds else None


def two_epochs(cfg, data_dir, device, work: Path, flags=()):
    """`convsim train --epochs 2` with a log line every step (CPU levers: --lora-layers K, with and without
    --cache-frozen-prefix). The cache is built in epoch 1 and used in epoch 2, so each epoch's rate is given:
    real tokens over the time of its steps but the run's first (warm-up); epoch 1's time less what its tokens
    take at epoch 2's rate is the one-time cost of building the cache. Losses: the mean logged training loss over epoch 2 (every
    training example once) and the validation loss at the end."""
    from convsim.cli import main

    flags = list(flags)
    conf = work / "levers.yaml"
    conf.write_text("logging_steps: 1\neval_steps: 100000\nsave_steps: 100000\nsamples: 0\n")
    out = work / ("epochs" + "".join(f.replace("--", "_") for f in flags))
    args = ["train", str(data_dir), "--out", str(out), "--model", cfg.model, "--batch-size", str(cfg.batch_size)]
    args += ["--epochs", "2", "--lora-r", str(cfg.lora_r), "--config", str(conf), "--seed", str(cfg.seed)]
    t0 = time.time()
    assert main([*args, "--no-compile", *flags]) == 0
    wall = time.time() - t0
    meta = json.loads((out / "run.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and "tokens_per_s" in r]
    per_epoch = {1: [0.0, 0.0], 2: [0.0, 0.0]}
    for prev, row in zip(rows, rows[1:]):
        dt = row["time"] - prev["time"]
        e = 1 if row["epoch"] <= 1.0 + 1e-9 else 2
        per_epoch[e][0] += row["tokens_per_s"] * dt
        per_epoch[e][1] += dt
    rate = {e: round(t / sec, 1) if sec else None for e, (t, sec) in per_epoch.items()}
    second = [r["loss"] for r in rows if r["epoch"] > 1.0 + 1e-9]
    return {
        "flags": flags,
        "tokens_per_s": rate[2],  # steady state: epoch 2
        "tokens_per_s_epoch1": rate[1],
        "epoch1_s": round(per_epoch[1][1], 1),
        "epoch2_s": round(per_epoch[2][1], 1),
        "cache_build_s": build_cost(per_epoch[1][0], per_epoch[1][1], rate[2]),
        "loss": round(statistics.mean(second), 4) if second else None,  # training loss over epoch 2
        "eval_loss": meta["eval_loss"],
        "steps": meta["global_step"],
        "wall_s": round(wall, 1),
    }


def build_cost(tokens1, seconds1, rate2):
    """The one-time cost of epoch 1 over the steady state: its time less what its tokens take at epoch 2's rate
    (with the cache: building it; without: noise around 0)."""
    return round(seconds1 - tokens1 / rate2, 1) if rate2 else None


def lever_arms(ks):
    """--lora-layers K for each K, without and with the cached frozen prefix."""
    arms = {"all-layers": []}
    for k in ks:
        arms[f"lora-{k}"] = ["--lora-layers", str(k)]
        arms[f"lora-{k}-cached"] = ["--lora-layers", str(k), "--cache-frozen-prefix"]
    return arms


def _liger_used():
    from convsim.modeling import loss

    return any(v is not None for v in loss._LIGER.values()) and os.environ.get("CONVSIM_LIGER", "0") == "1"


# the arms besides plain and the default: what each speed-up is worth on its own
VARIANTS = {
    "eager": (["--no-compile"], {"CONVSIM_LIGER": "0"}),
    "eager+checkpointing": (["--no-compile", "--activation-checkpointing"], {"CONVSIM_LIGER": "0"}),
    "compiled-no-liger": (["--compile"], {"CONVSIM_LIGER": "0"}),
    "compiled+liger": (["--compile"], {"CONVSIM_LIGER": "1"}),
    "fp32-frozen": (["--frozen-dtype", "float32"], {"CONVSIM_LIGER": "0"}),
    "no-grouping": (["--no-group-by-length"], {"CONVSIM_LIGER": "0"}),
    "grouped": (["--group-by-length"], {"CONVSIM_LIGER": "0"}),
    "packed": (["--packing"], {"CONVSIM_LIGER": "0"}),  # padding-free batches
    # the default of the previous release: compiled layers, float32 frozen weights, random batches
    "compiled-fp32-random": (
        ["--compile", "--frozen-dtype", "float32", "--no-group-by-length"],
        {"CONVSIM_LIGER": "0"},
    ),
}


def ratio(a, b):
    """a's tokens/s over b's, or None when either has none (a failed arm, a run too short to log twice)."""
    x, y = a.get("tokens_per_s"), b.get("tokens_per_s")
    return x / y if x and y else None


def flops_per_token(c, loss_fraction):
    c = getattr(c, "text_config", c)
    d, L, ff, V = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    heads, kv, hd = c.num_attention_heads, c.num_key_value_heads, getattr(c, "head_dim", d // c.num_attention_heads)
    per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * ff
    return 6 * L * per_layer + 6 * d * V * loss_fraction


def _git_commit() -> str:
    import subprocess

    got = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return got.stdout.strip() or "unknown (pass --commit)"


def _other_gpu_processes() -> list[str] | None:
    """The compute processes already on the GPU before the measure starts (none: the card is not shared);
    None where nvidia-smi cannot tell."""
    import subprocess

    try:
        got = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    mine = str(os.getpid())
    return [ln.strip() for ln in got.stdout.splitlines() if ln.strip() and ln.split(",")[0].strip() != mine]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--variants", default="", help="comma-separated extra arms: " + ", ".join(VARIANTS))
    ap.add_argument(
        "--plain-bf16", action="store_true", help="also run the plain loop with bf16 base weights (a second baseline)"
    )
    ap.add_argument(
        "--lora-layers",
        default="",
        metavar="K,K",
        help="CPU levers instead of --variants: convsim train over 2 epochs with all layers and with "
        "--lora-layers K, with and without --cache-frozen-prefix (epoch-2 rate and losses against the plain "
        "loop over the same number of steps)",
    )
    ap.add_argument("--out")
    ap.add_argument("--commit", help="the commit of this tree, where it is not a git checkout (default: git's)")
    a = ap.parse_args()
    if a.lora_layers:
        return levers(a)
    from convsim.config import TrainConfig

    cfg = TrainConfig(model=a.model, batch_size=a.batch_size)
    card = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU x{os.cpu_count()}"
    others = _other_gpu_processes() if a.device.startswith("cuda") else None
    with tempfile.TemporaryDirectory() as tmp:
        p = plain_loop(cfg, a.data, a.device, a.steps, a.warmup)
        print(f"plain: {p['tokens_per_s']:.0f} tokens/s, peak {p['peak_gib']} GiB", flush=True)
        plain_bf16 = None
        if a.plain_bf16:
            plain_bf16 = plain_loop(cfg, a.data, a.device, a.steps, a.warmup, dtype=torch.bfloat16)
            print(
                f"plain (bf16 weights): {plain_bf16['tokens_per_s']:.0f} tokens/s, peak {plain_bf16['peak_gib']} GiB",
                flush=True,
            )
        o = ours(cfg, a.data, a.device, a.steps, Path(tmp))
        print(f"ours:  {o['tokens_per_s']} tokens/s, peak {o['peak_gib']} GiB", flush=True)
        variants = {}
        for name in filter(None, a.variants.split(",")):
            try:
                variants[name] = ours(cfg, a.data, a.device, a.steps, Path(tmp), *VARIANTS[name])
                print(
                    f"{name}: {variants[name]['tokens_per_s']} tokens/s, peak {variants[name]['peak_gib']} GiB",
                    flush=True,
                )
            except Exception as e:  # one arm failing must not lose the others
                variants[name] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{name}: failed: {e}", flush=True)
    fpt = p["useful_flops_per_token"]
    res = {
        "card": card,
        "card_shared": bool(others) if others is not None else None,
        "other_gpu_processes_before": others,
        "commit": a.commit or _git_commit(),
        "device": a.device,
        "model": a.model,
        "batch_size": a.batch_size,
        "steps": a.steps,
        "plain": p,
        "ours": o,
        "speedup": ratio(o, p),
        **({"plain_bf16": plain_bf16, "speedup_vs_plain_bf16": ratio(o, plain_bf16)} if plain_bf16 else {}),
        "variants": {k: {**v, "speedup": ratio(v, p)} for k, v in variants.items()},
        "useful_flops_per_token": fpt,
        "command": "python bench/train_speed.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
    }
    if a.device.startswith("cuda") and o["tokens_per_s"]:
        res["mfu_ours"] = o["tokens_per_s"] * fpt / (a.peak_tflops * 1e12)
        res["mfu_plain"] = p["tokens_per_s"] * fpt / (a.peak_tflops * 1e12)
    print(json.dumps({k: v for k, v in res.items() if k not in ("plain", "plain_bf16", "ours", "variants")}, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


def levers(a):
    """The --lora-layers mode: plain fp32 loop and convsim arms, all over 2 epochs of the data's training set."""
    from convsim.config import TrainConfig

    cfg = TrainConfig(model=a.model, batch_size=a.batch_size)
    ks = [int(k) for k in a.lora_layers.split(",")]
    load = os.getloadavg()
    arms = {}
    from convsim.training.data import prepare_data

    n_train = len(prepare_data(cfg, a.data)[4]["train"])
    steps = 2 * -(-n_train // cfg.batch_size)  # convsim's two epochs (the last batch of each may be short)
    p = plain_loop(cfg, a.data, a.device, steps - a.warmup, a.warmup)  # first: the baseline every arm needs
    per_epoch = p["steps_per_epoch"]
    p["loss"] = round(statistics.mean(p["losses"][per_epoch : 2 * per_epoch]), 4)  # its epoch 2
    print("plain", p["tokens_per_s"], p["loss"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in lever_arms(ks).items():
            arms[name] = two_epochs(cfg, a.data, a.device, Path(tmp), flags)
            print(name, json.dumps(arms[name]), flush=True)
    for v in arms.values():
        v["speedup_vs_plain"] = ratio(v, p)
        v["loss_vs_plain"] = round(v["loss"] / p["loss"] - 1, 4) if v["loss"] and p["loss"] else None
    commit = a.commit or _git_commit()
    res = {
        "machine": f"CPU x{os.cpu_count()} ({_cpu_name()}), torch {torch.__version__}, {torch.get_num_threads()} threads",
        "commit": commit,
        "command": "python bench/train_speed.py " + " ".join(sys.argv[1:]),
        "load_average_before": [round(x, 2) for x in load],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "model": a.model,
        "batch_size": a.batch_size,
        "plain": {k: v for k, v in p.items() if k != "losses"} | {"losses": [round(x, 4) for x in p["losses"]]},
        "arms": {"plain-fp32": {"tokens_per_s": p["tokens_per_s"], "speedup_vs_plain": 1.0, "loss": p["loss"]}} | arms,
    }
    print(
        json.dumps(
            {k: {m: v.get(m) for m in ("tokens_per_s", "speedup_vs_plain", "loss")} for k, v in res["arms"].items()},
            indent=1,
        )
    )
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
