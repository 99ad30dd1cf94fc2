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
import contextlib
import functools
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
  convsim train data/pair --extra-data data/their-other-chats --out runs/more   # more of the same people
  CONVSIM_PROFILE=prof convsim train data/ --out runs/p --max-steps 20   # torch.profiler table of steps 11-15
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", help="directory written by `convsim import`")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--config", help="YAML file with TrainConfig fields (flags override it)")
    p.add_argument("--model", help="model table row, hub id or local path (default gemma-3-270m)")
    p.add_argument("--target", action="append", dest="targets", metavar="NAME",
                   help="train on this person's replies (repeatable); default: everyone in DATA_DIR (not the people "
                        "found only in --extra-data)")
    p.add_argument("--extra-data", action="append", metavar="DATA_DIR",
                   help="more conversations of the same people (e.g. their chats with others), for training "
                        "only: never validation or test, and none from the held-out period (repeatable)")
    p.add_argument("--extra-data-ratio", type=float, metavar="R",
                   help="use at most R extra messages per message of the chat's own training split, the most "
                        "recent extra conversations first (default 0: all of them)")
    p.add_argument("--auto-extra-data", action=argparse.BooleanOptionalAction, default=None,
                   help="without --extra-data, train also on DATA_DIR/extra (where `convsim import ... --out "
                        "DATA_DIR/extra` put other chats of the same people) when it exists (default on)")
    p.add_argument("--context-size", type=int, metavar="N", help="earlier messages shown before each reply (default 8)")
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
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass to save memory (default: on for models "
                        "of 1B parameters or more)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each decoder layer (default: on CUDA; first steps are slower)")
    p.add_argument("--frozen-dtype", choices=["float32", "bfloat16"],
                   help="dtype of the frozen base weights (default: bfloat16 on CUDA, float32 elsewhere); the "
                        "trained LoRA and speaker rows stay float32")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=None,
                   help="draw batches of similar lengths, so less compute goes to padding (default: off; measured no faster "
                        "on an H200 at 2x the peak memory)")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="padding-free batches: a batch's examples side by side in one row, each attending only to "
                        "itself (same examples per step and losses, no compute on padding; default: off, as it measured slower "
                        "with PyTorch's attention kernels: docs/PERFORMANCE.md)")
    p.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=None,
                   help="end with the weights of the evaluation with the lowest validation loss (kept in "
                        "RUN_DIR/best/, resumable), not the last step's (default: off)")
    p.add_argument("--eval-steps", type=int)
    p.add_argument("--max-val-examples", type=int, help="validation examples used for the loss (default 200)")
    p.add_argument("--save-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")


def config_from_args(args) -> TrainConfig:
    keys = ["model", "targets", "extra_data", "extra_data_ratio", "auto_extra_data", "context_size", "epochs", "batch_size", "grad_accum", "learning_rate", "max_steps", "time_budget",
            "max_seq_length", "lora_r", "lora_alpha", "special_tokens", "include_mlp", "instruct_format", "loss",
            "quantization", "backend", "activation_checkpointing", "compile", "frozen_dtype", "group_by_length", "packing", "keep_best", "eval_steps", "save_steps", "seed", "max_val_examples"]
    flags = {k: getattr(args, k, None) for k in keys}
    saved = Path(args.out) / "config.yaml"
    if getattr(args, "continue_training", False) and saved.exists():
        # resuming: the interrupted run's settings, then --config, then the flags given now
        from convsim.config import load_yaml
        values = {**load_yaml(saved), **(load_yaml(args.config) if args.config else {}),
                  **{k: v for k, v in flags.items() if v is not None}}
        return TrainConfig(**values).validate()
    return resolve(TrainConfig, args.config, flags).validate()


# ----------------------------------------------------------------------------- data

MAX_SPEAKERS = 256


def prepare_data(cfg: TrainConfig, data_dir: str):
    """Conversations → split → examples; every way this can end empty is a clear error."""
    from convsim.chats.examples import build_examples, split_conversations
    from convsim.chats.schema import read_conversations, speakers_of
    convs = read_conversations(data_dir)
    speakers = speakers_of(convs)
    if len(speakers) < 2:
        raise UserError(f"{data_dir}: the chat has only one speaker ({', '.join(speakers) or 'none'}); "
                        "convsim needs at least two people talking")
    if len(speakers) > MAX_SPEAKERS:
        raise UserError(f"{data_dir}: {len(speakers):,} speakers; convsim adds one token per speaker and trains at "
                        f"most {MAX_SPEAKERS} (re-import with `convsim import --max-speakers N`, or keep the most "
                        "active people)")
    targets = speakers if cfg.targets in (["all"], [], None) else cfg.targets
    split = split_conversations(convs, cfg.val_fraction, cfg.test_fraction)
    if cfg.extra_data:
        extra = extra_conversations(cfg.extra_data, split)
        if cfg.extra_data_ratio > 0:
            extra = most_recent(extra, int(cfg.extra_data_ratio * sum(len(c.messages) for c in split["train"])))
        split["train"] = split["train"] + extra
        convs = convs + extra
        speakers = speakers + [s for s in speakers_of(extra) if s not in speakers]
        if len(speakers) > MAX_SPEAKERS:
            raise UserError(f"--extra-data brings the speakers to {len(speakers):,}, more than {MAX_SPEAKERS} "
                            "(merge the people who are not simulated into one name with `convsim import --speaker`)")
    for t in targets:
        if t not in speakers:
            raise UserError(f"unknown target speaker {t!r}; the data has {', '.join(speakers[:20])}")
    ex = {name: build_examples(cs, targets, cfg.context_size, cfg.max_burst) for name, cs in split.items()}
    for t in targets:
        if not any(e.speaker == t for e in ex["train"]):
            raise UserError(f"target {t!r} has no training examples (no reply of theirs follows a message)")
    return convs, speakers, targets, split, ex


def default_extra_data(cfg: TrainConfig, data_dir: Path) -> list[str]:
    """The extra-data dirs a run uses: those given, else DATA_DIR/extra when it holds conversations (and
    `auto_extra_data` is on), as an absolute path so a resumed run finds it from any directory."""
    from convsim.chats.schema import CONVERSATIONS
    if cfg.extra_data or not cfg.auto_extra_data:
        return list(cfg.extra_data)
    extra = data_dir / "extra"
    if (extra / CONVERSATIONS).exists():
        print(f"extra data: using {extra} (other chats of the same people; --no-auto-extra-data leaves it out)",
              file=sys.stderr)
        return [str(extra.resolve())]
    return []


def most_recent(convs: list, max_messages: int) -> list:
    """The most recent conversations (by start time; untimed ones last) holding at most `max_messages`
    messages in all, in their original order."""
    from convsim.chats.examples import start_time
    order = sorted(range(len(convs)), key=lambda i: start_time(convs[i]) or "", reverse=True)
    keep, total = set(), 0
    for i in order:
        n = len(convs[i].messages)
        if total + n > max_messages:
            break
        keep.add(i); total += n
    print(f"extra data: the most recent {len(keep):,} of {len(convs):,} conversations kept ({total:,} messages, "
          f"at most {max_messages:,})", file=sys.stderr)
    return [c for i, c in enumerate(convs) if i in keep]


def extra_summary(cfg: TrainConfig, convs, speakers) -> dict:
    """run.json's record of `--extra-data`: the dirs, how many conversations came from them, and the speakers
    found only there (people the run was not made to simulate)."""
    from convsim.runs import extra_prefixes
    prefixes = extra_prefixes(len(cfg.extra_data))
    extra = [c for c in convs if c.id.startswith(prefixes)]
    main = {m.speaker for c in convs if not c.id.startswith(prefixes) for m in c.messages}
    return {"dirs": list(cfg.extra_data), "conversations": len(extra),
            "messages": sum(len(c.messages) for c in extra), "speakers_only_here": [s for s in speakers if s not in main]}


def extra_conversations(dirs, split) -> list:
    """`--extra-data`: more conversations of the same people (their chats with others), for training only.
    They never enter validation or test, and their messages from the start of the first held-out conversation
    on are left out, so no training message comes from the held-out period. Ids get a prefix
    (`runs.extra_prefixes`: `x0:` for the first dir), which is how a run tells them apart later."""
    from convsim.chats.examples import start_time
    from convsim.chats.schema import read_conversations
    from convsim.runs import extra_prefixes
    held = [start_time(c) for c in split["val"] + split["test"] if start_time(c)]
    main_ids = {c.id for v in split.values() for c in v}
    cutoff = min(held) if held else None
    out = []
    for d, prefix in zip(dirs, extra_prefixes(len(dirs))):
        got = read_conversations(d)
        n_read = sum(len(c.messages) for c in got)
        if cutoff:   # messages from the held-out period on are dropped (whole conversations, or their ends)
            for c in got:
                c.messages = [m for m in c.messages if not (m.time and m.time >= cutoff)]
        kept = [c for c in got if c.messages]
        for c in kept:
            c.id = prefix + c.id
            if c.id in main_ids:
                raise UserError(f"{d}: conversation id {c.id!r} clashes with one of the main data's ids")
        n_msgs = sum(len(c.messages) for c in kept)
        print(f"extra data {d}: {len(kept):,} conversations ({n_msgs:,} messages) added to training"
              + (f"; {n_read - n_msgs:,} messages from the held-out period on ({cutoff}) left out"
                 if n_read > n_msgs else ""), file=sys.stderr)
        out.extend(kept)
    return out


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
    if cfg.backend == "unsloth":    # Unsloth loads the base and wraps it in LoRA (convsim/unsloth_backend.py)
        from convsim.unsloth_backend import load_unsloth
        model, tok, ids = load_unsloth(cfg, speakers, device, spec)
        return model, tok, spec, ids
    import torch
    if cfg.quantization:            # the base is loaded once, quantized (not loaded whole and then again)
        model, tok = _load_quantized(cfg, device)
    else:
        dtype = getattr(torch, frozen_dtype(cfg, device))   # frozen weights; what trains is float32 (below)
        model, tok = load_base(cfg.model, device=device, dtype=dtype)
    ids = {}
    if cfg.special_tokens:
        ids = add_speaker_tokens(model, tok, speakers, cfg.speaker_references, spec.reference_words, seed=cfg.seed)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or cfg.lora_r, lora_dropout=cfg.lora_dropout,
                      use_rslora=cfg.use_rslora, target_modules=lora_targets(cfg, spec),
                      trainable_token_indices=speaker_rows(ids, head_is_tied(model)), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable_in_float32(model)
    from convsim.fastpeft import patch_trainable_tokens, show_tied_weights
    patch_trainable_tokens(model)
    if sharded_training():
        show_tied_weights(model)      # else FSDP2 shards a tied head's weight twice (issue #13)
    return model, tok, spec, ids


def lora_targets(cfg: TrainConfig, spec) -> list[str]:
    """The projections LoRA adapts: the model row's attention ones, and its MLP ones with --include-mlp."""
    return list(spec.attn_targets) + (list(spec.mlp_targets) if cfg.include_mlp else [])


def head_is_tied(model) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is None or out.weight.data_ptr() == emb.weight.data_ptr()


def speaker_rows(ids: dict, tied: bool) -> dict | None:
    """PEFT's `trainable_token_indices` for the speaker tokens: their input-embedding rows, and their
    output-head rows too when the head is not tied to the embedding. None without speaker tokens."""
    if not ids:
        return None
    rows = sorted(ids.values())
    return {"embed_tokens": rows} if tied else {"embed_tokens": rows, "lm_head": list(rows)}


def sharded_training() -> bool:
    """Launched by `accelerate launch` with an FSDP config (accelerate says so in the environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def gathered_trained_state(model):
    """Under FSDP2 the trained weights are sharded across the processes and `save_pretrained` on rank 0
    alone fails (it reads storage the shards do not have). This gathers the trainable weights whole onto
    rank 0's CPU (the frozen base stays sharded): a collective, so every process calls it, before rank 0
    saves with `save_pretrained(..., state_dict=this)` (the adapter's format is unchanged). Returns None
    when the model is not sharded (save as usual), and an empty dict on the other ranks."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))


def frozen_dtype(cfg: TrainConfig, device: str) -> str:
    """The frozen base weights' dtype: as asked, else bfloat16 on a CUDA card that has it and float32
    elsewhere. bf16 autocast casts every matmul's weight to bf16 anyway, so holding the frozen weights in
    bf16 gives the matmuls the same inputs without re-casting 270M weights each step (and halves their
    memory); norms, embeddings and the residual stream then run in bf16 as in bf16 inference. Under FSDP
    float32, so each sharded unit holds one dtype."""
    if cfg.frozen_dtype:
        return cfg.frozen_dtype
    import torch
    if device.startswith("cuda") and not sharded_training() and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def trainable_in_float32(model) -> int:
    """Every trainable parameter (LoRA matrices, speaker-token rows) in float32, whatever the frozen
    weights' dtype: AdamW's small updates vanish in bf16 rounding. Returns how many were cast."""
    import torch
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


CHECKPOINTING_FROM = 1e9      # parameters: below this, activations are small and recomputing them only costs time


def wants_checkpointing(cfg: TrainConfig, model) -> bool:
    """Activation checkpointing as asked, else only for models of 1B parameters or more: on Gemma 3 270M
    with chat-sized batches it costs a third more compute to save memory nobody needs."""
    if cfg.activation_checkpointing is not None:
        return cfg.activation_checkpointing
    return sum(p.numel() for p in model.parameters()) >= CHECKPOINTING_FROM


def wants_compile(cfg: TrainConfig, device: str) -> bool:
    """torch.compile as asked, else on CUDA (where a small model is bound by kernel launches, which
    compiled, fused layers cut), not under FSDP, and never on CPU (compiling costs more there than it
    saves). CONVSIM_COMPILE=0 turns the default off."""
    if cfg.compile is not None:
        return cfg.compile and _can_compile()
    if cfg.backend == "unsloth":        # Unsloth compiles its own kernels; not ours on top unless asked
        return False
    return (device.startswith("cuda") and not sharded_training() and _can_compile()   # FSDP wraps layers itself
            and os.environ.get("CONVSIM_COMPILE", "1") != "0")


def wants_grouping(cfg: TrainConfig, device: str) -> bool:
    """Batches of similar lengths only when asked (--group-by-length). Random batches of chat examples are
    about half padding (the chitchat pair: 48 % real tokens at batch 32), but on an H200 grouping did not pay:
    39.2k tokens/s grouped vs 42.0k random, at twice the peak memory (the longest group sets it), and the
    grouped fine-tune's validation loss was higher (bench/results/train-speed-gpu-random-h200.json, eval-chitchat.json).
    The grouping is seeded (resume replays it)."""
    return bool(cfg.group_by_length)


def wants_packing(cfg: TrainConfig) -> bool:
    """Padding-free batches (TRL's `padding_free`) only when asked (--packing). A batch keeps its examples,
    so the optimisation is the same as with padded batches; they are laid side by side in one row with
    positions restarting at each example, and transformers builds a block-diagonal causal mask from those
    positions (no attention across examples: tests/test_packing.py). No compute goes to padding, but the
    attention kernels then see one long row with a dense mask, which cost more than the padding saved:
    0.35x the default's tokens/s on an H100, 0.51x on the 2-core CPU (bench/results/train-speed-gpu.json,
    packing-cpu.json)."""
    return bool(cfg.packing)


def sampling_args(grouped: bool) -> dict:
    """The Trainer argument for length-grouped sampling, in this transformers version's spelling."""
    from trl import SFTConfig
    fields = getattr(SFTConfig, "__dataclass_fields__", {})
    if "train_sampling_strategy" in fields:
        return {"train_sampling_strategy": "group_by_length" if grouped else "random"}
    return {"group_by_length": grouped} if "group_by_length" in fields else {}


def _can_compile() -> bool:
    import torch
    return hasattr(torch, "compile") and sys.platform != "win32"


def decoder_layers(model):
    """The decoder's list of layers of a (PEFT-wrapped) causal LM, or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix, None)
    layers = getattr(backbone, "layers", None)
    return layers if layers is not None and len(layers) else None


def compile_layers(model, probe: bool = True) -> int:
    """Compile each decoder layer in place (regional compilation). The layers share their code, so one
    graph serves them all; shapes are dynamic from the start, so batches of new lengths do not recompile.
    The module tree and the state dict stay as they were (adapters save as usual). With `probe`, one
    forward and backward pass on a fixed dummy batch compiles the graph now; if compiling fails, the layers
    go back to eager with a warning (training must not die of an optimisation). Returns the count compiled."""
    layers = decoder_layers(model)
    if layers is None:
        return 0
    for layer in layers:
        layer.compile(dynamic=True)
    if not probe:
        return len(layers)
    print(f"compiling the {len(layers)} decoder layers (about a minute the first time; --no-compile skips it)",
          file=sys.stderr, flush=True)
    try:
        _probe(model)
    except Exception as e:                      # noqa: BLE001 - any compiler failure means: train eagerly
        for layer in layers:
            layer._compiled_call_impl = None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"warning: torch.compile of the decoder layers failed ({type(e).__name__}: {first}); "
              "training without it (--no-compile skips the attempt)", file=sys.stderr)
        return 0
    return len(layers)


def _probe(model) -> None:
    """One training-mode forward + backward of a fixed 2 x 16 batch (no RNG drawn, gradients cleared)."""
    import contextlib
    import torch
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    x = (torch.arange(32, device=device).view(2, 16) % 64) + 10
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    cast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    was = model.training
    model.train()
    try:
        with cast:
            loss = reply_loss(model, batch)
        loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)


def eager():
    """Context: run compiled modules eagerly (generation inside training, whose shapes change each step)."""
    import contextlib
    import torch
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance else contextlib.nullcontext()


def _load_quantized(cfg, device):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--quantization needs the bitsandbytes package (pip install bitsandbytes)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from convsim.models import resolve as resolve_model, weights_location, with_pad_token
    spec = resolve_model(cfg.model)
    where = weights_location(spec)
    q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
         if cfg.quantization == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
    model = AutoModelForCausalLM.from_pretrained(where, quantization_config=q, device_map={"": device})
    return model, with_pad_token(AutoTokenizer.from_pretrained(where))


# ----------------------------------------------------------------------------- loss

def _reply_loss_sum(base, input_ids, attention_mask, labels, position_ids=None):
    """Summed cross-entropy over label positions, the head applied only there. With padding-free batches
    (`position_ids` restarting at each packed example, no attention mask) each example attends only to
    itself, and an example's first position never carries a label (the collator masks it), so no loss
    crosses an example boundary."""
    import torch
    import torch.nn.functional as F
    backbone = getattr(base, base.base_model_prefix)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state[:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    h, t = hidden[mask], target[mask]
    cap = getattr(base.config, "final_logit_softcapping", None)
    fused = _liger_loss(cap) if h.is_cuda else None
    if fused is not None:       # fused head + cross-entropy in chunks: the logits never exist in memory
        from convsim.fastpeft import head_weight
        w, bias = head_weight(base.get_output_embeddings())
        dt = torch.bfloat16 if torch.is_autocast_enabled("cuda") else h.dtype
        return fused(w.to(dt), h.to(dt), t, None if bias is None else bias.to(dt)), mask.sum()
    logits = base.get_output_embeddings()(h).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, t, reduction="sum"), mask.sum()


_LIGER: dict = {}


def _liger_loss(cap):
    """Liger's fused linear cross-entropy (sum over tokens) when asked for with CONVSIM_LIGER=1 and
    liger-kernel is installed; else None (the plain head + cross-entropy over the reply positions only).
    Off by default because it was slower here: with the speaker rows trainable it differentiates the whole
    262k x 640 head weight every step; measured on an H200, compiled layers without it 47.6k tokens/s, with
    it 13.7k (bench/results/train-speed-gpu-compiled-only.json). Worth trying for models whose head is frozen."""
    if os.environ.get("CONVSIM_LIGER", "0") != "1":
        return None
    if cap not in _LIGER:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            _LIGER[cap] = LigerFusedLinearCrossEntropyLoss(reduction="sum", softcap=cap)
        except Exception:
            _LIGER[cap] = None
    return _LIGER[cap]


def install_reply_loss(model):
    """Route training forwards (those given `labels` and `reply_loss_sum=True`) of the wrapped causal LM to
    `_reply_loss_sum`. The call still enters through the outermost module (PEFT, and DDP/FSDP under
    accelerate), so distributed gradient hooks fire as usual; generation and plain calls are untouched."""
    import types
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "_convsim_reply_loss", False):
        return model
    plain = base.forward

    def forward(self, input_ids=None, attention_mask=None, labels=None, reply_loss_sum=False, **kw):
        if not reply_loss_sum or labels is None:
            return plain(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw)
        total, count = _reply_loss_sum(self, input_ids, attention_mask, labels, kw.get("position_ids"))
        return reply_loss_output(total, count)

    base.forward = types.MethodType(forward, base)
    base._convsim_reply_loss = True
    return model


_OUTPUT: list = []


def reply_loss_output(loss, count):
    """The training forward's output: summed loss and the number of tokens it covers, both as declared
    fields (accelerate's mixed-precision wrapper rebuilds outputs from their fields, dropping anything else)."""
    if not _OUTPUT:
        from dataclasses import dataclass
        import torch
        from transformers.utils import ModelOutput

        @dataclass
        class ReplyLossOutput(ModelOutput):
            loss: torch.Tensor | None = None
            count: torch.Tensor | None = None
        _OUTPUT.append(ReplyLossOutput)
    return _OUTPUT[0](loss=loss, count=count)


def reply_loss(model, inputs, num_items_in_batch=None):
    """Cross-entropy with the output head applied only where labels carry loss (mean over those tokens,
    or over `num_items_in_batch` when the trainer counts them across accumulation steps/devices)."""
    import torch
    install_reply_loss(_unwrap(model))
    extra = {"position_ids": inputs["position_ids"]} if "position_ids" in inputs else {}   # padding-free
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                labels=inputs["labels"], reply_loss_sum=True, **extra)
    total = out.loss
    denom = num_items_in_batch if num_items_in_batch is not None else out.count.clamp(min=1)
    if torch.is_tensor(denom):
        denom = denom.to(total.device)
    return total / denom


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "get_base_model"):
        model = model.module          # DDP / FSDP wrappers
    return model


def make_trainer_class():
    from trl import SFTTrainer

    class ConvsimTrainer(AtomicCheckpoints, SFTTrainer):
        """SFTTrainer whose loss computes the head at reply positions only."""

        _tokens = 0          # real (non-pad) tokens trained on since the last log, kept on the device
        _since = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                m = inputs.get("attention_mask")
                if m is None:       # padding-free: one row, padded at its end only up to a multiple of 8
                    m = inputs["input_ids"] != self.processing_class.pad_token_id
                self._tokens = self._tokens + m.sum()
            loss = reply_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, {"loss": loss}) if return_outputs else loss

        def _get_eval_sampler(self, eval_dataset):
            """Validation batches in order, also when training batches are grouped by length: the same
            validation loss for the same weights, whatever the training sampler."""
            if self.args.world_size <= 1 and eval_dataset is not None:
                from torch.utils.data import SequentialSampler
                return SequentialSampler(eval_dataset)
            return super()._get_eval_sampler(eval_dataset)

        def log(self, logs, *args, **kwargs):
            """Adds `tokens_per_s`: real tokens trained per second (this process) since the last log."""
            import torch
            now = time.perf_counter()
            if "loss" in logs and self._since is not None and torch.is_tensor(self._tokens):
                logs["tokens_per_s"] = round(float(self._tokens) / (now - self._since), 1)
            if "loss" in logs or self._since is None:
                self._tokens, self._since = 0, now
            return super().log(logs, *args, **kwargs)

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
            if not cfg.samples or not val_examples or not state.is_world_process_zero or sharded_training():
                return          # under FSDP a forward on rank 0 alone would wait forever for the other shards
            from convsim import fastgen
            from convsim.generate import SampleConfig, reply
            was_training = model.training
            model.eval()
            rows = []
            for e in val_examples[:cfg.samples]:
                with fastgen.disabled(), eager():     # weights and shapes change: no compiled graphs here
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

    class Profile(TrainerCallback):
        """CONVSIM_PROFILE=DIR: torch.profiler over steps 11-15 (after compile and warm-up); writes the
        busiest operators by device and by host time to DIR/profile.txt and a trace to DIR/trace.json."""

        def __init__(self, where, first=10, count=5):
            self.where, self.first, self.count, self.prof = Path(where), first, count, None

        def on_step_begin(self, args, state, control, **kw):
            import torch
            if state.global_step == self.first and self.prof is None and state.is_world_process_zero:
                acts = [torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            import torch
            if self.prof is None or state.global_step != self.first + self.count:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = (time.perf_counter() - self.t0) / self.count
            self.prof.__exit__(None, None, None)
            self.where.mkdir(parents=True, exist_ok=True)
            ka = self.prof.key_averages()
            dev = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            text = (f"steps {self.first + 1}-{self.first + self.count}: {1000 * wall:.1f} ms per step (wall)\n\n"
                    f"by {dev}\n{ka.table(sort_by=dev, row_limit=40)}\n\n"
                    f"by cpu_time_total\n{ka.table(sort_by='cpu_time_total', row_limit=40)}\n")
            (self.where / "profile.txt").write_text(text, encoding="utf-8")
            self.prof.export_chrome_trace(str(self.where / "trace.json"))
            self.prof = None

        def on_train_end(self, args, state, control, **kw):
            if state.is_world_process_zero and not (self.where / "profile.txt").exists():
                print(f"warning: CONVSIM_PROFILE wrote nothing: training ended at step {state.global_step}, before "
                      f"the profiled steps {self.first + 1}-{self.first + self.count}", file=sys.stderr)

    class KeepBest(TrainerCallback):
        """--keep-best: after each evaluation with a lower validation loss than any before, the trained
        tensors (LoRA and speaker rows, a few MB) are written to RUN_DIR/best/ whole or not at all."""

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kw):
            loss = (metrics or {}).get("eval_loss")
            if loss is None or not state.is_world_process_zero:
                return
            best = best_record(run_dir)
            if best is None or loss < best["eval_loss"]:
                save_best(run_dir, model, state.global_step, loss)

    profile = [Profile(os.environ["CONVSIM_PROFILE"])] if os.environ.get("CONVSIM_PROFILE") else []
    keep = [KeepBest()] if cfg.keep_best else []
    return [Budget(cfg.time_budget), Metrics(), Samples(), *keep, *profile]


BEST = "best"


def trained_tensors(model) -> dict:
    """The tensors that training changes, by parameter name, copied to the CPU."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def save_best(run_dir: Path, model, step: int, eval_loss: float) -> None:
    import torch
    from convsim.fsutil import atomic_dir
    with atomic_dir(run_dir / BEST) as tmp:
        torch.save(trained_tensors(model), tmp / "trained.pt")
        (tmp / "best.json").write_text(json.dumps({"step": step, "eval_loss": eval_loss}))


def best_record(run_dir: Path) -> dict | None:
    """{"step", "eval_loss"} of the kept best weights, or None."""
    try:
        return json.loads((run_dir / BEST / "best.json").read_text())
    except (OSError, ValueError):
        return None


def restore_best(run_dir: Path, model) -> dict | None:
    """Load the kept best tensors into `model` (by parameter name); their record, or None if none kept."""
    import torch
    rec = best_record(run_dir)
    if rec is None:
        return None
    saved = torch.load(run_dir / BEST / "trained.pt", map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    if set(saved) != {n for n, p in params.items() if p.requires_grad}:
        raise RuntimeError(f"{run_dir / BEST} does not match this model's trained tensors")
    with torch.no_grad():
        for n, t in saved.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    return rec


# ----------------------------------------------------------------------------- checkpoints
# transformers writes checkpoint-N in place, file by file, and `get_last_checkpoint` takes the highest N
# whether or not it is whole; a run killed mid-write would resume from a broken checkpoint. Here each
# checkpoint is written into checkpoints/.staging/ and renamed into place when complete, old ones are
# renamed away before they are deleted, and resuming takes the newest complete one.

STAGING = ".staging"
LOSS_FILE = "convsim_loss.json"      # summed step losses so far: the whole run's train loss after a resume


def checkpoint_step(path: Path) -> int | None:
    name = path.name
    return int(name[len("checkpoint-"):]) if name.startswith("checkpoint-") and name[11:].isdigit() else None


def complete_checkpoint(path: Path) -> bool:
    """Everything resuming reads is there (ours are whole by the rename; this also rejects a checkpoint
    half-written by an older convsim or copied in part)."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # FSDP's sharded checkpoints hold the model and optimizer as folders of shards (pytorch_model_fsdp_0/,
    # optimizer_0/) or as one file each (pytorch_model_fsdp.bin, optimizer.bin)
    weights = ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin", "pytorch_model.bin",
               "pytorch_model_fsdp_0", "pytorch_model_fsdp.bin")
    optimizer = ("optimizer.pt", "optimizer_0", "optimizer.bin")
    return (state.get("global_step") == checkpoint_step(path) and (path / "scheduler.pt").is_file()
            and any((path / f).exists() for f in optimizer)
            and any(path.glob("rng_state*.pth")) and any((path / f).exists() for f in weights))


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint-N in `ckpt_dir`, or None."""
    if not ckpt_dir.is_dir():
        return None
    found = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
                   key=checkpoint_step, reverse=True)
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
        done = sorted((p for p in final.parent.iterdir() if p.is_dir() and checkpoint_step(p) is not None
                       and complete_checkpoint(p)), key=checkpoint_step)
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
    whole resized embedding into every trainer checkpoint (1.36 GB for Gemma 3's 262k rows, against 15 MB
    of adapter); the speaker rows are in the trainable-token delta, and a resumed run rebuilds the rest."""
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
    loss_before = 0.0        # summed step losses up to the checkpoint this run resumed from
    step_before = 0

    def _get_output_dir(self, trial):
        return self._staging or super()._get_output_dir(trial)

    def _loss_sum(self) -> float | None:
        if self.loss_before is None:
            return None
        pending = getattr(self, "_tr_loss", 0.0)      # transformers' running sums since this train() began
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
                (staged / LOSS_FILE).write_text(json.dumps({"global_step": self.state.global_step,
                                                            "loss_sum": self._loss_sum()}), encoding="utf-8")
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()        # every process has written its RNG state
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
            self.loss_before = None          # a checkpoint from before this file existed

    def run_loss(self, result) -> float:
        """Mean step loss over the whole run, including the steps before a resume."""
        steps = self.state.global_step
        if not self.step_before or self.loss_before is None or not steps:
            return result.training_loss
        since = getattr(self, "_total_loss_scalar", None)   # summed step losses since the resume
        if since is None:
            since = result.training_loss * (steps - self.step_before)
        # (not training_loss x steps since: transformers 5.17 divides that sum by global_step, 5.24 by the steps run)
        return (self.loss_before + since) / steps


# ----------------------------------------------------------------------------- stage

def finish_distributed() -> None:
    """Under torchrun/accelerate: every rank meets here (rank 0 after writing the run) and the process
    group is destroyed before exit. A rank that simply exited while another still used the group could be
    aborted by the communication library ('terminate called without an active exception')."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def write_meta(run_dir: Path, meta: dict) -> None:
    from convsim.fsutil import write_json
    write_json(run_dir / "run.json", meta)


def run(args) -> int:
    with fused_attention_kernels():
        return _run(args)


@contextlib.contextmanager
def fused_attention_kernels():
    """Context: PyTorch's SDPA without its cuDNN backend (restored after). On an H200 the cuDNN attention
    kernels cost 3.4 ms of host time per call (forward) and 2.9 ms (backward) in a profile of `convsim train`
    (CONVSIM_PROFILE; bench/results/train-profile-gpu.txt) - 110 ms of a 278 ms step for 25 ms of GPU work,
    with masked, varying-length chat batches. The memory-efficient and flash kernels take microseconds to
    launch. Must hold while the layers compile: the compiled graph fixes the backend it calls."""
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


def _run(args) -> int:
    import torch
    from datasets import Dataset
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
    cfg.extra_data = default_extra_data(cfg, data_dir)
    run_dir = Path(args.out)
    ckpt_dir = run_dir / "checkpoints"
    resume = None
    if args.continue_training:
        resume = last_checkpoint(ckpt_dir)        # the newest complete one; half-written ones are skipped
        if int(os.environ.get("RANK", "0")) == 0:
            clean_checkpoints(ckpt_dir)
            if resume is not None:
                rewind_logs(run_dir, checkpoint_step(resume))
        if resume is None:
            print(f"no complete checkpoint in {ckpt_dir}; starting from scratch", file=sys.stderr)
    elif int(os.environ.get("RANK", "0")) == 0 and ((run_dir / "run.json").exists() or ckpt_dir.exists()):
        # rank 0 alone decides: the other ranks would otherwise see the run rank 0 has just started
        raise UserError(f"{run_dir} already holds a run; use --continue-training to resume or another --out")

    if cfg.keep_best and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--keep-best runs in one process only for now (not under accelerate launch / torchrun)")
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
    if cfg.keep_best and not val_rows:
        print("warning: --keep-best needs validation examples and there are none; the run ends with its last "
              "weights", file=sys.stderr)
    if trunc > 0.05 * len(train_rows):
        print(f"warning: --max-seq-length {cfg.max_seq_length} truncated {trunc} of {len(train_rows)} training "
              f"examples ({100 * trunc / len(train_rows):.0f}%)", file=sys.stderr)

    main = int(os.environ.get("RANK", "0")) == 0       # under accelerate/torchrun only rank 0 writes files
    if main:
        private_dir(run_dir)
        private_dir(run_dir / "checkpoints"); private_dir(run_dir / "logs")   # owner-only even outside cli.main
        write_conversations(private_dir(run_dir / "data") / "conversations.jsonl", convs)
        write_text(run_dir / "config.yaml", to_yaml(cfg))
    meta = {"model": cfg.model, "prompt_style": style, "special_tokens": cfg.special_tokens,
            "speakers": speakers, "targets": targets, "speaker_token_ids": ids, "loss": cfg.loss,
            "context_size": cfg.context_size, "max_burst": cfg.max_burst, "seed": cfg.seed,
            "split": {k: [c.id for c in v] for k, v in split.items()},
            "examples": {k: len(v) for k, v in ex.items()}, "status": "training",
            "resumed_from": resume.name if resume else None,
            "extra_data": extra_summary(cfg, convs, speakers)}
    if main:
        write_meta(run_dir, meta)
        tok.save_pretrained(run_dir / "tokenizer")

    cuda = device.startswith("cuda")
    checkpointing = wants_checkpointing(cfg, model)
    compiled = compile_layers(model) if wants_compile(cfg, device) else 0
    grouped = wants_grouping(cfg, device)
    packed = wants_packing(cfg)
    meta.update(activation_checkpointing=checkpointing, compiled_layers=compiled, group_by_length=grouped, packing=packed,
                frozen_dtype=str(next(p for p in model.parameters() if not p.requires_grad).dtype).replace("torch.", ""))
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
        disable_tqdm=False, use_cpu=not cuda, save_only_model=False, ddp_find_unused_parameters=False,
        dataset_kwargs={"skip_prepare_dataset": False}, gradient_checkpointing=checkpointing,
        pad_to_multiple_of=8 if cuda else None,      # aligned widths: the attention kernels' mask needs them
        padding_free=packed,
        **sampling_args(grouped),
    )
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "logs")
    Trainer = make_trainer_class()
    trainer = Trainer(model=model, args=sft, train_dataset=Dataset.from_list(train_rows),
                      eval_dataset=Dataset.from_list(val_rows) if val_rows else None, processing_class=tok,
                      callbacks=make_callbacks(cfg, run_dir, tok, fmt, val_examples))
    trainer.resume_from(resume)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_loss = trainer.run_loss(result)       # over the whole run, also when it resumed
    seconds = time.time() - t0
    kept = None
    if cfg.keep_best and val_rows:
        final_eval = trainer.evaluate()      # the last step is a candidate too
        kept = restore_best(run_dir, model) if main else None
        if kept is not None and kept["step"] != trainer.state.global_step:
            for cb in [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "KeepBest"]:
                trainer.remove_callback(cb)  # this evaluation is of the kept weights, not a new candidate
            final_eval = trainer.evaluate()  # now of the restored weights (equal to kept["eval_loss"])
    else:
        final_eval = trainer.evaluate() if val_rows else {}
    gathered = gathered_trained_state(model)      # FSDP: every process takes part; None otherwise
    if not main:
        finish_distributed()        # wait for rank 0 to write the run, then leave the group together
        return 0
    # the adapter is the product: write it whole or not at all
    with atomic_dir(run_dir / "adapter") as tmp:
        # speaker rows live in the trainable-token delta; under FSDP from the gathered weights
        model.save_pretrained(tmp, state_dict=gathered, save_embedding_layers=False)
    rates = sorted(r["tokens_per_s"] for r in trainer.state.log_history if "tokens_per_s" in r)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens_per_s = round(rates[len(rates) // 2] * world, 1) if rates else None   # median interval, all processes
    meta.update(status="done", adapter_hash=dir_hash(run_dir / "adapter"), train_seconds=round(seconds, 1),
                tokens_per_s=tokens_per_s, world_size=world,
                global_step=trainer.state.global_step, train_loss=train_loss,
                eval_loss=final_eval.get("eval_loss"), device=device,
                kept_best=kept,
                stop_reason=getattr(trainer.state, "stop_reason", "done"))
    write_meta(run_dir, meta)
    finish_distributed()
    summary = {"run_dir": str(run_dir), "steps": trainer.state.global_step, "train_loss": train_loss,
               "eval_loss": final_eval.get("eval_loss"), "seconds": round(seconds, 1),
               "tokens_per_s": tokens_per_s, "world_size": world,
               "examples": meta["examples"], "speakers": speakers, "targets": targets,
               "adapter_mb": round(sum(f.stat().st_size for f in (run_dir / "adapter").rglob("*") if f.is_file()) / 1e6, 2)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"trained {summary['steps']} steps in {seconds:.0f}s: train loss {train_loss:.3f}"
              + (f", val loss {summary['eval_loss']:.3f}" if summary["eval_loss"] is not None else "")
              + f"; adapter {summary['adapter_mb']} MB in {run_dir}/adapter")
        print(f"next: convsim chat {run_dir} --as {targets[0]!r}")
    return 0
