"""Activation store and vector search: `pytest tests/unit/test_tda_store.py` (a few seconds, no model)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import convsim.tda.store as store_mod
from convsim.data.schema import Message
from convsim.tda.search import build_index, index_for_store, nearest
from convsim.tda.store import INDEX, CorruptStore, NoStore, StaleStore, VectorStore, content_key, record_key, unit_rows

DIM = 16
META = {"model": "tiny-llama", "adapter_hash": "abc", "layer": -1, "pool": "mean"}


def msgs(n: int, speaker_of=lambda i: "Ana" if i % 3 else "Ben", start: int = 0) -> list[Message]:
    return [
        Message(speaker_of(i), f"message number {i}", f"2024-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}")
        for i in range(start, start + n)
    ]


def fake_embed(records) -> np.ndarray:
    """Deterministic vectors from the content key, standing in for a model."""
    return np.stack([np.random.default_rng(int(record_key(r)[:8], 16)).normal(size=DIM) for r in records])


class Crash(Exception):
    pass


@pytest.fixture
def store(tmp_path):
    s = VectorStore.create(tmp_path / "tda", DIM, META)
    records = msgs(50)
    s.add(records, fake_embed(records))
    return s


# ---------------------------------------------------------------- keys


def test_content_key_is_stable_and_sensitive():
    key = content_key("Ana", "2024-01-01T10:00:00", "hi")
    assert key == content_key("Ana", "2024-01-01T10:00:00", "hi")
    assert key == record_key(Message("Ana", "hi", "2024-01-01T10:00:00"))
    assert key == record_key({"speaker": "Ana", "time": "2024-01-01T10:00:00", "text": "hi"})
    others = {
        content_key("Ben", "2024-01-01T10:00:00", "hi"),
        content_key("Ana", None, "hi"),
        content_key("Ana", "2024-01-01T10:00:00", "hi "),
        content_key("Ana|2024", "01-01T10:00:00", "hi"),
    }
    assert key not in others and len(others) == 4


def test_content_key_pinned():
    # The key must not change between releases (a change would re-embed every stored message):
    # sha256 of the compact JSON list [speaker, time, text].
    assert (
        content_key("Ana", "2024-01-01T10:00:00", "hi")
        == "9b8f8f58b7507c4535577464f6137033377b5f7164a90284fce1930c484b7d7a"
    )
    assert content_key("Zoë", None, "ça va ?") == content_key("Zoë", None, "ça va ?")


# ---------------------------------------------------------------- incremental


def test_incremental_update_embeds_only_new_and_changed(tmp_path):
    s = VectorStore.create(tmp_path / "tda", DIM, META)
    calls = []

    def embed(records):
        calls.append(len(records))
        return fake_embed(records)

    records = msgs(100) + msgs(5)  # duplicates are embedded once
    assert s.update(records, embed, chunk=40) == {"added": 100, "masked": 0, "live": 100, "rows": 100}
    assert calls == [40, 40, 20]

    again = VectorStore.open(tmp_path / "tda", expect={**META, "dim": DIM})
    assert again.missing(records) == [] and again.n == 100
    changed = records[:100]
    changed[7] = Message(changed[7].speaker, "edited text", changed[7].time)
    changed.append(Message("Ben", "brand new", None))
    calls.clear()
    stats = again.update(changed, embed)
    assert calls == [2] and stats == {"added": 2, "masked": 1, "live": 101, "rows": 102}
    old_row = again.row_of(records[7])
    assert old_row not in again.live_rows()
    # The old text is never returned by a query, even for its own vector.
    index = index_for_store(again)
    hits = nearest(again, index, again.vectors[old_row].astype(np.float32), k=5)[0]
    assert all(h.row != old_row for h in hits) and len(hits) == 5
    assert again.compact() == 1 and again.n == 101 and again.missing(changed) == []
    reopened = VectorStore.open(tmp_path / "tda")
    np.testing.assert_array_equal(
        reopened.vectors[again.row_of(changed[8])], unit_rows(fake_embed([changed[8]]))[0].astype(np.float16)
    )
    reopened.verify(full=True)


def test_removed_record_comes_back_without_embedding(store):
    records = msgs(50)
    assert store.retain(records[1:]) == 1
    assert store.missing(records) == []  # still stored, just masked
    assert store.add(records[:1], fake_embed(records[:1])) == [] and not store.dead


# ---------------------------------------------------------------- crash safety


@pytest.mark.parametrize("step", ["add", "retain", "compact", "overwrite"])
def test_crash_before_commit_leaves_old_store(store, monkeypatch, step):
    path = store.path
    store.retain(msgs(50)[1:]) if step == "compact" else None
    before = VectorStore.open(path)

    def crash(*a, **k):
        raise Crash

    monkeypatch.setattr(store_mod, "_write_index", crash)
    with pytest.raises(Crash):
        if step == "add":
            new = msgs(10, start=50)
            store.add(new, fake_embed(new))
        elif step == "retain":
            store.retain(msgs(20))
        elif step == "compact":
            store.compact()
        else:
            VectorStore.create(path, DIM, {**META, "layer": 3}, overwrite=True)
    monkeypatch.undo()
    after = VectorStore.open(path, expect={**META, "dim": DIM})
    assert (after.n, after.dead, after.checksum, after.rows) == (before.n, before.dead, before.checksum, before.rows)
    np.testing.assert_array_equal(after.vectors, before.vectors)
    # And the store keeps working: the interrupted change goes through now.
    new = msgs(10, start=50)
    assert len(after.add(new, fake_embed(new))) == 10
    VectorStore.open(path).verify(full=True)
    assert (path / after.data_file).stat().st_size == after.n * DIM * 2


def test_crash_inside_atomic_replace_leaves_old_store(store, monkeypatch):
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith(INDEX):
            raise Crash
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    new = msgs(3, start=50)
    with pytest.raises(Crash):
        store.add(new, fake_embed(new))
    monkeypatch.undo()
    assert VectorStore.open(store.path).n == 50
    assert not [p for p in store.path.iterdir() if p.name.endswith(".tmp")]


def test_crash_after_commit_is_the_new_store(store, monkeypatch):
    # A crash after the index is committed but before the old data file is removed: the new store.
    store.retain(msgs(50)[10:])
    monkeypatch.setattr(VectorStore, "_remove_unused_files", lambda self: None)
    store.compact()
    monkeypatch.undo()
    assert len(list(store.path.glob("vectors*.f16"))) == 2
    assert VectorStore.open(store.path).n == 40


# ---------------------------------------------------------------- stale and corrupt


def test_missing_store(tmp_path):
    with pytest.raises(NoStore):
        VectorStore.open(tmp_path / "nothing")


@pytest.mark.parametrize(
    "field,value",
    [("layer", 3), ("model", "tiny-gemma3"), ("adapter_hash", "other"), ("pool", "last"), ("dim", DIM * 2)],
)
def test_mismatched_meta_is_stale(store, field, value):
    with pytest.raises(StaleStore, match=field):
        VectorStore.open(store.path, expect={**META, "dim": DIM, field: value})
    fresh = VectorStore.open_or_create(
        store.path, DIM if field != "dim" else value, {**META, field: value} if field != "dim" else META
    )
    assert fresh.n == 0


def test_truncated_vectors_are_corrupt(store):
    data = store.path / store.data_file
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 2)
    with pytest.raises(CorruptStore, match="truncated"):
        VectorStore.open(store.path)
    data.unlink()
    with pytest.raises(CorruptStore):
        VectorStore.open(store.path)
    with pytest.raises(CorruptStore):
        VectorStore.open_or_create(store.path, DIM, META, rebuild=False)
    assert VectorStore.open_or_create(store.path, DIM, META).n == 0


def test_edited_index_is_corrupt(store):
    index = store.path / INDEX
    raw = index.read_bytes()
    index.write_bytes(raw.replace(b"message number 7", b"message number 8"))
    with pytest.raises(CorruptStore, match="edited"):
        VectorStore.open(store.path)
    index.write_bytes(json.dumps(json.loads(raw), indent=1).encode())  # even a reformatted one
    with pytest.raises(CorruptStore):
        VectorStore.open(store.path)
    index.write_bytes(b"not json at all")
    with pytest.raises(CorruptStore):
        VectorStore.open(store.path)


def test_changed_vector_rows_are_corrupt(store):
    data = store.path / store.data_file
    sampled, unsampled = store_mod._sample_rows(store.n)[0], 1
    assert unsampled not in store_mod._sample_rows(store.n)
    blob = bytearray(data.read_bytes())
    blob[unsampled * DIM * 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    VectorStore.open(store.path)  # the cheap check samples rows ...
    with pytest.raises(CorruptStore):
        VectorStore.open(store.path).verify(full=True)  # ... the full one reads them all
    blob[sampled * DIM * 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(CorruptStore, match="sampled"):
        VectorStore.open(store.path)


def test_store_files_are_private(store):
    for p in (store.path / INDEX, store.path / store.data_file):
        assert p.stat().st_mode & 0o077 == 0


# ---------------------------------------------------------------- search


def clustered(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) * 3
    scales = rng.uniform(0.2, 1.5, size=dim)  # anisotropic noise
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim)) * scales).astype(np.float32)


def brute_force(vectors, queries, k):
    v, q = unit_rows(vectors), unit_rows(queries)
    sims = q @ v.T
    rows = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, rows, 1), rows


def test_exact_search_equals_numpy():
    vectors, queries = clustered(3000, 24, 30), clustered(20, 24, 30, seed=1)
    index = build_index(vectors)
    assert index.kind == "exact"
    scores, rows = index.search(queries, 10)
    want_scores, want_rows = brute_force(vectors, queries, 10)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_exact_search_speaker_filter_and_subset():
    vectors, queries = clustered(2000, 24, 20), clustered(5, 24, 20, seed=1)
    speakers = np.where(np.arange(2000) % 7 == 0, "Ben", "Ana")
    subset = np.arange(0, 2000, 2)
    index = build_index(vectors, speakers=speakers, rows=subset)
    scores, rows = index.search(queries, 10, speaker="Ben")
    ben = subset[speakers[subset] == "Ben"]
    want_scores, want = brute_force(vectors[ben], queries, 10)
    np.testing.assert_array_equal(rows, ben[want])
    few = build_index(vectors[:20], speakers=speakers[:20])  # Ben has 3 rows there
    s, r = few.search(queries[:1], 5, speaker="Ben")
    assert list(r[0, 3:]) == [-1, -1] and set(r[0, :3]) == {0, 7, 14} and np.isinf(s[0, 3:]).all()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_finds_planted_neighbour(kind):
    vectors = clustered(20_000, 32, 200)
    rng = np.random.default_rng(5)
    planted = rng.choice(len(vectors), 50, replace=False)
    queries = vectors[planted] + rng.normal(size=(50, 32)).astype(np.float32) * 0.01
    index = build_index(vectors, exact_below=1000, kind=kind if kind == "hnsw" else "auto")
    assert index.kind == kind
    _, rows = index.search(queries, 10)
    assert (rows[:, 0] == planted).mean() >= 0.98
    exact = brute_force(vectors, queries, 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact)])
    assert recall >= 0.9
    speakers = np.where(np.arange(len(vectors)) % 10 == 0, "Ben", "Ana")
    index = build_index(vectors, kind=kind, speakers=speakers)
    _, rows = index.search(queries, 10, speaker="Ben")
    assert (rows >= 0).all() and (speakers[rows] == "Ben").all()


def test_index_for_store_is_cached_by_checksum(tmp_path, monkeypatch):
    s = VectorStore.create(tmp_path / "tda", DIM, META)
    records = msgs(3000)
    s.add(records, clustered(3000, DIM, 30))
    first = index_for_store(s, kind="ivf")
    caches = list(s.path.glob("ann-*.faiss"))
    assert len(caches) == 1 and s.checksum[:16] in caches[0].name

    import convsim.tda.search as search_mod

    monkeypatch.setattr(search_mod, "build_index", lambda *a, **k: pytest.fail("rebuilt despite cache"))
    again = index_for_store(VectorStore.open(s.path), kind="ivf")
    q = s.vectors[:5].astype(np.float32)
    np.testing.assert_array_equal(first.search(q, 5)[1], again.search(q, 5)[1])
    assert again.search(q, 5, speaker="Ben")[1].size == 25
    monkeypatch.undo()

    s.retain(records[1:])  # any change → new checksum → new cache, old one gone
    third = index_for_store(s, kind="ivf")
    assert third.ntotal == 2999 and 0 not in third.search(q[:1], 10)[1]
    caches = list(s.path.glob("ann-*.faiss"))
    assert len(caches) == 1 and s.checksum[:16] in caches[0].name
