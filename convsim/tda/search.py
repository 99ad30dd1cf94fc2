"""Nearest training messages by cosine similarity, with FAISS.

    from convsim.tda.search import build_index, index_for_store, nearest
    index = build_index(vectors, speakers=names)            # exact below 100k rows, IVF above
    scores, rows = index.search(queries, k=10, speaker="Ana")
    index = index_for_store(store)                          # built once, then read from a cache file
    hits = nearest(store, index, reply_vectors, k=10)       # [[Hit(row, score, speaker, time, text)]]

Rows are L2-normalised, so inner product is cosine. Below `exact_below` rows the index is exact
(`IndexFlatIP`); above it, approximate: IVF with float16 codes (the store's own precision, so the only
loss is which lists get probed): it builds in seconds and answers a query far faster than exact search
at high recall (`python bench/tda_query.py` measures both; docs/PERFORMANCE.md has the figures). HNSW
would answer faster still but takes far longer to build on a small CPU, so it is opt-in (`kind="hnsw"`). A speaker filter is a bitmap of
allowed ids passed to the search itself (no post-filtering, so k results whenever the speaker has k
rows in the probed lists; the search widens its probes when fewer come back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import faiss
import numpy as np

from convsim.fsutil import atomic_path

Kind = Literal["auto", "exact", "ivf", "hnsw"]
CHUNK = 65536  # rows converted to float32 at a time, so a float16 memmap is never copied whole


def unit_float32(x: np.ndarray) -> np.ndarray:
    """C-contiguous float32 rows of length 1 (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def _chunks(vectors: np.ndarray, ids: np.ndarray | None):
    n = len(ids) if ids is not None else len(vectors)
    for start in range(0, n, CHUNK):
        part = vectors[ids[start : start + CHUNK]] if ids is not None else vectors[start : start + CHUNK]
        yield unit_float32(part)


def ivf_params(n: int) -> dict:
    """IVF settings for n rows: about 2·sqrt(n) lists (a power of two; 2048 for 1M), probing 1/64 of
    them but at least 24, k-means on 40 rows a list for 10 rounds: the settings bench/tda_query.py found
    to keep recall@10 high from 100k to 1M rows."""
    nlist = max(16, 2 ** round(math.log2(2 * math.sqrt(max(n, 1)))))
    return {"nlist": nlist, "nprobe": max(24, nlist // 64), "train_rows": min(n, 40 * nlist), "niter": 10}


@dataclass
class VectorIndex:
    """A FAISS index over some rows; `search` answers in the caller's row numbers."""

    index: faiss.Index
    kind: str
    params: dict
    rows: np.ndarray  # faiss id → caller's row number
    speaker_codes: np.ndarray | None = None  # faiss id → position in speaker_names
    speaker_names: list[str] = field(default_factory=list)
    _selectors: dict = field(default_factory=dict, repr=False)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def describe(self) -> str:
        return f"{self.kind} " + " ".join(f"{k}={v}" for k, v in self.params.items())

    def _search_params(self, sel, widen: int):
        if self.kind == "ivf":
            nprobe = min(self.params["nlist"], self.params["nprobe"] * widen)
            return (
                faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
                if sel is not None
                else faiss.SearchParametersIVF(nprobe=nprobe)
            )
        if self.kind == "hnsw":
            ef = self.params["ef_search"] * widen
            return (
                faiss.SearchParametersHNSW(sel=sel, efSearch=ef)
                if sel is not None
                else faiss.SearchParametersHNSW(efSearch=ef)
            )
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def _selector(self, speaker: str):
        if speaker not in self._selectors:
            if self.speaker_codes is None or speaker not in self.speaker_names:
                raise KeyError(f"no rows for speaker {speaker!r}")
            allowed = self.speaker_codes == self.speaker_names.index(speaker)
            bitmap = np.packbits(allowed, bitorder="little")  # faiss reads bit i&7 of byte i>>3
            sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
            self._selectors[speaker] = (sel, bitmap, int(allowed.sum()))  # keep bitmap alive with sel
        return self._selectors[speaker]

    def search(self, queries: np.ndarray, k: int = 10, speaker: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k cosine scores and row numbers, `[len(queries), k]` each, best first; a missing result
        (fewer than k rows) is row -1 with score -inf. `speaker` restricts to that speaker's rows."""
        q = unit_float32(queries)
        sel, available = None, self.ntotal
        if speaker is not None:
            sel, _bitmap, available = self._selector(speaker)
        want = min(k, available)
        widen = 1
        while True:
            params = self._search_params(sel, widen)
            scores, ids = self.index.search(q, k, params=params) if params is not None else self.index.search(q, k)
            short = (ids[:, :want] < 0).any()
            if (
                not short
                or self.kind == "exact"
                or (self.kind == "ivf" and widen * self.params["nprobe"] >= self.params["nlist"])
                or widen >= 64
            ):
                break
            widen *= 4
        rows = np.where(ids >= 0, self.rows[np.clip(ids, 0, None)], -1) if len(self.rows) else ids
        return np.where(ids >= 0, scores, -np.inf).astype(np.float32), rows.astype(np.int64)


def build_index(
    vectors: np.ndarray,
    exact_below: int = 100_000,
    kind: Kind = "auto",
    speakers: Sequence[str] | None = None,
    rows: np.ndarray | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    niter: int | None = None,
    hnsw_m: int = 32,
    ef_search: int = 128,
    progress: bool = False,
) -> VectorIndex:
    """Index `vectors[rows]` (all rows by default; float16 or float32, e.g. a store's memmap).

    `speakers`: one name per row of `vectors`, for `search(..., speaker=)`. `kind="auto"`: exact below
    `exact_below` rows, IVF above. Results come back as numbers of rows of `vectors`.
    """
    ids = np.arange(len(vectors), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    n, dim = len(ids), vectors.shape[1]
    if kind == "auto":
        kind = "exact" if n < exact_below else "ivf"
    if kind == "exact":
        index, params = faiss.IndexFlatIP(dim), {}
    elif kind == "ivf":
        params = ivf_params(n)
        params["nlist"] = min(nlist or params["nlist"], max(1, n // 39))  # FAISS wants ≥ 39 rows per list
        params["nprobe"] = min(nprobe or params["nprobe"], params["nlist"])
        params["train_rows"] = min(n, 40 * params["nlist"])
        params["niter"] = niter or params["niter"]
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, params["nlist"], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
        index.cp.spherical = True
        index.cp.niter = params["niter"]
        sample = np.sort(np.random.default_rng(0).choice(n, params["train_rows"], replace=False))
        index.train(unit_float32(vectors[ids[sample]]))
        index.nprobe = params["nprobe"]  # the faiss wrapper keeps `quantizer` alive with `index`
        params["codes"] = "fp16"
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = ef_search
        params = {"M": hnsw_m, "ef_construction": 80, "ef_search": ef_search}
    else:
        raise ValueError(f"unknown index kind {kind!r}: use auto, exact, ivf or hnsw")
    from tqdm.auto import tqdm

    with tqdm(total=n, desc=f"indexing ({kind})", unit="row", disable=not progress) as bar:
        for part in _chunks(vectors, ids):
            index.add(part)
            bar.update(len(part))
    return _wrap(index, kind, params, vectors, ids, speakers)


def _wrap(index, kind: str, params: dict, vectors, ids: np.ndarray, speakers) -> VectorIndex:
    codes, names = None, []
    if speakers is not None:
        names, inverse = np.unique(np.asarray(speakers, dtype=object)[ids].astype(str), return_inverse=True)
        names, codes = [str(s) for s in names], inverse.astype(np.int32)
    return VectorIndex(index, kind, params, ids, codes, names)


# ---------------------------------------------------------------- stores

CACHE_PREFIX = "ann-"


def index_for_store(
    store, kind: Kind = "auto", exact_below: int = 100_000, progress: bool = False, **params
) -> VectorIndex:
    """An index over a store's live rows (row numbers are the store's), speakers attached.

    An approximate index is cached beside the store as `ann-<kind>-<store checksum>.faiss`: the first
    query builds it, later ones read it. Any change to the store changes its checksum, so a stale cache
    is never read; older cache files are removed.
    """
    live = store.live_rows()
    speakers = store.speakers()
    if kind == "auto":
        kind = "exact" if len(live) < exact_below else "ivf"
    if kind == "exact":
        return build_index(store.vectors, kind="exact", speakers=speakers, rows=live)
    search_time = {k: params[k] for k in ("nprobe", "ef_search") if params.get(k) is not None}
    tag = "-".join(f"{k}{v}" for k, v in sorted(params.items()) if k not in search_time)
    cache = Path(store.path) / f"{CACHE_PREFIX}{kind}{'-' + tag if tag else ''}-{store.checksum[:16]}.faiss"
    if cache.exists():
        index = faiss.read_index(str(cache))
        if index.ntotal == len(live):
            if "nprobe" in search_time and kind == "ivf":
                faiss.extract_index_ivf(index).nprobe = search_time["nprobe"]
            if "ef_search" in search_time and kind == "hnsw":
                index.hnsw.efSearch = search_time["ef_search"]
            return _wrap(index, kind, _index_params(index, kind), store.vectors, live, speakers)
    built = build_index(store.vectors, kind=kind, speakers=speakers, rows=live, progress=progress, **params)
    with atomic_path(cache) as tmp:
        faiss.write_index(built.index, str(tmp))
    for old in Path(store.path).glob(f"{CACHE_PREFIX}*.faiss"):
        if old != cache:
            old.unlink(missing_ok=True)
    return built


def _index_params(index, kind: str) -> dict:
    if kind == "ivf":
        ivf = faiss.extract_index_ivf(index)
        return {"nlist": int(ivf.nlist), "nprobe": int(ivf.nprobe), "codes": "fp16"}
    if kind == "hnsw":
        return {
            "M": int(index.hnsw.nb_neighbors(1)),
            "ef_construction": int(index.hnsw.efConstruction),
            "ef_search": int(index.hnsw.efSearch),
        }
    return {}


@dataclass(frozen=True)
class Hit:
    row: int
    score: float
    speaker: str
    time: str | None
    text: str
    key: str


def nearest(store, index: VectorIndex, queries: np.ndarray, k: int = 10, speaker: str | None = None) -> list[list[Hit]]:
    """For each query vector, the k most similar training messages of the store, best first."""
    scores, rows = index.search(queries, k, speaker=speaker)
    out = []
    for srow, rrow in zip(scores, rows):
        hits = []
        for s, r in zip(srow, rrow):
            if r >= 0:
                rec = store.rows[r]
                hits.append(Hit(int(r), float(s), rec["speaker"], rec.get("time"), rec["text"], rec["key"]))
        out.append(hits)
    return out
