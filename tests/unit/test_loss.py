"""The reply-only loss is defined once (`convsim.modeling.loss`): pinned to a value computed by hand from the
full model's logits (log-softmax written out, in float64) on a tiny model, and the same value through
training, evaluation, steering and attribution.

    pytest tests/unit/test_loss.py        # seconds
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_trained_model
from convsim.evaluation import evaluate
from convsim.modeling import loss
from convsim.modeling.layers import causal_lm
from convsim.steering import sweep as steering_sweep
from convsim.tda import gradients


@pytest.fixture(scope="module")
def trained():
    model, tok, ids = tiny_trained_model()
    model.eval()
    return model, ids


def example(ids):
    """<bos> [Ana] ... [Ben] ... [Ana]: the reply is Ben's two words and the next speaker's token."""
    seq = [2, ids["Ana"], 100, 200, 300, ids["Ben"], 400, 500, ids["Ana"]]
    mask = [0, 0, 0, 0, 0, 0, 1, 1, 1]
    return seq, mask


def by_hand(model, seq, mask):
    """Sum over reply positions k of -log softmax(logits[k-1])[seq[k]], from a plain full forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].double()
    total = 0.0
    for k in range(1, len(seq)):
        if mask[k]:
            row = logits[k - 1]
            total -= float(row[seq[k]] - torch.logsumexp(row, 0))
    return total, sum(mask[1:])


@pytest.fixture(params=[None, 0.1], ids=["no-cap", "softcap"])
def cap(request, trained):
    config = causal_lm(trained[0]).config
    was = getattr(config, "final_logit_softcapping", None)
    config.final_logit_softcapping = request.param  # small: the random model's logits are small too
    yield request.param
    config.final_logit_softcapping = was


def test_every_stage_gets_the_hand_computed_reply_loss(trained, cap):
    model, ids = trained
    seq, mask = example(ids)
    want, count = by_hand(model, seq, mask)
    assert count == 3 and want > 0
    labels = [t if m else -100 for t, m in zip(seq, mask)]

    # training: the trainer's loss is the mean over the reply tokens
    batch = {
        "input_ids": torch.tensor([seq]),
        "attention_mask": torch.ones(1, len(seq), dtype=torch.long),
        "labels": torch.tensor([labels]),
    }
    with torch.no_grad():
        train_mean = float(loss.reply_loss(model, batch))
    assert train_mean * count == pytest.approx(want, rel=1e-5)

    # evaluation: summed NLL of the reply after the prompt
    got, n = evaluate.nll(model, seq[:6], seq[6:], mask[6:])
    assert n == count and got == pytest.approx(want, rel=1e-5)

    # steering: the perplexity of the real replies in a sweep
    got, n = steering_sweep.reply_nll(model, seq, mask)
    assert n == count and got == pytest.approx(want, rel=1e-5)

    # attribution: the per-example loss whose gradients are sketched
    with torch.no_grad():
        got = gradients.per_example_loss(model, torch.tensor([seq]), batch["attention_mask"], batch["labels"])
    assert float(got[0]) * count == pytest.approx(want, rel=1e-5)


def test_the_stages_call_the_one_definition():
    assert evaluate.reply_nll is loss.reply_nll
    assert steering_sweep.reply_nll is loss.reply_nll
    assert gradients.per_example_loss is loss.per_example_loss


def test_per_example_loss_keeps_padded_rows_apart(trained):
    model, ids = trained
    seq, mask = example(ids)
    short = seq[:7] + [ids["Ana"]]
    short_mask = mask[:7] + [1]
    pad = 0
    rows = torch.tensor([seq, short + [pad]])
    attn = torch.tensor([[1] * len(seq), [1] * len(short) + [0]])
    labels = torch.tensor(
        [[t if m else -100 for t, m in zip(seq, mask)], [t if m else -100 for t, m in zip(short, short_mask)] + [-100]]
    )
    with torch.no_grad():
        got = loss.per_example_loss(model, rows, attn, labels)
    for i, (s, m) in enumerate([(seq, mask), (short, short_mask)]):
        want, count = by_hand(model, s, m)
        assert float(got[i]) * count == pytest.approx(want, rel=1e-5)


def test_nothing_to_score_is_zero(trained):
    model, ids = trained
    seq, _ = example(ids)
    assert loss.reply_nll(model, seq, [1] + [0] * (len(seq) - 1)) == (0.0, 0)  # the first token: nothing predicts it
