"""The activation store: one vector per training message, float16 on disk, found by content hash.
(Longer than most modules: the file format, its crash-safe append and its checks are one commit protocol,
clearer in one place than spread over files.)

    from convsim.tda.store import VectorStore, StaleStore, CorruptStore
    meta = {"model": "gemma-3-270m", "adapter_hash": "ab12…", "layer": -1, "pool": "mean"}
    try:
        store = VectorStore.open("runs/x/tda", expect={**meta, "dim": 640})
    except (NoStore, StaleStore, CorruptStore):
        store = VectorStore.create("runs/x/tda", dim=640, meta=meta, overwrite=True)
    store.update(messages, embed=lambda recs: embed_texts(model, tok, [r.text for r in recs]))

A directory holds two files:

- `vectors.f16`: raw float16 rows `[n, dim]`, read through `np.memmap`. Rows are L2-normalised on the
  way in: cosine is the only similarity we use, and unit rows cannot overflow float16.
- `index.json`: `{"checksum": sha256 of the rest of the file, "version", "dim", "meta", "n",
  "vectors": data file name, "rows": [{"key", "speaker", "time", "text"}], "dead": [rows masked out],
  "chunks": [[start, end, sha256]], "sample": {"rows", "sha256"}}`.

`index.json` is the one commit point, always replaced whole (temp file + `os.replace`). An append
writes its rows past the committed `n` first, so a crash before the commit leaves the old store (the
extra bytes are ignored, then overwritten by the next append). A rewrite (`compact`, `create(...,
overwrite=True)`) goes to the other of two data file names and commits an index naming it, so the old
pair stays whole until the new one is committed. Opening checks, cheaply: the index hash (an edited or
damaged index), the data file size (truncation) and the hash of a few sampled rows; `verify(full=True)`
re-hashes every chunk. Meta that differs from what the caller expects raises `StaleStore`; damage
raises `CorruptStore`; neither store is ever used silently. One writer at a time.

One module: the file format, its crash safety and its validation are one thing to read and to change.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from convsim.errors import UserError
from convsim.fsutil import PRIVATE_FILE, atomic_path, private_dir

VERSION = 1
INDEX = "index.json"
DATA_FILES = ("vectors.f16", "vectors.1.f16")  # a rewrite goes to the one the index does not name
SAMPLE_ROWS = 16
_PREFIX = b'{"checksum":"'  # index.json starts with the checksum of what follows it
_HEAD = len(_PREFIX) + 64 + 2  # + hex digest + '",'


class StoreError(UserError):
    """The activation store cannot be used as it is."""


class NoStore(StoreError):
    """There is no store in this directory yet."""


class StaleStore(StoreError):
    """The store was built for another model, adapter, layer, pooling or dimension: rebuild it."""


class CorruptStore(StoreError):
    """The store's files are damaged, truncated or edited: rebuild it."""


# ---------------------------------------------------------------- records and vectors


def content_key(speaker: str, time: str | None, text: str) -> str:
    """sha256 hex of (speaker, time, text): the same message always gets the same key."""
    blob = json.dumps([speaker, time, text], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def record_fields(record: Any) -> tuple[str, str | None, str]:
    """(speaker, time, text) of a `Message`-like object or a dict."""
    if isinstance(record, dict):
        return str(record["speaker"]), record.get("time"), str(record["text"])
    return str(record.speaker), getattr(record, "time", None), str(record.text)


def record_key(record: Any) -> str:
    return content_key(*record_fields(record))


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 copy with each row scaled to length 1 (zero rows stay zero)."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)


def _sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _sample_rows(n: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, n - 1, min(n, SAMPLE_ROWS)).round()}) if n else []


def _read_rows(path: Path, n: int, dim: int) -> np.ndarray:
    if n == 0:
        return np.zeros((0, dim), dtype=np.float16)
    return np.memmap(path, dtype=np.float16, mode="r", shape=(n, dim))


def _sample(path: Path, n: int, dim: int) -> dict:
    rows = _sample_rows(n)
    data = np.ascontiguousarray(_read_rows(path, n, dim)[rows]) if rows else np.zeros(0, np.float16)
    return {"rows": rows, "sha256": _sha(data.tobytes())}


# ---------------------------------------------------------------- index file


def _encode_index(body: dict) -> bytes:
    rest = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")[1:]
    return _PREFIX + _sha(rest).encode() + b'",' + rest


def _decode_index(raw: bytes, where: Path) -> tuple[dict, str]:
    """(body, checksum) of an index file's bytes."""
    if not raw.startswith(_PREFIX) or raw[_HEAD - 2 : _HEAD] != b'",':
        raise CorruptStore(f"{where} is not a convsim activation index: rebuild the store")
    if _sha(raw[_HEAD:]).encode() != raw[len(_PREFIX) : _HEAD - 2]:
        raise CorruptStore(f"{where} was edited or damaged (checksum mismatch): rebuild the store")
    try:
        body = json.loads(b"{" + raw[_HEAD:])
    except ValueError as e:
        raise CorruptStore(f"{where} is not valid JSON ({e}): rebuild the store") from None
    return body, raw[len(_PREFIX) : _HEAD - 2].decode()


def _write_index(directory: Path, body: dict) -> str:
    """The commit point of every change; returns the new checksum."""
    raw = _encode_index(body)
    with atomic_path(directory / INDEX) as tmp:
        tmp.write_bytes(raw)
    return raw[len(_PREFIX) : _HEAD - 2].decode()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _comparable(value: Any) -> Any:
    return json.loads(json.dumps(value))


# ---------------------------------------------------------------- the store


@dataclass
class VectorStore:
    """An opened store. Read with `vectors`, `rows`, `live_rows()`; change with `add`, `retain`, `compact`."""

    path: Path
    dim: int
    meta: dict
    rows: list[dict]
    dead: set[int]
    data_file: str
    chunks: list[list]
    checksum: str
    _key_row: dict[str, int] = field(default_factory=dict, repr=False)

    # -------------------------------------------------------- open / create

    @classmethod
    def create(cls, path: str | os.PathLike, dim: int, meta: dict, overwrite: bool = False) -> "VectorStore":
        """An empty store. An existing one is replaced only with `overwrite` (atomically: the old store
        stays whole until the new index is committed)."""
        directory = Path(path)
        current = None
        if (directory / INDEX).exists():
            if not overwrite:
                raise StoreError(f"{directory} already holds an activation store (pass overwrite=True)")
            try:
                current = _decode_index((directory / INDEX).read_bytes(), directory / INDEX)[0].get("vectors")
            except StoreError:
                current = None
        private_dir(directory)
        data_file = DATA_FILES[1] if current == DATA_FILES[0] else DATA_FILES[0]
        target = directory / data_file
        with open(target, "wb") as f:
            os.fsync(f.fileno())
        os.chmod(target, PRIVATE_FILE)
        body = {
            "version": VERSION,
            "dim": int(dim),
            "meta": _comparable(meta),
            "n": 0,
            "vectors": data_file,
            "rows": [],
            "dead": [],
            "chunks": [],
            "sample": _sample(target, 0, dim),
        }
        store = cls._from_body(directory, body, _write_index(directory, body))
        store._remove_unused_files()
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, expect: dict | None = None) -> "VectorStore":
        """Open and check a store. `expect`: meta values the caller needs (and "dim"); any difference
        raises `StaleStore`. Damage raises `CorruptStore`; no store at all raises `NoStore`."""
        directory = Path(path)
        index = directory / INDEX
        if not index.exists():
            raise NoStore(f"no activation store in {directory}")
        body, checksum = _decode_index(index.read_bytes(), index)
        if body.get("version") != VERSION:
            raise StaleStore(
                f"{directory} was written by store version {body.get('version')}, this is {VERSION}: rebuild it"
            )
        try:
            n, dim, data_file = int(body["n"]), int(body["dim"]), str(body["vectors"])
            ok = (
                len(body["rows"]) == n
                and data_file in DATA_FILES
                and isinstance(body["meta"], dict)
                and all(0 <= int(r) < n for r in body["dead"])
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CorruptStore(f"{index} is inconsistent: rebuild the store")
        if expect:
            have = {**body["meta"], "dim": dim}
            diff = {k: (have.get(k), v) for k, v in _comparable(expect).items() if have.get(k) != v}
            if diff:
                what = ", ".join(f"{k}: store has {a!r}, expected {b!r}" for k, (a, b) in diff.items())
                raise StaleStore(f"{directory} was built for something else ({what}): rebuild it")
        data = directory / data_file
        size = data.stat().st_size if data.exists() else -1
        if size < n * dim * 2:
            raise CorruptStore(f"{data} is truncated ({max(size, 0)} bytes, expected {n * dim * 2}): rebuild the store")
        if _sample(data, n, dim) != body["sample"]:
            raise CorruptStore(f"{data} does not match its index (sampled rows differ): rebuild the store")
        return cls._from_body(directory, body, checksum)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, dim: int, meta: dict, rebuild: bool = True) -> "VectorStore":
        """Open the store if it matches `meta` and `dim`; otherwise start an empty one (with `rebuild`)
        or raise."""
        try:
            return cls.open(path, expect={**meta, "dim": dim})
        except NoStore:
            return cls.create(path, dim, meta)
        except (StaleStore, CorruptStore):
            if not rebuild:
                raise
            return cls.create(path, dim, meta, overwrite=True)

    @classmethod
    def _from_body(cls, directory: Path, body: dict, checksum: str) -> "VectorStore":
        rows = body["rows"]
        store = cls(
            directory,
            int(body["dim"]),
            body["meta"],
            rows,
            set(int(r) for r in body["dead"]),
            body["vectors"],
            [list(c) for c in body["chunks"]],
            checksum,
        )
        store._key_row = {r["key"]: i for i, r in enumerate(rows)}
        return store

    def _body(self, rows: list[dict], dead: Iterable[int], data_file: str, chunks: list[list]) -> dict:
        n = len(rows)
        return {
            "version": VERSION,
            "dim": self.dim,
            "meta": self.meta,
            "n": n,
            "vectors": data_file,
            "rows": rows,
            "dead": sorted(int(r) for r in dead),
            "chunks": chunks,
            "sample": _sample(self.path / data_file, n, self.dim),
        }

    def _commit(self, body: dict) -> None:
        fresh = self._from_body(self.path, body, _write_index(self.path, body))
        self.__dict__.update(fresh.__dict__)
        self._remove_unused_files()

    def _remove_unused_files(self) -> None:
        for name in DATA_FILES:
            if name != self.data_file:
                (self.path / name).unlink(missing_ok=True)

    # -------------------------------------------------------- reading

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def vectors(self) -> np.ndarray:
        """All rows (dead ones too), float16 `[n, dim]`, memory-mapped read-only."""
        return _read_rows(self.path / self.data_file, self.n, self.dim)

    def live_rows(self) -> np.ndarray:
        """Row numbers that queries may return (not masked by `retain`)."""
        live = np.ones(self.n, dtype=bool)
        live[list(self.dead)] = False
        return np.flatnonzero(live)

    def speakers(self) -> list[str]:
        return [r["speaker"] for r in self.rows]

    def row_of(self, record: Any) -> int | None:
        return self._key_row.get(record_key(record))

    def verify(self, full: bool = False) -> None:
        """Raise `CorruptStore` unless the files check out; `full` re-hashes every row (reads it all)."""
        type(self).open(self.path)
        if full:
            vec = self.vectors
            for start, end, digest in self.chunks:
                if _sha(np.ascontiguousarray(vec[start:end]).tobytes()) != digest:
                    raise CorruptStore(
                        f"{self.path / self.data_file} rows {start}..{end} were changed: rebuild the store"
                    )

    # -------------------------------------------------------- changing

    def missing(self, records: Sequence[Any]) -> list[int]:
        """Positions in `records` whose message has no vector yet (first of any duplicates)."""
        seen: set[str] = set()
        out = []
        for i, rec in enumerate(records):
            key = record_key(rec)
            if key not in self._key_row and key not in seen:
                seen.add(key)
                out.append(i)
        return out

    def add(self, records: Sequence[Any], vectors: np.ndarray) -> list[int]:
        """Append vectors for records not in the store yet; returns their row numbers (others skipped).
        A record already present but masked is revived. Vectors are stored L2-normalised."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape != (len(records), self.dim):
            raise ValueError(f"expected vectors of shape ({len(records)}, {self.dim}), got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ValueError("vectors contain NaN or infinity")
        take, revive, seen = [], set(), set()
        for i, rec in enumerate(records):
            key = record_key(rec)
            if key in self._key_row:
                revive.add(self._key_row[key])
            elif key not in seen:
                seen.add(key)
                take.append(i)
        if not take and not (revive & self.dead):
            return []
        n = self.n
        new = unit_rows(vectors[take]).astype(np.float16)
        data = self.path / self.data_file
        with open(data, "r+b" if data.exists() else "wb") as f:
            f.seek(n * self.dim * 2)  # past the committed rows: a crash before the commit
            f.write(new.tobytes())  # leaves the old store whole
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        rows = self.rows + [
            dict(zip(("speaker", "time", "text"), record_fields(records[i])), key=record_key(records[i])) for i in take
        ]
        chunks = self.chunks + ([[n, n + len(take), _sha(new.tobytes())]] if take else [])
        self._commit(self._body(rows, self.dead - revive, self.data_file, chunks))
        return list(range(n, n + len(take)))

    def retain(self, records: Iterable[Any]) -> int:
        """Mask the rows whose message is not among `records` (text changed or removed) so queries skip
        them; unmask rows whose message is back. Returns how many rows are masked now."""
        keep = {record_key(r) for r in records}
        dead = {i for i, r in enumerate(self.rows) if r["key"] not in keep}
        if dead != self.dead:
            self._commit(self._body(self.rows, dead, self.data_file, self.chunks))
        return len(dead)

    def set_meta(self, meta: dict) -> None:
        """Replace the store's meta (one commit; the rows stay as they are)."""
        body = self._body(self.rows, self.dead, self.data_file, self.chunks)
        self._commit({**body, "meta": _comparable(meta)})

    def compact(self) -> int:
        """Drop masked rows for good (rewrites the data file); returns how many were dropped."""
        if not self.dead:
            return 0
        live = self.live_rows()
        target = DATA_FILES[1] if self.data_file == DATA_FILES[0] else DATA_FILES[0]
        src, chunks = self.vectors, []
        with open(self.path / target, "wb") as f:
            for start in range(0, len(live), 65536):
                block = np.ascontiguousarray(src[live[start : start + 65536]])
                f.write(block.tobytes())
                chunks.append([start, start + len(block), _sha(block.tobytes())])
            f.flush()
            os.fsync(f.fileno())
        os.chmod(self.path / target, PRIVATE_FILE)
        dropped = len(self.dead)
        self._commit(self._body([self.rows[i] for i in live], (), target, chunks))
        return dropped

    def update(self, records: Sequence[Any], embed: Callable[[list[Any]], np.ndarray], chunk: int = 10_000) -> dict:
        """Bring the store in line with `records`: mask rows no longer there, embed and add the missing
        ones `chunk` at a time (each chunk committed, so an interrupted update resumes where it stopped).
        `embed(records) -> [len, dim]`. Returns counts."""
        masked = self.retain(records)
        todo = self.missing(records)
        for start in range(0, len(todo), chunk):
            part = [records[i] for i in todo[start : start + chunk]]
            self.add(part, embed(part))
        return {"added": len(todo), "masked": masked, "live": len(self.live_rows()), "rows": self.n}
