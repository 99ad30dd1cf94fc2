"""`convsim tda index`: one vector per training message of a run, kept in RUN_DIR/tda/METHOD.
(Longer than most modules: both methods share the message list, the centring and the resume rules, which
read best together.)

    convsim tda index runs/me                          # activations: layer "mid", mean pool, centred
    convsim tda index runs/me --method gradients       # projected per-example LoRA gradients

    from convsim.tda.index import IndexSpec, update_index
    stats = update_index(run, IndexSpec(method="activations"))     # {"computed": 12, "rows": 4810, ...}

The training messages are the messages the run was trained to produce: every message of a reply burst of
a target speaker in the train split (`build_examples` with the run's context size and burst length),
each with the context it was trained after. A message is keyed by the hash of (speaker, time, text)
(`VectorStore`), so re-indexing computes only messages that are new or changed and masks the rest.

Two methods (the vector of a message, before normalising):

- `activations`: the hidden state of decoder layer `layer`, pooled (`mean` or `last`) over the message's
  own text tokens, the text rendered after its speaker's tag (no context, so a reply can be embedded
  the same way without one). Default layer: the middle one, with centring. On the embedded model,
  last-layer cosines of unrelated messages bunch close to 1 (one shared direction dominates); a middle
  layer carries more of what the message says, and subtracting the corpus mean removes the shared
  direction (`bench/tda_canary.py` compares the variants).
- `gradients`: the gradient of the message's loss given its context with respect to the LoRA weights,
  count-sketched to `dim` (`convsim.tda.gradients`).

Centring: the mean of the raw vectors of (up to) 2048 training messages spread over the corpus is saved
once beside the store (`center-<sha>.f32`, its hash in the store's meta) and subtracted from every
vector, stored and queried, before normalising. New messages use the same mean, so an incremental update
never changes stored rows.

The store's meta records model, adapter hash, method, layer, pool, centring, projection and prompt
settings; any difference, or damage (truncated vectors, an edited index, a missing or altered mean),
makes `update_index` rebuild from scratch, never use the old vectors.

A build commits its rows `CHUNK` at a time, so a killed build (SIGKILL, power loss) leaves the store as of
its last commit, and the next `update_index` resumes it, computing only the rows that are not there yet.
Until a fresh build has all its rows its meta says `unfinished`, and queries refuse it rather than answer
from part of the corpus.

One module for both methods (activations, gradients): they share the message keys, the incremental
update and the centring, and differ only in the embedder.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from convsim.errors import UserError
from convsim.fsutil import atomic_path
from convsim.tda.store import CorruptStore, NoStore, StaleStore, VectorStore

METHODS = ("activations", "gradients")
CENTER_SAMPLE = 2048
CHUNK = 4096  # vectors computed between two commits: what a killed build loses at most
UNFINISHED = "unfinished"  # in the meta of a store whose first build has not yet reached its end
LAYER_NAMES = ("mid", "last")


@dataclass(frozen=True)
class Item:
    """One training message and the context it was trained after (`record_fields` reads the first three)."""

    speaker: str
    time: str | None
    text: str
    context: tuple = field(default=(), compare=False, repr=False)
    burst: tuple = field(default=(), compare=False, repr=False)  # earlier messages of the same burst


@dataclass(frozen=True)
class IndexSpec:
    """How vectors are made; everything here that changes a vector is recorded in the store's meta."""

    method: str = "activations"
    layer: int | str = "mid"  # activations: decoder layer (int, negative from the end, "mid", "last")
    pool: str = "mean"  # activations: mean | last
    center: bool = True
    dim: int = 2048  # gradients: projection size
    seed: int = 0  # gradients: projection seed
    batch_size: int = 16
    max_len: int = 512


def resolve_layer(layer: int | str, n_layers: int) -> int:
    """A layer spec as a non-negative index: "mid" is (n-1)//2, "last" and -1 are n-1."""
    if isinstance(layer, str) and layer not in LAYER_NAMES:
        try:
            layer = int(layer)
        except ValueError:
            raise UserError(f"--layer must be an integer, mid or last, not {layer!r}") from None
    if layer == "mid":
        return (n_layers - 1) // 2
    if layer == "last":
        return n_layers - 1
    if not -n_layers <= layer < n_layers:
        raise UserError(f"--layer {layer} is out of range: the model has {n_layers} decoder layers")
    return layer % n_layers


def n_layers_of(run) -> int:
    """Decoder layer count from the model config, without loading weights where possible."""
    from convsim.modeling.models import resolve

    spec = resolve(run.model_name)
    if spec.tiny_config:
        return int(spec.tiny_config["num_hidden_layers"])
    try:
        from transformers import AutoConfig
        from convsim.modeling.models import ensure_embedded_cache

        where = str(ensure_embedded_cache(verbose=False)) if spec.source == "embedded" else spec.location
        cfg = AutoConfig.from_pretrained(where)
        cfg = getattr(cfg, "text_config", None) or cfg
        return int(cfg.num_hidden_layers)
    except Exception:
        return -1


# ---------------------------------------------------------------- what gets indexed


def training_messages(run) -> list[Item]:
    """Every message the run was trained to produce, with its context, in corpus order."""
    from convsim.data.examples import build_examples

    examples = build_examples(run.split("train"), run.targets, run.meta.context_size, run.meta.max_burst)
    items = []
    for ex in examples:
        for j, m in enumerate(ex.reply):
            items.append(Item(m.speaker, m.time, m.text, tuple(ex.context), tuple(ex.reply[:j])))
    return items


def max_seq_length(run) -> int:
    """The run's --max-seq-length (from config.yaml), 512 if unknown."""
    try:
        import yaml

        cfg = yaml.safe_load((Path(run.path) / "config.yaml").read_text(encoding="utf-8")) or {}
        return int(cfg.get("max_seq_length") or 512)
    except (OSError, ValueError, TypeError, AttributeError):
        return 512


def index_dir(run, method: str) -> Path:
    return Path(run.path) / "tda" / method


def store_meta(run, spec: IndexSpec, layer: int | None) -> dict:
    """What a store must have been built with to be used for `run` and `spec` (compared on open)."""
    meta = {
        "model": run.model_name,
        "adapter_hash": run.adapter_hash,
        "method": spec.method,
        "center": bool(spec.center),
        "prompt_style": run.meta.prompt_style,
        "special_tokens": run.meta.special_tokens,
    }
    if spec.method == "activations":
        meta.update(layer=layer, pool=spec.pool)
    else:
        meta.update(
            projection="countsketch", proj_seed=spec.seed, context_size=run.meta.context_size, max_len=spec.max_len
        )
    return meta


# ---------------------------------------------------------------- vectors


def activation_vectors(
    model, tok, fmt, items: Sequence, layer: int, pool: str, batch_size: int = 16, on_batch=None
) -> np.ndarray:
    """Pooled hidden states of each item's text after its speaker's tag; float32 [n, hidden]."""
    from convsim.modeling.activations import embed_texts
    from convsim.data.examples import tag_ids

    hidden = model.get_input_embeddings().weight.shape[1]
    out = np.zeros((len(items), hidden), dtype=np.float32)
    by_speaker: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_speaker.setdefault(it.speaker, []).append(i)
    for speaker, idx in by_speaker.items():
        prefix = tag_ids(tok, fmt, speaker)
        for start in range(0, len(idx), 256):
            part = idx[start : start + 256]
            # " text" as in training, where a message's text follows its tag after a space.
            texts = [" " + items[i].text.strip() for i in part]
            out[part] = embed_texts(
                model,
                tok,
                texts,
                layer=layer,
                pool=pool,
                batch_size=batch_size,
                prefix_ids=prefix,
                padding_side="right",
            )
            if on_batch:
                on_batch(len(part))
    return out


def gradient_vectors(
    model, tok, fmt, items: Sequence, sketch, batch_size: int = 8, max_len: int = 512, on_batch=None
) -> np.ndarray:
    """Projected per-example LoRA gradients of each item's loss given its context; float32 [n, dim]."""
    from convsim.tda.gradients import lora_gradients

    examples = [(list(it.context) + list(it.burst), it.speaker, [it.text]) for it in items]
    return lora_gradients(model, tok, fmt, examples, sketch, batch_size=batch_size, max_len=max_len, on_batch=on_batch)


class Embedder:
    """Raw (uncentred) vectors of items for one run and spec; holds the model and the projection."""

    def __init__(self, run, spec: IndexSpec, model, tok, layer: int | None):
        self.run, self.spec, self.model, self.tok, self.layer = run, spec, model, tok, layer
        self.fmt = run.fmt
        self.sketch = None
        if spec.method == "gradients":
            from convsim.tda.gradients import GradientSketch

            self.sketch = GradientSketch.for_model(model, dim=spec.dim, seed=spec.seed)

    @property
    def dim(self) -> int:
        return (
            self.spec.dim if self.spec.method == "gradients" else int(self.model.get_input_embeddings().weight.shape[1])
        )

    def __call__(self, items: Sequence, on_batch=None) -> np.ndarray:
        if self.spec.method == "activations":
            return activation_vectors(
                self.model, self.tok, self.fmt, items, self.layer, self.spec.pool, self.spec.batch_size, on_batch
            )
        return gradient_vectors(
            self.model,
            self.tok,
            self.fmt,
            items,
            self.sketch,
            max(1, self.spec.batch_size // 2),
            self.spec.max_len,
            on_batch,
        )


# ---------------------------------------------------------------- centring


def center_file(sha: str) -> str:
    return f"center-{sha[:16]}.f32"


def write_center(directory: Path, mean: np.ndarray) -> str:
    blob = np.ascontiguousarray(mean, dtype=np.float32).tobytes()
    sha = hashlib.sha256(blob).hexdigest()
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / center_file(sha)) as tmp:
        tmp.write_bytes(blob)
    return sha


def read_center(store: VectorStore) -> np.ndarray | None:
    """The store's centring mean (None when it is not centred); `CorruptStore` when missing or altered."""
    sha = store.meta.get("center_sha256")
    if not store.meta.get("center"):
        return None
    path = Path(store.path) / center_file(str(sha))
    try:
        blob = path.read_bytes()
    except OSError:
        raise CorruptStore(f"{path} is missing: rebuild the index") from None
    if hashlib.sha256(blob).hexdigest() != sha or len(blob) != 4 * store.dim:
        raise CorruptStore(f"{path} does not match the index: rebuild it")
    return np.frombuffer(blob, dtype=np.float32).copy()


def centred(raw: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """Raw vectors minus the corpus mean (if any), rows scaled to length 1."""
    v = np.asarray(raw, dtype=np.float32)
    if mean is not None:
        v = v - mean[None, :]
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)


def _spread(n: int, k: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, n - 1, min(n, k)).round()}) if n else []


# ---------------------------------------------------------------- build / update


def open_store(run, spec: IndexSpec, layer: int | None, directory: Path | None = None):
    """(store, mean) if a matching, undamaged store exists; raises NoStore / StaleStore / CorruptStore."""
    store = VectorStore.open(directory or index_dir(run, spec.method), expect=store_meta(run, spec, layer))
    return store, read_center(store)


def update_index(
    run,
    spec: IndexSpec = IndexSpec(),
    model=None,
    tok=None,
    items: Sequence | None = None,
    directory: str | os.PathLike | None = None,
    progress: bool = True,
    rebuild: bool = False,
    log=None,
) -> dict:
    """Bring RUN_DIR/tda/METHOD (or `directory`) in line with the run's training messages (or `items`).

    Loads the model only when something must be computed. Returns counts: computed (vectors made now),
    masked, live, rows, rebuilt (why the old store was dropped, or null), seconds."""
    from tqdm.auto import tqdm

    if spec.method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, not {spec.method!r}")
    if spec.pool not in ("mean", "last"):
        raise UserError(f"--pool must be mean or last, not {spec.pool!r}")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.time()
    directory = Path(directory) if directory is not None else index_dir(run, spec.method)
    items = training_messages(run) if items is None else list(items)
    if not items:
        raise UserError(f"{run.path} has no training messages to index")
    layer = None
    if spec.method == "activations":
        n = n_layers_of(run) if model is None else _model_layers(model)
        if n < 0:
            model, tok = run.load()
            n = _model_layers(model)
        layer = resolve_layer(spec.layer, n)
    meta = store_meta(run, spec, layer)

    store, mean, rebuilt = None, None, None
    if rebuild:
        rebuilt = "asked to rebuild"
    else:
        try:
            store, mean = open_store(run, spec, layer, directory)
            # a build killed after publishing its store, before removing the mean it replaced, left that mean
            _remove_old_centers(directory, store.meta.get("center_sha256"))
        except NoStore:
            pass
        except (StaleStore, CorruptStore) as e:
            rebuilt = str(e)
            log(f"rebuilding the {spec.method} index: {e}")
    if store is not None:
        todo = store.missing(items)
        if not todo:
            masked = store.retain(items)
            _finish(store)  # a build killed after its last rows, before saying it was finished
            return {
                "computed": 0,
                "masked": masked,
                "live": len(store.live_rows()),
                "rows": store.n,
                "rebuilt": None,
                "seconds": round(time.time() - t0, 2),
                "dim": store.dim,
                "layer": layer,
                "path": str(directory),
            }

    if model is None:
        model, tok = run.load()
    embed = Embedder(run, spec, model, tok, layer)
    bar = tqdm(
        total=0,
        desc=f"tda index ({spec.method}{'' if layer is None else f', layer {layer}'})",
        unit="msg",
        disable=not progress,
    )
    cache: dict[int, np.ndarray] = {}
    try:
        if store is None:
            # A fresh store: fix the centring mean first (from messages spread over the corpus), keep those
            # vectors so they are not computed twice.
            uniq = _unique_positions(items)
            bar.total = len(uniq)
            bar.refresh()
            if spec.center:
                sample = [uniq[i] for i in _spread(len(uniq), CENTER_SAMPLE)]
                raw = embed([items[i] for i in sample], on_batch=bar.update)
                cache = {id(items[i]): raw[j] for j, i in enumerate(sample)}
                mean = raw.astype(np.float64).mean(0).astype(np.float32)
                meta = {**meta, "center_sha256": write_center(directory, mean)}
            # "unfinished" until every message has its row: queries refuse a store a killed build left
            store = VectorStore.create(directory, embed.dim, {**meta, UNFINISHED: True}, overwrite=True)
            _remove_old_centers(directory, meta.get("center_sha256"))
        else:
            bar.total = len(store.missing(items))
            bar.refresh()

        def vectors(records):
            need = [r for r in records if id(r) not in cache]
            fresh = iter(embed(need, on_batch=bar.update)) if need else iter(())
            raw = np.stack([cache[id(r)] if id(r) in cache else next(fresh) for r in records])
            return centred(raw, mean)

        stats = store.update(items, vectors, chunk=CHUNK)
        _finish(store)
    finally:
        bar.close()
    return {
        "computed": stats["added"],
        "masked": stats["masked"],
        "live": stats["live"],
        "rows": stats["rows"],
        "rebuilt": rebuilt,
        "seconds": round(time.time() - t0, 2),
        "dim": store.dim,
        "layer": layer,
        "path": str(directory),
    }


def _finish(store: VectorStore) -> None:
    if store.meta.get(UNFINISHED):
        store.set_meta({k: v for k, v in store.meta.items() if k != UNFINISHED})


def _model_layers(model) -> int:
    from convsim.modeling.layers import decoder_layers

    return len(decoder_layers(model))


def _unique_positions(items: Sequence) -> list[int]:
    from convsim.tda.store import record_key

    seen, out = set(), []
    for i, it in enumerate(items):
        k = record_key(it)
        if k not in seen:
            seen.add(k)
            out.append(i)
    return out


def _remove_old_centers(directory: Path, keep_sha: str | None) -> None:
    keep = center_file(keep_sha) if keep_sha else None
    for p in directory.glob("center-*.f32"):
        if p.name != keep:
            p.unlink(missing_ok=True)
