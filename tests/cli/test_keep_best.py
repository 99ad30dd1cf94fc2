"""--keep-best: a run ends with the weights of its lowest validation loss, and they are what it saves."""

import json
from datetime import datetime, timedelta, timezone

import pytest

from convsim.data.schema import Conversation, Message, write_conversations
from conftest import cli


def _contrary_conversations(n=20):
    """Chats whose training replies always say one thing and whose validation replies (the latest sessions)
    always say another: the more the model learns, the worse it predicts validation, so the lowest
    validation loss cannot be the last one, whatever the run's speed or the library versions."""
    t = datetime(2024, 1, 1, 9, 0, tzinfo=timezone.utc)
    convs = []
    for c in range(n):
        word = "kiwi" if c >= n - 4 else "apple"  # the last 4 sessions are validation and test
        msgs = []
        for i in range(12):
            msgs.append(
                Message(
                    "Ana" if i % 2 else "Ben",
                    f"{word} {word} {word} {word}" if i % 2 else "so?",
                    (t + timedelta(minutes=i)).isoformat(),
                )
            )
        convs.append(Conversation(f"c{c:03d}", msgs, "contrary"))
        t += timedelta(days=1)
    return convs


def test_keep_best_ends_with_the_lowest_validation_loss(tmp_path):
    data_dir = tmp_path / "data"
    write_conversations(data_dir / "conversations.jsonl", _contrary_conversations())
    conf = tmp_path / "c.yaml"
    conf.write_text("logging_steps: 2\nsamples: 0\n")
    out = tmp_path / "run"
    cli(
        "train",
        data_dir,
        "--out",
        out,
        "--model",
        "tiny-gemma3",
        "--max-steps",
        "12",
        "--batch-size",
        "8",
        "--learning-rate",
        "1e-1",
        "--eval-steps",
        "2",
        "--save-steps",
        "100",
        "--seed",
        "0",
        "--keep-best",
        "--target",
        "Ana",
        "--config",
        conf,
    )
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    meta = json.loads((out / "run.json").read_text())
    best_step, best_loss = min(evals, key=lambda e: e[1])
    last_loss = [l for s, l in evals if s == meta["global_step"]][0]
    assert best_step < meta["global_step"] and last_loss > best_loss + 1e-3, evals  # true by construction
    assert meta["kept_best"]["step"] == best_step
    assert meta["eval_loss"] == pytest.approx(best_loss, abs=1e-5)
    # the saved adapter is the kept one, tensor for tensor
    import torch
    from safetensors.torch import load_file

    kept = torch.load(out / "best" / "trained.pt", weights_only=True)
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    lora = [n for n in kept if "lora_A" in n]
    assert lora
    for n in lora:
        match = [
            k
            for k in saved
            if k.split("lora_A")[0].endswith(n.split("lora_A")[0].split("base_model.model.")[-1]) and "lora_A" in k
        ]
        assert match and torch.equal(saved[match[0]].float(), kept[n].float()), n
