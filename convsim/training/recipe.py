"""`convsim train`: LoRA fine-tune a model on a data dir so it writes as each person.

TRL's SFTTrainer with a PEFT LoRA adapter; one special token per speaker whose embedding row starts at
the mean of reference tokens and is the only part of the embedding that trains; loss on the reply
only (or, with --loss whole, on all text as the seed did); the output head is computed only at the
positions that carry loss (Gemma 3 270M spends most of its compute in its 262k-word head).

    convsim train data/ --out runs/ana --max-steps 200
    convsim train data/ --out runs/ana --continue-training        # resume after a crash or a budget stop
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from convsim.config import to_yaml
from convsim.errors import UserError
from convsim.training.backends import build_model
from convsim.training.callbacks import make_callbacks
from convsim.training.checkpoints import (
    checkpoint_step,
    clean_checkpoints,
    last_checkpoint,
    restore_best,
    rewind_logs,
    verify_checkpoint,
)
from convsim.training.cpu_recipe import (
    apply_cpu_recipe,
    probe_cpu_seconds_per_token,
    recipe_for,
    recipe_line,
    sizes_the_work,
    work_line,
    work_tokens,
)
from convsim.training.data import default_extra_data, extra_summary, prepare_data, prompt_format, tokenize
from convsim.training.options import add_arguments, config_from_args, given_fields
from convsim.training.model import (
    bf16_autocast,
    compile_layers,
    cpu_precision,
    gathered_trained_state,
    sampling_args,
    wants_checkpointing,
    wants_compile,
    wants_grouping,
    wants_packing,
)
from convsim.training.trainer import make_trainer_class

# the command interface convsim.cli loads: HELP, EXAMPLES, add_arguments(parser), run(args)
__all__ = ["EXAMPLES", "HELP", "add_arguments", "run"]

HELP = "LoRA fine-tune a model on a data dir (from `convsim import`), with one special token per speaker."
EXAMPLES = """
  convsim train data/ --out runs/me                       # the default recipe: 16 messages of context,
                                                          # 2 epochs of batch 32, plus data/extra if present
  convsim train data/ --out runs/me --target Ana --max-steps 300 --time-budget 10
  convsim train data/ --out runs/tiny --model tiny-llama --max-steps 20   # smoke test in seconds
  convsim train data/ --out runs/me --continue-training   # resume from the latest checkpoint
  convsim train data/ --out runs/me --config train.yaml --learning-rate 1e-4   # flags override YAML
  convsim train data/pair --extra-data data/their-other-chats --out runs/more   # more of the same people
  convsim train data/ --out runs/pair-only --no-auto-extra-data   # leave data/extra out
  CONVSIM_PROFILE=prof convsim train data/ --out runs/p --max-steps 20   # torch.profiler table of steps 11-15
"""


# ----------------------------------------------------------------------------- stage


def finish_distributed() -> None:
    """Under torchrun/accelerate: every rank meets here (rank 0 after writing the run) and the process
    group is destroyed before exit. A rank that simply exited while another still used the group could be
    aborted by the communication library ('terminate called without an active exception')."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run(args) -> int:
    with fused_attention_kernels():
        return _run(args)


@contextlib.contextmanager
def fused_attention_kernels():
    """Context: PyTorch's SDPA without its cuDNN backend (restored after). With masked, varying-length chat
    batches the cuDNN attention kernels spend milliseconds of host time per call, more than the GPU work
    they launch (a CONVSIM_PROFILE profile of `convsim train`: docs/PERFORMANCE.md); the memory-efficient
    and flash kernels take microseconds to launch. Must hold while the layers compile: the compiled graph fixes the backend it calls."""
    import torch

    backends = getattr(torch.backends, "cuda", None)
    if not (torch.cuda.is_available() and hasattr(backends, "enable_cudnn_sdp")):
        yield
        return
    was = backends.cudnn_sdp_enabled()
    backends.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        backends.enable_cudnn_sdp(was)


def steps_for_tokens(tokens: int, rows: list[dict], per_step: int) -> int:
    """Optimizer steps that train on about `tokens` real tokens: rows of mean length, `per_step` rows a step
    (at least one step)."""
    mean = sum(len(r["input_ids"]) for r in rows) / max(1, len(rows))
    return max(1, round(tokens / (mean * per_step))) if mean else 1


def last_evaluation(trainer) -> dict | None:
    """The validation loss the trainer already computed at the final step (it evaluates there when the last
    step falls on its schedule): evaluating the same weights again would only cost time."""
    step = trainer.state.global_step
    done = [r for r in trainer.state.log_history if "eval_loss" in r and r.get("step") == step]
    return {"eval_loss": done[-1]["eval_loss"]} if done else None


def _run(args) -> int:
    import torch
    from datasets import Dataset
    from trl import SFTConfig

    from convsim.data.schema import write_conversations
    from convsim.fsutil import atomic_dir, private_dir, write_text
    from convsim.modeling.models import default_device
    from convsim.modeling.prefix import prefix_cache
    from convsim.runs import RunMeta, dir_hash, write_meta

    cfg = config_from_args(args)
    given = given_fields(args)
    device = default_device()
    cpu_recipe = recipe_for(device, cfg.recipe) == "cpu"
    if cpu_recipe:
        cfg, changed = apply_cpu_recipe(cfg, given)
    data_dir = Path(args.data_dir)
    if not data_dir.exists():
        raise UserError(f"data dir {data_dir} does not exist (run `convsim import` first)")
    run_dir = Path(args.out)
    saved = run_dir / "config.yaml"
    from_saved = args.continue_training and not getattr(args, "extra_data", None) and saved.exists()
    cfg.extra_data = default_extra_data(cfg, data_dir, recorded_in=saved if from_saved else None)
    ckpt_dir = run_dir / "checkpoints"
    resume = None
    if args.continue_training:
        resume = last_checkpoint(ckpt_dir)  # the newest complete one; half-written ones are skipped
        if resume is not None:
            verify_checkpoint(resume, run_dir)  # before anything is written or the Trainer unpickles it
        if int(os.environ.get("RANK", "0")) == 0:
            clean_checkpoints(ckpt_dir)
            if resume is not None:
                rewind_logs(run_dir, checkpoint_step(resume))
        if resume is None:
            print(f"no complete checkpoint in {ckpt_dir}; starting from scratch", file=sys.stderr)
    elif int(os.environ.get("RANK", "0")) == 0 and ((run_dir / "run.json").exists() or ckpt_dir.exists()):
        # rank 0 alone decides: the other ranks would otherwise see the run rank 0 has just started
        raise UserError(f"{run_dir} already holds a run; use --continue-training to resume or another --out")

    convs, speakers, targets, split, ex = prepare_data(cfg, args.data_dir)
    torch.manual_seed(cfg.seed)
    model, tok, spec, ids = build_model(cfg, speakers, device)
    if device == "cpu":  # after loading: a model that does not fit stays one error line
        print(cpu_precision(cfg, device), file=sys.stderr, flush=True)
    if cpu_recipe and changed:  # where flags chose every value, there is nothing to say
        print(recipe_line(changed), file=sys.stderr, flush=True)
    fmt = prompt_format(cfg, spec, speakers)
    style = fmt.style
    train_rows, trunc = tokenize(tok, fmt, ex["train"], cfg, whole=cfg.loss == "whole")
    val_examples = ex["val"][: cfg.max_val_examples]
    val_rows, _ = tokenize(tok, fmt, val_examples, cfg, whole=False)
    if cfg.keep_best and not val_rows:
        print(
            "warning: --keep-best needs validation examples and there are none; the run ends with its last weights",
            file=sys.stderr,
        )
    if trunc > 0.05 * len(train_rows):
        print(
            f"warning: --max-seq-length {cfg.max_seq_length} truncated {trunc} of {len(train_rows)} training "
            f"examples ({100 * trunc / len(train_rows):.0f}%)",
            file=sys.stderr,
        )

    if cpu_recipe and sizes_the_work(given) and train_rows:
        threads = torch.get_num_threads()
        print(
            "CPU recipe: probing this machine's speed on 3 batches (one thread: a minute or two)",
            file=sys.stderr,
            flush=True,
        )
        per_token = probe_cpu_seconds_per_token(model, train_rows, cfg.batch_size, tok.pad_token_id)
        cfg = replace(cfg, train_tokens=work_tokens(per_token, threads, cfg.cpu_minutes))
        print(work_line(cfg.train_tokens, per_token, threads, cfg.cpu_minutes), file=sys.stderr, flush=True)
    max_steps = cfg.max_steps
    if cfg.train_tokens:
        max_steps = steps_for_tokens(cfg.train_tokens, train_rows, cfg.batch_size * cfg.grad_accum)
        print(
            f"training on about {cfg.train_tokens:,} tokens: {max_steps} steps of {cfg.batch_size * cfg.grad_accum}",
            file=sys.stderr,
        )
    main = int(os.environ.get("RANK", "0")) == 0  # under accelerate/torchrun only rank 0 writes files
    if main:
        private_dir(run_dir)
        private_dir(run_dir / "checkpoints")
        private_dir(run_dir / "logs")  # owner-only even outside cli.main
        write_conversations(private_dir(run_dir / "data") / "conversations.jsonl", convs)
        write_text(run_dir / "config.yaml", to_yaml(cfg))
    meta = RunMeta(
        model=cfg.model,
        prompt_style=style,
        special_tokens=cfg.special_tokens,
        speakers=speakers,
        targets=targets,
        speaker_token_ids=ids,
        loss=cfg.loss,
        context_size=cfg.context_size,
        max_burst=cfg.max_burst,
        seed=cfg.seed,
        split={k: [c.id for c in v] for k, v in split.items()},
        examples={k: len(v) for k, v in ex.items()},
        status="training",
        resumed_from=resume.name if resume else None,
        extra_data=extra_summary(cfg, convs, speakers),
    )
    if main:
        write_meta(run_dir, meta)
        tok.save_pretrained(run_dir / "tokenizer")

    cuda = device.startswith("cuda")
    checkpointing = wants_checkpointing(cfg, model)
    compiled = compile_layers(model) if wants_compile(cfg, device) else 0
    grouped = wants_grouping(cfg, device)
    packed = wants_packing(cfg)
    meta = replace(
        meta,
        activation_checkpointing=checkpointing,
        compiled_layers=compiled,
        group_by_length=grouped,
        packing=packed,
        frozen_dtype=str(next(p for p in model.parameters() if not p.requires_grad).dtype).replace("torch.", ""),
    )
    steps_per_epoch = math.ceil(len(train_rows) / (cfg.batch_size * cfg.grad_accum))
    sft = SFTConfig(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=max_steps,
        warmup_steps=int(cfg.warmup_ratio * (max_steps if max_steps > 0 else steps_per_epoch * cfg.epochs)),
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear",
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if val_rows else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16_autocast(cfg, device),
        report_to=["tensorboard"],
        max_length=None,
        prediction_loss_only=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        use_cpu=not cuda,
        save_only_model=False,
        ddp_find_unused_parameters=False,
        dataset_kwargs={"skip_prepare_dataset": False},
        gradient_checkpointing=checkpointing,
        pad_to_multiple_of=8 if cuda else None,  # aligned widths: the attention kernels' mask needs them
        padding_free=packed,
        **sampling_args(grouped),
    )
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "logs")
    Trainer = make_trainer_class()
    trainer = Trainer(
        model=model,
        args=sft,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows) if val_rows else None,
        processing_class=tok,
        callbacks=make_callbacks(cfg, run_dir, tok, fmt, val_examples),
    )
    from transformers.trainer_callback import ProgressCallback

    trainer.remove_callback(ProgressCallback)  # its bar prints raw log dicts; ours (callbacks.Progress) replaces it
    trainer.resume_from(resume)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_loss = trainer.run_loss(result)  # over the whole run, also when it resumed
    seconds = time.time() - t0
    cache = prefix_cache(model)
    if cache is not None:
        print(
            f"cached frozen prefix: {len(cache.states):,} examples, {cache.built_tokens:,} tokens, "
            f"{cache.nbytes() / 2**20:.0f} MiB in memory",
            file=sys.stderr,
        )
    kept = None
    if cfg.keep_best and val_rows:
        final_eval = trainer.evaluate()  # the last step is a candidate too
        kept = restore_best(run_dir, model)  # every process: each replica or shard ends with the kept weights
        if kept is not None and kept["step"] != trainer.state.global_step:
            for cb in [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "KeepBest"]:
                trainer.remove_callback(cb)  # this evaluation is of the kept weights, not a new candidate
            final_eval = trainer.evaluate()  # now of the restored weights (equal to kept["eval_loss"])
    else:
        final_eval = last_evaluation(trainer) or (trainer.evaluate() if val_rows else {})
    gathered = gathered_trained_state(model)  # FSDP: every process takes part; None otherwise
    if not main:
        finish_distributed()  # wait for rank 0 to write the run, then leave the group together
        return 0
    # the adapter is the product: write it whole or not at all
    print(f"saving the adapter to {run_dir}/adapter", file=sys.stderr, flush=True)
    with atomic_dir(run_dir / "adapter") as tmp:
        # speaker rows live in the trainable-token delta; under FSDP from the gathered weights
        model.save_pretrained(tmp, state_dict=gathered, save_embedding_layers=False)
    rates = sorted(r["tokens_per_s"] for r in trainer.state.log_history if "tokens_per_s" in r)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens_per_s = round(rates[len(rates) // 2] * world, 1) if rates else None  # median interval, all processes
    meta = replace(
        meta,
        status="done",
        adapter_hash=dir_hash(run_dir / "adapter"),
        train_seconds=round(seconds, 1),
        tokens_per_s=tokens_per_s,
        world_size=world,
        global_step=trainer.state.global_step,
        train_loss=train_loss,
        eval_loss=final_eval.get("eval_loss"),
        device=device,
        kept_best=kept,
        stop_reason=getattr(trainer.state, "stop_reason", "done"),
    )
    write_meta(run_dir, meta)
    finish_distributed()
    summary = {
        "run_dir": str(run_dir),
        "steps": trainer.state.global_step,
        "train_loss": train_loss,
        "eval_loss": final_eval.get("eval_loss"),
        "seconds": round(seconds, 1),
        "tokens_per_s": tokens_per_s,
        "world_size": world,
        "examples": meta.examples,
        "speakers": speakers,
        "targets": targets,
        "adapter_mb": round(sum(f.stat().st_size for f in (run_dir / "adapter").rglob("*") if f.is_file()) / 1e6, 2),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"trained {summary['steps']} steps in {seconds:.0f}s: train loss {train_loss:.3f}"
            + (f", val loss {summary['eval_loss']:.3f}" if summary["eval_loss"] is not None else "")
            + f"; adapter {summary['adapter_mb']} MB in {run_dir}/adapter"
        )
        print(f"next: convsim chat {run_dir} --as {targets[0]!r}")
    return 0
