"""Training throughput of Unsloth on the same model, data, batches and LoRA settings as the plain
transformers + PEFT loop of bench/train_speed.py (issue #10), in two commands and two environments:

1. `dump`, in convsim's environment (transformers 5.24): the run's rendered training examples, batched
   exactly as train_speed.py's plain loop batches them (same shuffle seed, same padding), written to
   DIR/batches.pt, and the model with the speaker tokens added (the same starting weights as the plain
   loop) saved to DIR/model with its tokenizer; DIR/meta.json holds the LoRA settings.

       python bench/unsloth_speed.py dump --data DATA_DIR --out DIR --batch-size 32 --steps 40 --warmup 5

2. `train`, in Unsloth's environment (the machine's transformers <= 5.17, NO convsim site with
   transformers 5.24 on the path): FastLanguageModel.from_pretrained(DIR/model, bf16, no 4-bit),
   get_peft_model with the plain loop's LoRA (r, alpha = r, rsLoRA, dropout 0, attention + MLP
   projections, the speaker rows through `trainable_token_indices`), then the plain loop's steps:
   `model(input_ids, attention_mask, labels).loss`, backward, AdamW, bf16 autocast, timed with
   torch.cuda.synchronize; tokens/s = real (non-pad) tokens / time over the steps after warm-up.

       env -u PYTHONPATH python3 bench/unsloth_speed.py train --dump DIR --site $STAGE/unsloth-site --out unsloth.json

   --site DIR is appended to the END of sys.path, so the machine's own packages win and the carried
   wheels (tools/gpu/unsloth_wheels.sh) only fill what it lacks. Anything missing or failing ends the
   run with a one-line `error` (and `stage`) in the JSON, exit status 1.

Works without unsloth for `--help` and `dump` (unsloth is imported inside `train` only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- dump (convsim env)


def dump(a) -> int:
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from train_speed import batches  # the plain loop's own batching
    from convsim.data.examples import PromptFormat
    from convsim.config import TrainConfig
    from convsim.modeling.models import load_base, resolve
    from convsim.modeling.speakers import add_speaker_tokens
    from convsim.training.data import prepare_data, tokenize
    import transformers

    cfg = TrainConfig(model=a.model, batch_size=a.batch_size)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # the same steps, in the same order, as train_speed.plain_loop
    convs, speakers, targets, split, ex = prepare_data(cfg, a.data)
    spec = resolve(cfg.model)
    torch.manual_seed(cfg.seed)
    model, tok = load_base(cfg.model, device="cpu", dtype=torch.float32)
    ids = add_speaker_tokens(model, tok, speakers, {}, spec.reference_words, seed=cfg.seed)
    fmt = PromptFormat(style=spec.prompt_style, speakers=tuple(speakers), special_tokens=True)
    rows, _ = tokenize(tok, fmt, ex["train"], cfg)
    it = batches(rows, cfg.batch_size, tok.pad_token_id, cfg.seed, "cpu")
    n = a.warmup + a.steps
    bs = []
    for _ in range(n):
        try:
            x, m, y = next(it)
        except StopIteration:
            raise SystemExit(f"only {len(bs)} batches of {cfg.batch_size} in {len(rows)} examples; need {n}")
        bs.append({"input_ids": x.to(torch.int32), "attention_mask": m.to(torch.int8), "labels": y.to(torch.int32)})
    torch.save(bs, out / "batches.pt")
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    loss_fraction = sum(sum(1 for v in r["labels"] if v != -100) for r in rows) / sum(len(r["input_ids"]) for r in rows)
    meta = {
        "model": cfg.model,
        "batch_size": cfg.batch_size,
        "steps": a.steps,
        "warmup": a.warmup,
        "seed": cfg.seed,
        "max_seq_length": cfg.max_seq_length,
        "learning_rate": cfg.learning_rate,
        "lora_r": cfg.lora_r,
        "lora_alpha": cfg.lora_r,
        "lora_dropout": 0.0,
        "use_rslora": True,
        "target_modules": list(spec.attn_targets) + list(spec.mlp_targets),
        "trainable_token_indices": sorted(ids.values()),
        "pad_token_id": tok.pad_token_id,
        "vocab": len(tok),
        "examples": len(rows),
        "loss_token_fraction": loss_fraction,
        "dumped_with_transformers": transformers.__version__,
        "data": str(a.data),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(
        f"dumped {n} batches of {cfg.batch_size} ({len(rows)} examples), model with {len(ids)} speaker tokens -> {out}",
        flush=True,
    )
    return 0


# ----------------------------------------------------------------------------- train (unsloth env)


class Failed(Exception):
    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


def one_line(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}".strip().replace("\n", " | ")
    return s[:600]


def _version(name: str):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def train(a, res: dict) -> None:
    # offline, quiet, and unsloth's generated code kept out of the source tree
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("UNSLOTH_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_SKIP_TORCHVISION_CHECK", "1")
    dump_dir = Path(a.dump)
    work = Path(a.work or (dump_dir / "work"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(work / "unsloth_compiled_cache"))
    if a.site:
        if not Path(a.site).is_dir():
            raise Failed(
                "setup", f"--site {a.site} is not a folder (install tools/gpu/unsloth_wheels.sh's wheels there)"
            )
        sys.path.append(a.site)  # last: the machine's packages win
    stage = "setup"
    try:
        meta = json.loads((dump_dir / "meta.json").read_text())
        res.update(
            batch_size=meta["batch_size"],
            steps=meta["steps"],
            warmup=meta["warmup"],
            lora_r=meta["lora_r"],
            target_modules=meta["target_modules"],
        )
    except (OSError, ValueError, KeyError) as e:
        raise Failed(stage, f"cannot read {dump_dir}/meta.json (run `dump` first): {one_line(e)}")
    for bad in ("transformers", "trl", "unsloth", "peft"):
        if bad in sys.modules:
            raise Failed(stage, f"{bad} was imported before unsloth")
    import torch

    res["torch_version"] = torch.__version__
    if not torch.cuda.is_available():
        raise Failed(
            stage, "no CUDA device: Unsloth's fast path needs a GPU (its CPU fallback is not what #10 measures)"
        )
    res["card"] = torch.cuda.get_device_name()
    tv = _version("transformers")
    res["transformers_version"] = tv
    res["trl_version"] = _version("trl")
    res["peft_version"] = _version("peft")
    res["datasets_version"] = _version("datasets")
    from packaging.version import Version

    if tv is None:
        raise Failed(stage, "transformers is not installed")
    if Version(tv) > Version("5.17.0"):
        raise Failed(
            stage,
            f"transformers {tv} is on the path; unsloth pins transformers <= 5.17 "
            "(run without $STAGE/site, e.g. `env -u PYTHONPATH`)",
        )
    trl_v = res["trl_version"]
    if trl_v is not None and Version(trl_v) > Version("1.15.0"):
        raise Failed(stage, f"trl {trl_v} is on the path; unsloth pins trl <= 1.15")

    stage = "import unsloth"
    t = time.perf_counter()
    try:
        import unsloth  # noqa: F401  (first: it patches transformers/peft/trl as they import)
        from unsloth import FastLanguageModel
    except BaseException as e:  # SystemExit/NotImplementedError included
        missing = getattr(e, "name", None) if isinstance(e, ModuleNotFoundError) else None
        raise Failed(stage, (f"missing module {missing!r}: " if missing else "") + one_line(e))
    res["unsloth_version"] = getattr(unsloth, "__version__", _version("unsloth"))
    res["unsloth_zoo_version"] = _version("unsloth_zoo")
    res["import_s"] = time.perf_counter() - t
    if getattr(unsloth, "_IS_CPU_BACKEND", False):
        raise Failed(stage, "unsloth chose its CPU backend although torch sees CUDA")
    try:
        import unsloth_zoo.loss_utils as lu

        res["cut_cross_entropy"] = bool(getattr(lu, "HAS_CUT_CROSS_ENTROPY", False))
    except Exception:
        pass
    res["xformers"] = _version("xformers")
    res["bitsandbytes"] = _version("bitsandbytes")

    stage = "load model"
    t = time.perf_counter()
    try:
        model, tok = FastLanguageModel.from_pretrained(
            model_name=str(dump_dir / "model"),
            max_seq_length=meta["max_seq_length"],
            dtype=torch.bfloat16,
            load_in_4bit=False,
            load_in_8bit=False,
            full_finetuning=False,
            fix_tokenizer=False,
            use_gradient_checkpointing=a.gradient_checkpointing,
        )
    except BaseException as e:
        raise Failed(stage, one_line(e))
    res["load_s"] = time.perf_counter() - t
    emb = model.get_input_embeddings().weight
    res["model_class"] = type(model).__name__
    if emb.shape[0] < meta["vocab"]:
        raise Failed(stage, f"embedding has {emb.shape[0]} rows, the dumped tokenizer {meta['vocab']}")

    stage = "get_peft_model"
    peft_kw = dict(
        r=meta["lora_r"],
        lora_alpha=meta["lora_alpha"],
        lora_dropout=meta["lora_dropout"],
        target_modules=meta["target_modules"],
        bias="none",
        use_rslora=meta["use_rslora"],
        use_gradient_checkpointing=a.gradient_checkpointing,
        random_state=meta["seed"],
    )
    res["trainable_tokens"] = True
    try:
        model = FastLanguageModel.get_peft_model(
            model, trainable_token_indices={"embed_tokens": meta["trainable_token_indices"]}, **peft_kw
        )
    except BaseException as e:
        if a.require_trainable_tokens:
            raise Failed(stage, "with trainable_token_indices: " + one_line(e))
        # the speaker rows are a few hundred parameters; LoRA alone still measures the same step
        res["trainable_tokens"] = False
        res["trainable_tokens_error"] = one_line(e)
        try:
            model = FastLanguageModel.get_peft_model(model, **peft_kw)
        except BaseException as e2:
            raise Failed(stage, one_line(e2))
    res["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    stage = "train"
    dev = emb.device if emb.device.type == "cuda" else torch.device("cuda")
    bs = torch.load(dump_dir / "batches.pt", weights_only=True)
    n = meta["warmup"] + meta["steps"]
    if len(bs) < n:
        raise Failed(stage, f"{len(bs)} batches dumped, need {n}")
    model.train()
    torch.manual_seed(meta["seed"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=meta["learning_rate"])
    torch.cuda.reset_peak_memory_stats()
    times, toks, losses = [], [], []
    try:
        for step in range(n):
            b = bs[step]
            x = b["input_ids"].long().to(dev)
            m = b["attention_mask"].long().to(dev)
            y = b["labels"].long().to(dev)
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=x, attention_mask=m, labels=y).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            losses.append(float(loss))
            if step < meta["warmup"]:
                res.setdefault("warmup_step_s", []).append(dt)
            else:
                times.append(dt)
                toks.append(int(m.sum()))
            if step == 0:
                print(f"unsloth: first step {dt:.1f} s (compilation included), loss {losses[0]:.3f}", flush=True)
    except BaseException as e:
        res["steps_done"] = len(losses)
        raise Failed(stage, f"at step {len(losses)}: " + one_line(e))
    res.update(
        tokens_per_s=sum(toks) / sum(times),
        step_s_median=statistics.median(times),
        tokens_per_s_median_step=statistics.median(t_ / s for t_, s in zip(toks, times)),
        step_s=times,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30,
        peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
        first_loss=losses[0],
        final_loss=losses[-1],
        mean_loss_after_warmup=statistics.fmean(losses[meta["warmup"] :]),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="convsim env: batches + model with speaker tokens -> DIR")
    d.add_argument("--data", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--model", default="gemma-3-270m")
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--steps", type=int, default=40)
    d.add_argument("--warmup", type=int, default=5)
    t = sub.add_parser("train", help="unsloth env: train on DIR's batches, write JSON")
    t.add_argument("--dump", required=True, help="the folder `dump` wrote")
    t.add_argument("--site", help="folder with the carried unsloth wheels installed (appended to sys.path)")
    t.add_argument("--out", required=True, help="JSON result (written on failure too, with `error`)")
    t.add_argument("--work", help="scratch folder (unsloth's compiled cache); default DUMP/work")
    t.add_argument(
        "--gradient-checkpointing",
        default=False,
        type=lambda s: {"false": False, "true": True}.get(s, s),
        help="false (default, as the plain loop), true, or unsloth (Unsloth's default, offloaded)",
    )
    t.add_argument(
        "--require-trainable-tokens",
        action="store_true",
        help="fail instead of training LoRA alone when trainable_token_indices is refused",
    )
    a = ap.parse_args(argv)
    if a.cmd == "dump":
        return dump(a)
    res = {
        "bench": "unsloth",
        "command": "python3 bench/unsloth_speed.py " + " ".join(sys.argv[1:]),
        "gradient_checkpointing": a.gradient_checkpointing,
        "python": sys.version.split()[0],
    }
    rc = 0
    try:
        train(a, res)
        print(
            f"unsloth: {res['tokens_per_s']:.0f} tokens/s, peak {res['peak_gib']:.1f} GiB, "
            f"loss {res['first_loss']:.3f} -> {res['final_loss']:.3f} on {res.get('card')}",
            flush=True,
        )
    except Failed as e:
        res["error"], res["stage"] = e.reason, e.stage
        print(f"unsloth: FAILED at {e.stage}: {e.reason}", file=sys.stderr, flush=True)
        rc = 1
    except BaseException as e:  # anything unforeseen still leaves a JSON
        res["error"], res["stage"] = one_line(e), "unexpected"
        traceback.print_exc()
        rc = 1
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    return rc


if __name__ == "__main__":
    sys.exit(main())
