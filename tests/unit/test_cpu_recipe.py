"""The CPU recipe: which values it sets, when it sizes the work, the probe and the arithmetic of the work."""

import torch

from conftest import tiny_trained_model
from convsim.config import TrainConfig
from convsim.training.cpu_recipe import (
    CPU_RECIPE,
    apply_cpu_recipe,
    probe_batches,
    probe_cpu_seconds_per_token,
    recipe_for,
    recipe_line,
    sizes_the_work,
    work_line,
    work_tokens,
)


def test_the_recipe_follows_the_device_unless_asked():
    assert recipe_for("cpu") == "cpu" and recipe_for("cuda:0") == "gpu" and recipe_for("cuda") == "gpu"
    assert recipe_for("cpu", "gpu") == "gpu" and recipe_for("cuda", "cpu") == "cpu"


def test_flags_given_win_over_the_recipe():
    cfg, changed = apply_cpu_recipe(TrainConfig(), given=set())
    assert changed == {k: v for k, v in CPU_RECIPE.items() if getattr(TrainConfig(), k) != v}
    assert cfg.context_size == CPU_RECIPE["context_size"] and cfg.auto_extra_data is False
    cfg, changed = apply_cpu_recipe(TrainConfig(context_size=12, batch_size=4), given={"context_size", "batch_size"})
    assert cfg.context_size == 12 and cfg.batch_size == 4
    assert "context_size" not in changed and "batch_size" not in changed
    assert "12" not in recipe_line(changed) and "validation at the end only" in recipe_line(changed)
    assert "every value" in recipe_line({})


def test_any_amount_of_work_given_turns_the_sizing_off():
    assert sizes_the_work(set()) and sizes_the_work({"context_size", "learning_rate"})
    for f in ("max_steps", "train_tokens", "epochs", "time_budget"):
        assert not sizes_the_work({f})


def test_work_is_minutes_of_threads_at_the_probed_rate():
    # 0.02 CPU s per token, 2 threads, 50 min: 3000 s x 2 / 0.02 = 300,000 tokens, at 80 % efficiency
    assert work_tokens(0.02, threads=2, minutes=50) == 360_000
    assert work_tokens(0.02, threads=4, minutes=50) == 2 * work_tokens(0.02, threads=2, minutes=50)
    assert work_tokens(1e9, threads=1, minutes=1) == 1
    assert "240,000 tokens" in work_line(240_000, 0.02, 2, 50) and "50 tokens per CPU second" in work_line(
        240_000, 0.02, 2, 50
    )


def test_probe_batches_are_grouped_by_length_and_seeded():
    rows = [{"input_ids": [0] * n, "labels": [0] * n} for n in range(1, 41)]
    a = probe_batches(rows, 4, 3)
    assert len(a) == 3 and all(len(b) == 4 for b in a)
    widths = [[len(r["input_ids"]) for r in b] for b in a]
    assert [w == sorted(w) for w in widths] == [True] * 3 and max(widths[0]) <= min(widths[1])
    assert a == probe_batches(rows, 4, 3) and probe_batches(rows[:5], 4, 3) != []


def test_probe_measures_and_leaves_the_weights_and_grads_alone():
    model, tok, ids = tiny_trained_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = ids["Ana"], ids["Ben"]
    rows = [{"input_ids": [a, 5, 6, 7, b, 8, 9] * (1 + i % 3), "labels": [-100] * 4 + [b, 8, 9] * 1} for i in range(12)]
    for r in rows:
        r["labels"] = r["labels"] + [-100] * (len(r["input_ids"]) - len(r["labels"]))
    threads = torch.get_num_threads()
    per_token = probe_cpu_seconds_per_token(model, rows, batch_size=4, pad_id=tok.pad_token_id)
    assert 0 < per_token < 1 and torch.get_num_threads() == threads
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
