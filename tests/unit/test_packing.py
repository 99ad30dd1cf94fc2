"""Padding-free batches (`convsim train --packing`) change the layout only: a batch's examples side by side in
one row give each example the hidden states, the loss and the gradients it has alone or in a padded batch,
also across the sliding-window layers, and a training run gives the padded run's losses."""

import json

import pytest
import torch

from convsim.config import TrainConfig
from convsim.modeling.loss import reply_loss
from convsim.training.model import wants_packing
from conftest import cli, tiny_trained_model


def _examples(ids, vocab, lengths=(30, 90, 150), seed=0):
    """Examples longer than the tiny model's sliding window (64), each with loss on a tail "reply"."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        x = torch.randint(5, vocab - 10, (n,), generator=g)
        x[n // 3] = ids["Ana"]
        y = torch.full_like(x, -100)
        y[n // 2 :] = x[n // 2 :]
        out.append((x, y))
    return out


def _padded(examples, pad_id):
    width = max(len(x) for x, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)], mask[i, : len(x)], labels[i, : len(x)] = x, 1, y
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _packed(examples, pad_id):
    """What TRL's collator gives with padding_free=True."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)
    return collate([{"input_ids": x.tolist(), "labels": y.tolist()} for x, y in examples])


@pytest.fixture(scope="module")
def model_and_ids():
    model, tok, ids = tiny_trained_model()
    assert model.config.sliding_window < 150  # the examples cross the window
    return model, tok, ids


def test_packed_row_gives_each_example_its_own_hidden_states(model_and_ids):
    model, tok, ids = model_and_ids
    model.eval()
    ex = _examples(ids, len(tok))
    batch = _packed(ex, tok.pad_token_id)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    with torch.no_grad():  # as in training: no cache (with one, transformers ignores the packing)
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for x, _ in ex:
            alone = model(input_ids=x[None]).logits[0]
            torch.testing.assert_close(packed[start : start + len(x)], alone, atol=2e-4, rtol=1e-4)
            start += len(x)
        # the check can fail: without the positions, the row is one long sequence and later examples differ
        flat = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        assert (
            flat[len(ex[0][0]) : len(ex[0][0]) + len(ex[1][0])] - packed[len(ex[0][0]) : len(ex[0][0]) + len(ex[1][0])]
        ).abs().max() > 1e-2


def test_packed_loss_and_gradients_equal_the_padded_ones(model_and_ids):
    model, tok, ids = model_and_ids
    model.train()
    ex = _examples(ids, len(tok), seed=1)

    def step(batch):
        model.zero_grad()
        loss = reply_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    lp, gp = step(_padded(ex, tok.pad_token_id))
    lk, gk = step(_packed(ex, tok.pad_token_id))
    torch.testing.assert_close(lk, lp, atol=1e-5, rtol=1e-5)
    assert gp.keys() == gk.keys() and gp
    for n in gp:
        torch.testing.assert_close(gk[n], gp[n], atol=1e-5, rtol=1e-3, msg=n)


def test_packing_is_off_unless_asked():
    assert not wants_packing(TrainConfig())
    assert wants_packing(TrainConfig(packing=True))


def test_packed_training_run_gives_the_padded_runs_losses(tmp_path, data_dir):
    """Through the CLI, same seed and batches: the logged training losses agree (same examples per step)."""
    conf = tmp_path / "c.yaml"
    conf.write_text("logging_steps: 2\nsamples: 0\n")

    def losses(out, *flags):
        cli(
            "train",
            data_dir,
            "--out",
            out,
            "--model",
            "tiny-gemma3",
            "--max-steps",
            "6",
            "--batch-size",
            "8",
            "--learning-rate",
            "3e-3",
            "--eval-steps",
            "3",
            "--save-steps",
            "100",
            "--seed",
            "0",
            "--config",
            conf,
            *flags,
        )
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
        meta = json.loads((out / "run.json").read_text())
        return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r], meta

    padded, pev, pmeta = losses(tmp_path / "padded")
    packed, kev, kmeta = losses(tmp_path / "packed", "--packing")
    assert kmeta["packing"] is True and pmeta["packing"] is False
    assert len(packed) == len(padded) >= 1 and len(kev) == len(pev) >= 2
    assert packed == pytest.approx(padded, abs=1e-3)
    assert kev == pytest.approx(pev, abs=1e-3)
    assert kmeta["train_loss"] == pytest.approx(pmeta["train_loss"], abs=1e-3)
