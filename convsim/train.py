"""`convsim train`: LoRA fine-tune a model on a data dir so it writes as each person.

TRL's SFTTrainer with a PEFT LoRA adapter; one special token per speaker whose embedding row starts at
the mean of reference tokens and is the only part of the embedding that trains; loss on the reply
only (or, with --loss whole, on all text as the seed did); the output head is computed only at the
positions that carry loss (Gemma 3 270M spends most of its compute in its 262k-word head).

    convsim train data/ --out runs/ana --max-steps 200
    convsim train data/ --out runs/ana --continue-training        # resume after a crash or a budget stop
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from convsim.config import TrainConfig, resolve, to_yaml
from convsim.errors import UserError

HELP = "LoRA fine-tune a model on a data dir (from `convsim import`), with one special token per speaker."
EXAMPLES = """
  convsim train data/ --out runs/me                       # all speakers, embedded Gemma 3 270M
  convsim train data/ --out runs/me --target Ana --max-steps 300 --time-budget 10
  convsim train data/ --out runs/tiny --model tiny-llama --max-steps 20   # smoke test in seconds
  convsim train data/ --out runs/me --continue-training   # resume from the latest checkpoint
  convsim train data/ --out runs/me --config train.yaml --learning-rate 1e-4   # flags override YAML
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", help="directory written by `convsim import`")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--config", help="YAML file with TrainConfig fields (flags override it)")
    p.add_argument("--model", help="model table row, hub id or local path (default gemma-3-270m)")
    p.add_argument("--target", action="append", dest="targets", metavar="NAME",
                   help="train on this person's replies (repeatable); default: all")
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--time-budget", type=float, metavar="MINUTES", help="stop cleanly and save after this long")
    p.add_argument("--max-seq-length", type=int)
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-alpha", type=int)
    p.add_argument("--special-tokens", action=argparse.BooleanOptionalAction, default=None,
                   help="one added token per speaker (default on)")
    p.add_argument("--include-mlp", action=argparse.BooleanOptionalAction, default=None,
                   help="LoRA on the MLP projections too (default on)")
    p.add_argument("--instruct-format", action=argparse.BooleanOptionalAction, default=None,
                   help="chat-template rendering (default: the model's prompt style)")
    p.add_argument("--loss", choices=["reply", "whole"], help="loss on the reply only (default) or all text")
    p.add_argument("--continue-training", action="store_true", help="resume from the latest checkpoint")
    p.add_argument("--quantization", choices=["4bit", "8bit"], help="QLoRA via bitsandbytes (CUDA only)")
    p.add_argument("--backend", choices=["peft", "unsloth"])
    p.add_argument("--eval-steps", type=int)
    p.add_argument("--max-val-examples", type=int, help="validation examples used for the loss (default 200)")
    p.add_argument("--save-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")


def config_from_args(args) -> TrainConfig:
    keys = ["model", "targets", "epochs", "batch_size", "grad_accum", "learning_rate", "max_steps", "time_budget",
            "max_seq_length", "lora_r", "lora_alpha", "special_tokens", "include_mlp", "instruct_format", "loss",
            "quantization", "backend", "eval_steps", "save_steps", "seed", "max_val_examples"]
    return resolve(TrainConfig, args.config, {k: getattr(args, k, None) for k in keys}).validate()


# ----------------------------------------------------------------------------- data

def prepare_data(cfg: TrainConfig, data_dir: str):
    """Conversations → split → examples; every way this can end empty is a clear error."""
    from convsim.chats.examples import build_examples, split_conversations
    from convsim.chats.schema import read_conversations, speakers_of
    convs = read_conversations(data_dir)
    speakers = speakers_of(convs)
    if len(speakers) < 2:
        raise UserError(f"{data_dir}: the chat has only one speaker ({', '.join(speakers) or 'none'}); "
                        "convsim needs at least two people talking")
    targets = speakers if cfg.targets in (["all"], [], None) else cfg.targets
    for t in targets:
        if t not in speakers:
            raise UserError(f"unknown target speaker {t!r}; the data has {', '.join(speakers[:20])}")
    split = split_conversations(convs, cfg.val_fraction, cfg.test_fraction)
    ex = {name: build_examples(cs, targets, cfg.context_size, cfg.max_burst) for name, cs in split.items()}
    for t in targets:
        if not any(e.speaker == t for e in ex["train"]):
            raise UserError(f"target {t!r} has no training examples (no reply of theirs follows a message)")
    return convs, speakers, targets, split, ex


def tokenize(tok, fmt, examples, cfg: TrainConfig, whole: bool = False):
    from convsim.chats.examples import render_example, render_whole
    fn = render_whole if whole else render_example
    rows, truncated = [], 0
    for e in examples:
        r = fn(tok, fmt, e, cfg.max_seq_length)
        truncated += r.truncated
        rows.append({"input_ids": r.input_ids,
                     "labels": [i if m else -100 for i, m in zip(r.input_ids, r.loss_mask)]})
    return rows, truncated


# ----------------------------------------------------------------------------- model

def build_model(cfg: TrainConfig, speakers, device):
    from peft import LoraConfig, get_peft_model
    from convsim.models import load_base, resolve as resolve_model
    from convsim.speakers import add_speaker_tokens
    spec = resolve_model(cfg.model)
    if cfg.quantization and not device.startswith("cuda"):
        raise UserError(f"--quantization {cfg.quantization} needs a CUDA GPU (bitsandbytes); on CPU train without it")
    if cfg.backend == "unsloth":
        try:
            import unsloth  # noqa: F401
        except ImportError:
            raise UserError("--backend unsloth needs the unsloth package on a CUDA machine (pip install unsloth)") from None
        if not device.startswith("cuda"):
            raise UserError("--backend unsloth needs a CUDA GPU")
    import torch
    dtype = torch.float32  # fp32 master weights; bf16 autocast on CUDA
    model, tok = load_base(cfg.model, device=device, dtype=dtype)
    if cfg.quantization:
        model, tok = _load_quantized(cfg, device)
    ids = {}
    if cfg.special_tokens:
        ids = add_speaker_tokens(model, tok, speakers, cfg.speaker_references, spec.reference_words, seed=cfg.seed)
    targets = list(spec.attn_targets) + (list(spec.mlp_targets) if cfg.include_mlp else [])
    tt = None
    if ids:
        tt = {"embed_tokens": sorted(ids.values())}
        out, emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and out.weight.data_ptr() != emb.weight.data_ptr():
            tt["lm_head"] = sorted(ids.values())
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or cfg.lora_r, lora_dropout=cfg.lora_dropout,
                      use_rslora=cfg.use_rslora, target_modules=targets, trainable_token_indices=tt,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    from convsim.fastpeft import patch_trainable_tokens
    patch_trainable_tokens(model)
    return model, tok, spec, ids


def _load_quantized(cfg, device):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--quantization needs the bitsandbytes package (pip install bitsandbytes)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from convsim.models import ensure_embedded_cache, resolve as resolve_model
    spec = resolve_model(cfg.model)
    where = str(ensure_embedded_cache()) if spec.source == "embedded" else spec.location
    q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
         if cfg.quantization == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
    model = AutoModelForCausalLM.from_pretrained(where, quantization_config=q, device_map={"": device})
    return model, AutoTokenizer.from_pretrained(where)


# ----------------------------------------------------------------------------- loss

def reply_loss(model, inputs, num_items_in_batch=None):
    """Cross-entropy with the output head applied only where labels carry loss."""
    import torch
    import torch.nn.functional as F
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix)
    labels = inputs["labels"]
    out = backbone(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)
    hidden = out.last_hidden_state[:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    h = hidden[mask]
    logits = base.get_output_embeddings()(h).float()
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    total = F.cross_entropy(logits, target[mask], reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
    if torch.is_tensor(denom):
        denom = denom.to(total.device)
    return total / denom


def make_trainer_class():
    from trl import SFTTrainer

    class ConvsimTrainer(SFTTrainer):
        """SFTTrainer whose loss computes the head at reply positions only."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = reply_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, {"loss": loss}) if return_outputs else loss

    return ConvsimTrainer


# ----------------------------------------------------------------------------- callbacks

def make_callbacks(cfg, run_dir: Path, tok, fmt, val_examples):
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        """Stop cleanly (and save) once the time budget is spent."""

        def __init__(self, minutes):
            self.limit = minutes * 60 if minutes else None
            self.start = None

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.time()

        def on_step_end(self, args, state, control, **kw):
            if self.limit and time.time() - self.start > self.limit:
                control.should_training_stop = True
                control.should_save = True
                state.stop_reason = "time budget"

    class Metrics(TrainerCallback):
        """Append every log line to metrics.jsonl (loss curves come from here)."""

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or not state.is_world_process_zero:
                return
            row = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
            with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    class Samples(TrainerCallback):
        """At each evaluation, sample replies for a few validation contexts into samples.jsonl."""

        def on_evaluate(self, args, state, control, model=None, **kw):
            if not cfg.samples or not val_examples or not state.is_world_process_zero:
                return
            from convsim.generate import SampleConfig, reply
            was_training = model.training
            model.eval()
            rows = []
            for e in val_examples[:cfg.samples]:
                got = reply(model, tok, fmt, e.context, e.speaker,
                            SampleConfig(temperature=0.7, max_new_tokens=48, seed=cfg.seed))[0]
                rows.append({"step": state.global_step, "speaker": e.speaker,
                             "context": [f"[{m.speaker}] {m.text}" for m in e.context[-3:]],
                             "real": [m.text for m in e.reply], "sampled": got})
            with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            if was_training:
                model.train()

    return [Budget(cfg.time_budget), Metrics(), Samples()]


# ----------------------------------------------------------------------------- stage

def write_meta(run_dir: Path, meta: dict) -> None:
    from convsim.fsutil import write_json
    write_json(run_dir / "run.json", meta)


def run(args) -> int:
    import torch
    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig

    from convsim.chats.examples import PromptFormat
    from convsim.chats.schema import write_conversations
    from convsim.fsutil import atomic_dir, private_dir, write_text
    from convsim.models import default_device
    from convsim.runs import dir_hash

    cfg = config_from_args(args)
    data_dir = Path(args.data_dir)
    if not data_dir.exists():
        raise UserError(f"data dir {data_dir} does not exist (run `convsim import` first)")
    run_dir = Path(args.out)
    ckpt_dir = run_dir / "checkpoints"
    resume = None
    if args.continue_training:
        if ckpt_dir.exists():
            resume = get_last_checkpoint(str(ckpt_dir))
        if resume is None:
            print(f"no checkpoint in {ckpt_dir}; starting from scratch", file=sys.stderr)
    elif (run_dir / "run.json").exists() or ckpt_dir.exists():
        raise UserError(f"{run_dir} already holds a run; use --continue-training to resume or another --out")

    convs, speakers, targets, split, ex = prepare_data(cfg, args.data_dir)
    torch.manual_seed(cfg.seed)
    device = default_device()
    model, tok, spec, ids = build_model(cfg, speakers, device)
    style = "instruct" if (cfg.instruct_format if cfg.instruct_format is not None
                           else spec.prompt_style == "instruct") else "base"
    fmt = PromptFormat(style=style, speakers=tuple(speakers), special_tokens=cfg.special_tokens)
    train_rows, trunc = tokenize(tok, fmt, ex["train"], cfg, whole=cfg.loss == "whole")
    val_examples = ex["val"][:cfg.max_val_examples]
    val_rows, _ = tokenize(tok, fmt, val_examples, cfg, whole=False)
    if trunc > 0.05 * len(train_rows):
        print(f"warning: --max-seq-length {cfg.max_seq_length} truncated {trunc} of {len(train_rows)} training "
              f"examples ({100 * trunc / len(train_rows):.0f}%)", file=sys.stderr)

    private_dir(run_dir)
    write_conversations(private_dir(run_dir / "data") / "conversations.jsonl", convs)
    write_text(run_dir / "config.yaml", to_yaml(cfg))
    meta = {"model": cfg.model, "prompt_style": style, "special_tokens": cfg.special_tokens,
            "speakers": speakers, "targets": targets, "speaker_token_ids": ids, "loss": cfg.loss,
            "context_size": cfg.context_size, "max_burst": cfg.max_burst, "seed": cfg.seed,
            "split": {k: [c.id for c in v] for k, v in split.items()},
            "examples": {k: len(v) for k, v in ex.items()}, "status": "training"}
    write_meta(run_dir, meta)
    tok.save_pretrained(run_dir / "tokenizer")

    cuda = device.startswith("cuda")
    steps_per_epoch = math.ceil(len(train_rows) / (cfg.batch_size * cfg.grad_accum))
    sft = SFTConfig(
        output_dir=str(ckpt_dir), per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, warmup_steps=int(cfg.warmup_ratio * (cfg.max_steps if cfg.max_steps > 0 else
                                                                      steps_per_epoch * cfg.epochs)),
        weight_decay=cfg.weight_decay, lr_scheduler_type="linear", logging_steps=cfg.logging_steps,
        eval_strategy="steps" if val_rows else "no", eval_steps=cfg.eval_steps, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=2, seed=cfg.seed, data_seed=cfg.seed, bf16=cuda,
        report_to=["tensorboard"], max_length=None,
        prediction_loss_only=True, remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=False, use_cpu=not cuda, save_only_model=False,
        dataset_kwargs={"skip_prepare_dataset": False},
    )
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "logs")
    Trainer = make_trainer_class()
    trainer = Trainer(model=model, args=sft, train_dataset=Dataset.from_list(train_rows),
                      eval_dataset=Dataset.from_list(val_rows) if val_rows else None, processing_class=tok,
                      callbacks=make_callbacks(cfg, run_dir, tok, fmt, val_examples))
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.time() - t0
    final_eval = trainer.evaluate() if val_rows else {}
    # the adapter is the product: write it whole or not at all
    with atomic_dir(run_dir / "adapter") as tmp:
        model.save_pretrained(tmp, save_embedding_layers=False)  # speaker rows live in the trainable-token delta
    meta.update(status="done", adapter_hash=dir_hash(run_dir / "adapter"), train_seconds=round(seconds, 1),
                global_step=trainer.state.global_step, train_loss=result.training_loss,
                eval_loss=final_eval.get("eval_loss"), device=device,
                stop_reason=getattr(trainer.state, "stop_reason", "done"))
    write_meta(run_dir, meta)
    summary = {"run_dir": str(run_dir), "steps": trainer.state.global_step, "train_loss": result.training_loss,
               "eval_loss": final_eval.get("eval_loss"), "seconds": round(seconds, 1),
               "examples": meta["examples"], "speakers": speakers, "targets": targets,
               "adapter_mb": round(sum(f.stat().st_size for f in (run_dir / "adapter").rglob("*") if f.is_file()) / 1e6, 2)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"trained {summary['steps']} steps in {seconds:.0f}s: train loss {result.training_loss:.3f}"
              + (f", val loss {summary['eval_loss']:.3f}" if summary["eval_loss"] is not None else "")
              + f"; adapter {summary['adapter_mb']} MB in {run_dir}/adapter")
        print(f"next: convsim chat {run_dir} --as {targets[0]!r}")
    return 0
