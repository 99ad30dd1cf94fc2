"""Attribution queries: a (generated) reply → the training messages most like it.

    from convsim.tda.query import Attributor
    tda = Attributor(run, method="activations", k=5)          # opens RUN_DIR/tda/activations
    tda.query("see you at the lake!", "Ana")                  # [{"rank", "score", "speaker", "time", "text", "row"}]
    tda.query(reply_texts, "Ana", context=history)            # gradients use the context the reply followed

The reply is turned into a vector exactly as the index turned training messages into vectors (same
layer, pooling, centring mean or gradient projection, read from the index's meta), then searched by
cosine with FAISS (`convsim.tda.search`), or with numpy when faiss is not installed. Used by
`convsim tda query` and `convsim chat --tda`. The index must exist and match the run's adapter:
otherwise a clear error says to run `convsim tda index`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from convsim.data.schema import Message
from convsim.errors import UserError
from convsim.tda.index import METHODS, UNFINISHED, Embedder, IndexSpec, Item, centred, index_dir, read_center
from convsim.tda.store import CorruptStore, NoStore, StaleStore, VectorStore


def open_for_query(run, method: str, directory=None) -> VectorStore:
    """The run's index for `method` (in RUN_DIR/tda/METHOD or `directory`), checked against the run's model
    and adapter; UserError otherwise."""
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    where = directory or index_dir(run, method)
    fix = f"run `convsim tda index {run.path} --method {method}`"
    try:
        store = VectorStore.open(
            where, expect={"model": run.model_name, "adapter_hash": run.adapter_hash, "method": method}
        )
        read_center(store)
    except NoStore:
        raise UserError(f"{run.path} has no {method} attribution index yet: {fix} first") from None
    except StaleStore as e:
        raise UserError(f"the {method} attribution index is out of date ({e}): {fix}") from None
    except CorruptStore as e:
        raise UserError(f"the {method} attribution index is damaged ({e}): {fix}") from None
    if store.meta.get(UNFINISHED):
        raise UserError(f"the {method} attribution index was not finished (its build was stopped): {fix} to finish it")
    return store


class _NumpySearch:
    """Exact cosine search over the store's live rows, for machines without faiss."""

    def __init__(self, store: VectorStore):
        self.rows = store.live_rows()
        self.vectors = np.asarray(store.vectors[self.rows], dtype=np.float32)
        self.speakers = (
            np.asarray(store.speakers(), dtype=object)[self.rows] if len(self.rows) else np.zeros(0, dtype=object)
        )

    def search(self, q: np.ndarray, k: int, speaker: str | None) -> list[tuple[int, float]]:
        scores = self.vectors @ q
        allowed = np.flatnonzero(self.speakers == speaker) if speaker is not None else np.arange(len(scores))
        top = allowed[np.argsort(-scores[allowed], kind="stable")[:k]]
        return [(int(self.rows[i]), float(scores[i])) for i in top]


class _FaissSearch:
    def __init__(self, store: VectorStore):
        from convsim.tda.search import index_for_store

        self.store = store
        self.index = index_for_store(store)

    def search(self, q: np.ndarray, k: int, speaker: str | None) -> list[tuple[int, float]]:
        if speaker is not None and speaker not in self.index.speaker_names:
            return []
        scores, rows = self.index.search(q[None, :], k, speaker=speaker)
        return [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]


def make_search(store: VectorStore):
    """FAISS when it is installed, numpy exact search otherwise (same results below 100k rows)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return _NumpySearch(store)
    return _FaissSearch(store)


class Attributor:
    """Top-k training messages for replies of one run, by one method."""

    def __init__(self, run, model=None, tok=None, method: str = "activations", k: int = 5, directory=None):
        self.run, self.method, self.k = run, method, k
        self.store = open_for_query(run, method, directory)
        meta = self.store.meta
        self.mean = read_center(self.store)
        spec = IndexSpec(
            method=method,
            layer=meta.get("layer", "mid"),
            pool=meta.get("pool", "mean"),
            center=bool(meta.get("center")),
            dim=self.store.dim,
            seed=int(meta.get("proj_seed", 0)),
            max_len=int(meta.get("max_len", 512)),
        )
        if model is None:
            model, tok = run.load()
        self.embed = Embedder(run, spec, model, tok, meta.get("layer"))
        if self.embed.dim != self.store.dim:
            raise UserError(
                f"the {method} index has dimension {self.store.dim}, the model gives {self.embed.dim}: "
                f"run `convsim tda index {run.path} --method {method}`"
            )
        self.search = make_search(self.store)

    def vector(self, text: str | Sequence[str], as_speaker: str, context: Sequence[Message] = ()) -> np.ndarray:
        """The unit query vector of a reply (one message or a burst) spoken by `as_speaker`."""
        texts = [text] if isinstance(text, str) else list(text)
        if self.method == "activations":
            item = Item(as_speaker, None, " ".join(t.strip() for t in texts))
            raw = self.embed([item])
        else:
            from convsim.tda.gradients import lora_gradients

            e = self.embed
            raw = lora_gradients(
                e.model, e.tok, e.fmt, [(list(context), as_speaker, texts)], e.sketch, max_len=e.spec.max_len
            )
        return centred(raw, self.mean)[0]

    def query(
        self,
        text: str | Sequence[str],
        as_speaker: str,
        k: int | None = None,
        speaker: str | None = None,
        context: Sequence[Message] = (),
    ) -> list[dict]:
        """The k training messages most like `text` as said by `as_speaker` (best first); `speaker`
        restricts them to one speaker's messages. `context`: what the reply followed (gradients)."""
        self.run.check_person(as_speaker)
        if speaker is not None:
            self.run.check_person(speaker)
        q = self.vector(text, as_speaker, context)
        out = []
        for rank, (row, score) in enumerate(self.search.search(q, k or self.k, speaker), 1):
            rec = self.store.rows[row]
            out.append(
                {
                    "rank": rank,
                    "score": round(score, 4),
                    "speaker": rec["speaker"],
                    "time": rec.get("time"),
                    "text": rec["text"],
                    "row": row,
                }
            )
        return out
