"""`convsim train`'s flags, and the TrainConfig they resolve to (defaults, then `--config` YAML, then the
flags given; a resumed run starts from its saved config.yaml). The flags' names are TrainConfig's fields.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from convsim.config import TrainConfig, resolve


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", help="directory written by `convsim import`")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--config", help="YAML file with TrainConfig fields (flags override it)")
    p.add_argument("--model", help="model table row, hub id or local path (default gemma-3-270m)")
    p.add_argument(
        "--target",
        action="append",
        dest="targets",
        metavar="NAME",
        help="train on this person's replies (repeatable); default: everyone in DATA_DIR (not the people "
        "found only in --extra-data)",
    )
    p.add_argument(
        "--extra-data",
        action="append",
        metavar="DATA_DIR",
        help="more conversations of the same people (e.g. their chats with others), for training "
        "only: never validation or test, and none from the held-out period (repeatable)",
    )
    p.add_argument(
        "--extra-data-ratio",
        type=float,
        metavar="R",
        help="use at most R extra messages per message of the chat's own training split, the most "
        "recent extra conversations first (default 0: all of them)",
    )
    p.add_argument(
        "--pair-repeat",
        type=int,
        metavar="N",
        help="with extra data: show the chat's own training examples N times per epoch and the extra "
        "ones once, so the people's chat with each other is not drowned out (default 1)",
    )
    p.add_argument(
        "--auto-extra-data",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="without --extra-data, train also on DATA_DIR/extra (where `convsim import ... --out "
        "DATA_DIR/extra` put other chats of the same people) when it exists (default on)",
    )
    p.add_argument(
        "--context-size", type=int, metavar="N", help="earlier messages shown before each reply (default 16)"
    )
    p.add_argument("--epochs", type=float, help="passes over the training examples (default 2)")
    p.add_argument("--batch-size", type=int, help="examples per optimizer step (default 32)")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument(
        "--recipe",
        choices=["auto", "cpu", "gpu"],
        help="auto (default): on a machine without a GPU the CPU recipe (8 messages of context, batches of 8, "
        "the chat's own replies, an amount of work sized by a speed probe: --cpu-minutes), else the GPU recipe; "
        "flags given always win over either",
    )
    p.add_argument(
        "--cpu-minutes",
        type=float,
        metavar="M",
        help="the CPU recipe's work: what M minutes of this machine's threads train, measured by a short probe "
        "in CPU time, so a busy machine takes longer rather than training less (default 50)",
    )
    p.add_argument("--max-steps", type=int)
    p.add_argument(
        "--train-tokens",
        type=int,
        metavar="N",
        help="train on about N real tokens (prompt and reply), then stop: an amount of work that is the same "
        "on a busy or an idle machine; the steps are N / (batch size x mean tokens per training example)",
    )
    p.add_argument("--time-budget", type=float, metavar="MINUTES", help="stop cleanly and save after this long")
    p.add_argument("--max-seq-length", type=int)
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-alpha", type=int)
    p.add_argument(
        "--special-tokens",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one added token per speaker (default on)",
    )
    p.add_argument(
        "--include-mlp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="LoRA on the MLP projections too (default on)",
    )
    p.add_argument(
        "--lora-layers",
        type=int,
        metavar="K",
        help="LoRA on the top K decoder layers only (default: all layers); fewer trained layers train "
        "faster per token but may fit less well",
    )
    p.add_argument(
        "--cache-frozen-prefix",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --lora-layers K: compute the hidden states entering the top K layers once per training "
        "example (kept in memory: hidden size x 4 bytes per training token in float32) and train only the top layers "
        "from them after the first epoch; the speaker-token rows then stay at their initial values (they sit "
        "below every layer) (default: off)",
    )
    p.add_argument(
        "--instruct-format",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="chat-template rendering (default: the model's prompt style)",
    )
    p.add_argument("--loss", choices=["reply", "whole"], help="loss on the reply only (default) or all text")
    p.add_argument("--continue-training", action="store_true", help="resume from the latest checkpoint")
    p.add_argument("--quantization", choices=["4bit", "8bit"], help="QLoRA via bitsandbytes (CUDA only)")
    p.add_argument("--backend", choices=["peft", "unsloth"])
    p.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute activations in the backward pass to save memory (default: on for models "
        "of 1B parameters or more)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile each decoder layer (default: on CUDA; first steps are slower)",
    )
    p.add_argument(
        "--frozen-dtype",
        choices=["float32", "bfloat16"],
        help="dtype of the frozen base weights, and on a CPU of its autocast (default: bfloat16 on CUDA and on "
        "CPUs with native bf16: AVX512-BF16, AMX, Arm BF16; float32 elsewhere); the trained LoRA and speaker rows "
        "stay float32",
    )
    p.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw batches of similar lengths, so less compute goes to padding (default: off; measured no faster "
        "at twice the peak memory: docs/PERFORMANCE.md)",
    )
    p.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="padding-free batches: a batch's examples side by side in one row, each attending only to "
        "itself (same examples per step and losses, no compute on padding; default: off, as it measured slower "
        "with PyTorch's attention kernels: docs/PERFORMANCE.md)",
    )
    p.add_argument(
        "--keep-best",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="end with the weights of the evaluation with the lowest validation loss (kept in "
        "RUN_DIR/best/, resumable), not the last step's; under torchrun/accelerate (DDP, FSDP) rank 0 keeps the "
        "gathered weights and every process ends with them (default: off)",
    )
    p.add_argument("--eval-steps", type=int)
    p.add_argument("--max-val-examples", type=int, help="validation examples used for the loss (default 200)")
    p.add_argument("--save-steps", type=int)
    p.add_argument("--logging-steps", type=int, help="a progress line with the loss every N steps (default 10)")
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")


def given_fields(args) -> set[str]:
    """The TrainConfig fields a flag, the --config YAML or (resuming) the saved config.yaml set: the recipe
    fills in only the others."""
    from convsim.config import load_yaml

    given = {f.name for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if args.config:
        given |= set(load_yaml(args.config))
    saved = Path(args.out) / "config.yaml"
    if getattr(args, "continue_training", False) and saved.exists():
        given |= set(load_yaml(saved))
    return given


def config_from_args(args) -> TrainConfig:
    # every TrainConfig field that has a flag; a flag not given is None and leaves the YAML's or default value
    flags = {f.name: getattr(args, f.name, None) for f in fields(TrainConfig)}
    saved = Path(args.out) / "config.yaml"
    if getattr(args, "continue_training", False) and saved.exists():
        # resuming: the interrupted run's settings, then --config, then the flags given now
        from convsim.config import load_yaml

        values = {
            **load_yaml(saved),
            **(load_yaml(args.config) if args.config else {}),
            **{k: v for k, v in flags.items() if v is not None},
        }
        return TrainConfig(**values).validate()
    return resolve(TrainConfig, args.config, flags).validate()
