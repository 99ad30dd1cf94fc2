"""Shared fixtures: small deterministic chat data, and trained tiny runs (built once per session)."""

from __future__ import annotations

import random
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from convsim.data.schema import Conversation, Message, write_conversations

ANA = [
    "hey how are you",
    "lol yes",
    "i love pizza so much",
    "are you coming tonight?",
    "haha ok",
    "omg that is amazing",
    "i feel happy today",
    "see you soon!!",
]
BEN = [
    "Not bad. Working late again.",
    "I think so, yes.",
    "That sounds good to me.",
    "Maybe tomorrow then.",
    "I am reading a book about history.",
    "Sure, I will bring the snacks.",
    "Fine, thank you.",
]


def synthetic_conversations(n_convs=12, per_conv=16, seed=0, speakers=("Ana", "Ben")):
    rng = random.Random(seed)
    t = datetime(2024, 1, 1, 9, 0, tzinfo=timezone.utc)
    convs = []
    for c in range(n_convs):
        msgs = []
        who = 0
        for _ in range(per_conv):
            if rng.random() < 0.6:
                who = 1 - who
            sp = speakers[who % len(speakers)]
            pool = ANA if who == 0 else BEN
            msgs.append(Message(sp, rng.choice(pool), t.isoformat()))
            t += timedelta(seconds=rng.randint(5, 300))
        convs.append(Conversation(f"c{c:03d}", msgs, "synthetic"))
        t += timedelta(days=1)
    return convs


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_conversations(d / "conversations.jsonl", synthetic_conversations())
    return d


def tiny_trained_model(lora_r=4, seed=0):
    """build_model's tiny-gemma3 PEFT model for speakers Ana and Ben, with its trainable tensors moved off their
    initial values (zeros for LoRA's B), as after some training: (model, tok, ids)."""
    import torch
    from convsim.config import TrainConfig
    from convsim.training.backends import build_model

    torch.manual_seed(seed)
    model, tok, spec, ids = build_model(TrainConfig(model="tiny-gemma3", lora_r=lora_r), ["Ana", "Ben"], "cpu")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model, tok, ids


def cli(*args, check=True, input=None, timeout=600):
    """Run `python -m convsim ARGS` and return the CompletedProcess."""
    p = subprocess.run(
        [sys.executable, "-m", "convsim", *map(str, args)], capture_output=True, text=True, input=input, timeout=timeout
    )
    if check and p.returncode != 0:
        raise AssertionError(f"convsim {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


TINY_TRAIN = [
    "--model", "tiny-llama", "--max-steps", "30", "--batch-size", "8", "--learning-rate", "3e-3",
    "--eval-steps", "10", "--save-steps", "10", "--json",
]  # fmt: skip


def train_tiny(data, out) -> Path:
    """A tiny-llama run of `data` trained for a few steps through the CLI, at `out`."""
    cli("train", data, "--out", out, *TINY_TRAIN)
    return Path(out)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_dir) -> Path:
    """A tiny-llama run trained for a few steps through the CLI (shared by many tests)."""
    return train_tiny(data_dir, tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture(scope="session")
def real_run(tmp_path_factory, data_dir) -> Path:
    """The real tier's run: the embedded Gemma 3 270M trained briefly on the synthetic chat, once per session
    (minutes on a CPU), shared by the tests that export it to llama.cpp."""
    out = tmp_path_factory.mktemp("runs") / "real"
    cli(
        *("train", data_dir, "--out", out, "--max-steps", "12", "--batch-size", "4", "--learning-rate", "3e-3"),
        "--recipe",  # the same run on any machine: the CPU recipe would train it with a shorter context here
        "gpu",
        *("--eval-steps", "1000", "--save-steps", "1000", "--max-val-examples", "2", "--json"),
        timeout=1800,  # minutes on a CPU; this much training teaches it to hand over to the other speaker
    )
    return out
