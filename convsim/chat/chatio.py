"""Shared pieces of the conversation commands (reply, chat, converse): sampling flags, the copy guard (on
unless `--allow-copy`) and the optional `--steer` hook. Reading a history file is `convsim.data.transcript`.
"""

from __future__ import annotations

import contextlib
from convsim.inference.generate import SampleConfig


def add_sampling_arguments(p) -> None:
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy and deterministic (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--max-context-tokens", type=int, default=1024, help="history budget; oldest messages drop first")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steer", metavar="VECTOR[:STRENGTH]", help="apply a steering vector (convsim steer build)")
    p.add_argument(
        "--allow-copy",
        action="store_true",
        help="let replies repeat 8-token spans of the training messages word for word (default: never)",
    )


def sample_config(args) -> SampleConfig:
    return SampleConfig(
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        max_context_tokens=args.max_context_tokens,
        seed=args.seed,
    )


def copy_guard(run_, tok, args):
    """The run's `nocopy.CopyIndex`, or None with `--allow-copy`."""
    if getattr(args, "allow_copy", False):
        return None
    from convsim.inference.nocopy import for_run

    return for_run(run_, tok)


def steering(model, arg: str | None):
    """Context manager applying `--steer VECTOR[:STRENGTH]`, or nothing."""
    if not arg:
        return contextlib.nullcontext()
    from convsim.steering.apply import apply_steer_arg

    return apply_steer_arg(model, arg)
