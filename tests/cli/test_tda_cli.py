"""Training-data attribution on the tiny run: index (incremental, rebuilt when stale or damaged), query,
gradients, `convsim tda` and `chat --tda` end to end: `pytest tests/cli/test_tda_cli.py`.

(Pooling over real tokens only, padding ignored, is tested in tests/unit/test_activations.py.)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import cli
from convsim.errors import UserError
from convsim.runs import Run, open_run
from convsim.tda import index as index_mod
from convsim.modeling.loss import per_example_loss
from convsim.tda.gradients import GradientSketch, _LoraTrainable, lora_gradients, lora_pairs, render_grad_example
from convsim.tda.index import IndexSpec, training_messages, update_index
from convsim.tda.query import Attributor


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory):
    """A private copy of the shared tiny run, so the indexes written here do not leak into other tests."""
    d = tmp_path_factory.mktemp("tda") / "run"
    shutil.copytree(tiny_run, d, ignore=shutil.ignore_patterns("checkpoints", "logs", "tda"))
    return d


@pytest.fixture(scope="module")
def loaded(run_dir):
    run = open_run(run_dir)
    model, tok = run.load(device="cpu")
    return run, model, tok


@pytest.fixture
def counting(monkeypatch):
    """Counts the messages whose vectors are computed."""
    seen: list[int] = []
    real = index_mod.Embedder.__call__

    def call(self, items, on_batch=None):
        seen.append(len(items))
        return real(self, items, on_batch)

    monkeypatch.setattr(index_mod.Embedder, "__call__", call)
    return seen


def quiet(_msg):
    pass


# ---------------------------------------------------------------- what is indexed


def test_training_messages_are_the_trained_replies(loaded):
    run, _, _ = loaded
    items = training_messages(run)
    train_ids = set(run.meta.split["train"])
    texts = {(m.speaker, m.time, m.text) for c in run.conversations if c.id in train_ids for m in c.messages}
    assert items and all((it.speaker, it.time, it.text) in texts for it in items)
    assert all(it.context or it.burst for it in items)  # every reply follows a real context


# ---------------------------------------------------------------- incremental, stale, corrupt


def test_incremental_reindex_computes_only_new_messages(loaded, tmp_path, counting):
    run, model, tok = loaded
    items = training_messages(run)
    where = tmp_path / "acts"
    first = update_index(run, IndexSpec(), model, tok, items=items[:-5], directory=where, progress=False, log=quiet)
    assert first["computed"] == first["rows"] == len(items) - 5 and sum(counting) == len(items) - 5
    counting.clear()
    second = update_index(run, IndexSpec(), model, tok, items=items, directory=where, progress=False, log=quiet)
    assert second["computed"] == 5 and counting == [5] and second["rebuilt"] is None
    counting.clear()
    assert update_index(run, IndexSpec(), items=items, directory=where, progress=False)["computed"] == 0
    assert counting == []  # nothing new: no model needed either
    edited = list(items)
    edited[3] = replace(items[3], text="a message edited after indexing")
    third = update_index(run, IndexSpec(), model, tok, items=edited, directory=where, progress=False, log=quiet)
    assert (third["computed"], third["masked"]) == (1, 1)
    # Without centring, vectors do not depend on what else was computed with them: same rows as a fresh build.
    plain = IndexSpec(center=False)
    update_index(run, plain, model, tok, items=items[:-5], directory=tmp_path / "a", progress=False)
    update_index(run, plain, model, tok, items=items, directory=tmp_path / "a", progress=False)
    update_index(run, plain, model, tok, items=items, directory=tmp_path / "b", progress=False)
    from convsim.tda.store import VectorStore

    a, b = VectorStore.open(tmp_path / "a"), VectorStore.open(tmp_path / "b")
    for it in items[:20] + items[-5:]:
        np.testing.assert_allclose(
            a.vectors[a.row_of(it)].astype(np.float32), b.vectors[b.row_of(it)].astype(np.float32), atol=2e-3
        )


def test_corrupt_or_mismatched_cache_is_rebuilt(loaded, tmp_path, counting):
    run, model, tok = loaded
    items = training_messages(run)[:30]
    where = tmp_path / "acts"
    n = update_index(run, IndexSpec(), model, tok, items=items, directory=where, progress=False)["rows"]

    def again(r=run, spec=IndexSpec()):
        counting.clear()
        stats = update_index(r, spec, model, tok, items=items, directory=where, progress=False, log=quiet)
        assert stats["computed"] == n == sum(counting) and stats["rebuilt"], stats
        return stats["rebuilt"]

    data = next(where.glob("vectors*.f16"))
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 10)
    assert "truncated" in again()
    assert "adapter_hash" in again(Run(run.path, replace(run.meta, adapter_hash="0123456789abcdef")))
    again()  # back to the real adapter
    assert "layer" in again(spec=IndexSpec(layer="last"))
    assert "pool" in again(spec=IndexSpec(layer="last", pool="last"))
    center = next(where.glob("center-*.f32"))
    center.write_bytes(b"\0" * center.stat().st_size)
    assert "center" in again(spec=IndexSpec(layer="last", pool="last"))
    assert len(list(where.glob("center-*.f32"))) == 1


# ---------------------------------------------------------------- gradients


def test_per_example_gradients_equal_autograd(loaded):
    run, model, tok = loaded
    items = training_messages(run)[:3]
    examples = [(list(it.context), it.speaker, [it.text]) for it in items]
    sketch = GradientSketch.for_model(model, dim=256)
    batched = lora_gradients(model, tok, run.fmt, examples, sketch, batch_size=3, raw=True)
    pairs = lora_pairs(model)
    for row, ex in zip(batched, examples):
        ids, labels = render_grad_example(tok, run.fmt, ex, 512)
        with _LoraTrainable(pairs) as weights, torch.enable_grad():
            loss = per_example_loss(
                model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), torch.tensor([labels])
            )
            grads = torch.autograd.grad(loss.sum(), weights)
        want = torch.cat([g.flatten() for g in grads]).numpy()
        np.testing.assert_allclose(row, want, rtol=1e-3, atol=1e-6 * np.abs(want).max())
    assert not any(w.requires_grad for _, a, b in pairs for w in (a.weight, b.weight))
    projected = lora_gradients(model, tok, run.fmt, examples, sketch, batch_size=2)
    signs = torch.zeros(sketch.dim, sketch.n_params)
    offset = 0
    for bkt, sgn in zip(sketch.buckets, sketch.signs):
        signs[bkt, torch.arange(offset, offset + len(bkt))] = sgn
        offset += len(bkt)
    np.testing.assert_allclose(projected, batched @ signs.numpy().T, rtol=1e-3, atol=1e-6 * np.abs(projected).max())


def test_gradients_method_returns_k_finite_results(loaded):
    run, model, tok = loaded
    items = training_messages(run)[:40]  # a part of the corpus keeps this quick on a CPU
    stats = update_index(run, IndexSpec(method="gradients", dim=512), model, tok, items=items, progress=False)
    assert stats["dim"] == 512 and stats["computed"] == stats["rows"] > 10
    tda = Attributor(run, model, tok, method="gradients", k=4)
    it = items[7]
    hits = tda.query(it.text, it.speaker, context=list(it.context) + list(it.burst))
    assert len(hits) == 4 and all(np.isfinite(h["score"]) for h in hits)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4] and hits[0]["score"] >= hits[-1]["score"]
    assert all(h["speaker"] == "Ben" for h in tda.query("fine", "Ana", k=3, speaker="Ben"))
    with pytest.raises(UserError, match="unknown speaker"):
        tda.query("hi", "Zed")


def test_query_refuses_a_stale_index(loaded):
    run, model, tok = loaded
    update_index(run, IndexSpec(), model, tok, progress=False)
    with pytest.raises(UserError, match="out of date"):
        Attributor(Run(run.path, replace(run.meta, adapter_hash="0123456789abcdef")), model, tok)


# ---------------------------------------------------------------- CLI


def test_cli_index_query_and_errors(run_dir):
    shutil.rmtree(run_dir / "tda" / "activations", ignore_errors=True)
    no_index = cli("tda", "query", run_dir, "hi", "--as", "Ana", check=False)
    assert no_index.returncode == 2 and "no activations attribution index" in no_index.stderr
    assert "Traceback" not in no_index.stderr
    stats = json.loads(cli("tda", "index", run_dir, "--json").stdout)
    assert stats["computed"] == stats["live"] > 10 and (run_dir / "tda" / "activations" / "index.json").exists()

    run = open_run(run_dir)
    target = next(it for it in training_messages(run) if it.speaker == "Ben")
    out = json.loads(cli("tda", "query", run_dir, target.text, "--as", "Ben", "--k", "3", "--json").stdout)
    top = out["hits"][0]
    assert (top["speaker"], top["text"]) == (target.speaker, target.text) and top["score"] > 0.99
    assert len(out["hits"]) == 3

    bad = cli("tda", "query", run_dir, "hi", "--as", "Zed", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown speaker 'Zed'")
    bad = cli("tda", "query", run_dir, "hi", "--as", "Ana", "--speaker", "Zed", check=False)
    assert bad.returncode == 2 and "unknown speaker" in bad.stderr and "Traceback" not in bad.stderr


def test_chat_tda_through_a_pipe(run_dir):
    if not (run_dir / "tda" / "activations" / "index.json").exists():
        cli("tda", "index", run_dir)
    p = cli(
        "chat",
        run_dir,
        "--as",
        "Ana",
        "--tda",
        "--tda-k",
        "2",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
        input="are you coming tonight?\n/quit\n",
    )
    replies = [line for line in p.stdout.splitlines() if line.startswith("[Ana]")]
    hits = [line for line in p.stdout.splitlines() if line.startswith("    ~ ")]
    assert len(replies) == 1 and len(hits) == (0 if replies == ["[Ana] …"] else 2), p.stdout
    assert all(" [Ana] " in h or " [Ben] " in h for h in hits)
