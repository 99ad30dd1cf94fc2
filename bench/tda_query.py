"""How fast and how right is a training-data-attribution query over 1M stored messages?

    python bench/tda_query.py                  # 1M × 640, about 6-8 minutes on 2 cores
    python bench/tda_query.py --n 200000       # a quicker look (results not written unless --out)
    python bench/tda_query.py --real 3000      # also embed 3000 chitchat messages with Gemma 3 270M
                                               # and print the statistics the synthetic data mimics (slow)

What it does, side by side in one run: write 1M synthetic activation-like vectors (dimension 640, Gemma 3
270M's hidden size) into a `VectorStore` in a temporary directory; build the approximate index with
`index_for_store` (timed, cached beside the store) and read it back from the cache (timed); compute
the exact top-10 of held-out queries over the same float16 rows; time single queries (batch 1) for the
approximate index, a sweep of `nprobe`, and exact search; report recall@10 of approximate vs exact.
Writes bench/results/tda_query.json.

The vectors: Gemma 3 270M's pooled activations are very anisotropic (random pairs of chitchat messages
have cosine ≈ 0.97: one shared direction dominates), so pure isotropic noise would be a poor stand-in.
`activation_like` draws from a mixture of 4000 Gaussian clusters of Zipf-like sizes: a large shared
mean, cluster centres spread with a power-law spectrum in a random basis, and per-cluster anisotropic
noise (its own scale per axis, on top of a decaying spectrum in another random basis). Its parameters
were tuned so that, on 3000 samples, the random-pair cosine, nearest-neighbour cosines (raw and
mean-centred) and the PCA spectrum match those of 3000 real chitchat messages embedded with Gemma 3
270M (layer -1, mean pool); both sets of statistics go into the JSON. Queries are fresh draws, not
rows of the index.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from convsim.tda.search import index_for_store, ivf_params
from convsim.tda.store import VectorStore

DIM = 640
RESULTS = Path(__file__).parent / "results" / "tda_query.json"
# Measured once with `--real 3000` (3000 random chitchat messages, Gemma 3 270M, layer -1, mean pool;
# 519 s on this 2-core CPU, which is why it is not part of the default run).
REAL_STATS = {
    "random_pair_cos": 0.9700,
    "random_pair_cos_sd": 0.0161,
    "top1_cos": 0.9903,
    "top10_cos": 0.9856,
    "centred_top1_cos": 0.596,
    "centred_top10_cos": 0.431,
    "pca_var_1_10_50_100": [0.084, 0.338, 0.631, 0.775],
    "raw_norm_p50": 34379.0,
    "raw_abs_max": 66094.6,
}
GENERATOR = dict(
    clusters=4000, mean_norm=8.0, centre_exponent=0.65, noise_exponent=0.5, noise=0.85, shape_sd=0.5, zipf=0.7
)


def activation_like(
    seed: int = 0,
    dim: int = DIM,
    clusters: int = 4000,
    mean_norm: float = 8.0,
    centre_exponent: float = 0.65,
    noise_exponent: float = 0.5,
    noise: float = 0.85,
    shape_sd: float = 0.5,
    zipf: float = 0.7,
):
    """A sampler `draw(n, rng) -> float32 [n, dim]` of clustered, anisotropic, activation-like vectors."""
    rng = np.random.default_rng(seed)

    def rotation():
        q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        return q

    def spectrum(exponent):
        s = (np.arange(dim) + 1.0) ** -exponent
        return s * np.sqrt(dim / np.sum(s**2))

    mean = rng.normal(size=dim)
    mean *= mean_norm * np.sqrt(dim) / np.linalg.norm(mean)
    centres = mean + rng.normal(size=(clusters, dim)) @ (rotation() * spectrum(centre_exponent)).T
    centres = centres.astype(np.float32)
    basis = rotation().astype(np.float32)
    shape = np.exp(rng.normal(0, shape_sd, size=(clusters, dim))) * spectrum(noise_exponent)
    shape *= (np.exp(rng.normal(0, 0.3, size=clusters)) * noise / np.sqrt(np.mean(shape**2, axis=1)))[:, None]
    shape = shape.astype(np.float32)
    weights = rng.permutation((np.arange(clusters) + 1.0) ** -zipf)
    weights /= weights.sum()

    def draw(n: int, rng2: np.random.Generator) -> np.ndarray:
        labels = rng2.choice(clusters, size=n, p=weights)
        out = np.empty((n, dim), dtype=np.float32)
        for a in range(0, n, 50_000):
            lab = labels[a : a + 50_000]
            g = rng2.standard_normal((len(lab), dim), dtype=np.float32) * shape[lab]
            out[a : a + 50_000] = centres[lab] + g @ basis.T
        return out

    return draw


def shape_stats(x: np.ndarray) -> dict:
    """The statistics the generator was tuned on (first 200 rows against the rest)."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = u[:200] @ u[200:].T
    top = -np.sort(-sims, axis=1)
    centred = u - u.mean(0)
    c = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    ctop = -np.sort(-(c[:200] @ c[200:].T), axis=1)
    ev = np.linalg.svd(centred, compute_uv=False) ** 2
    ev /= ev.sum()
    r = lambda v: round(float(v), 4)  # noqa: E731
    return {
        "random_pair_cos": r(sims.mean()),
        "random_pair_cos_sd": r(sims.std()),
        "top1_cos": r(top[:, 0].mean()),
        "top10_cos": r(top[:, 9].mean()),
        "centred_top1_cos": r(ctop[:, 0].mean()),
        "centred_top10_cos": r(ctop[:, 9].mean()),
        "pca_var_1_10_50_100": [r(ev[0]), r(ev[:10].sum()), r(ev[:50].sum()), r(ev[:100].sum())],
    }


def real_stats(n: int) -> dict:
    """Embed n random chitchat messages with the embedded Gemma 3 270M and describe them."""
    import chitchat_dataset

    from convsim.modeling.activations import embed_texts
    from convsim.modeling.models import load

    data = json.loads(Path(chitchat_dataset._PATH).read_text())
    texts = [m["text"] for conv in data.values() for turn in conv["messages"] for m in turn]
    pick = np.random.default_rng(0).choice(len(texts), n, replace=False)
    model, tok = load("gemma-3-270m")
    x = embed_texts(model, tok, [texts[i] for i in pick], layer=-1, pool="mean", batch_size=64, progress=True)
    norms = np.linalg.norm(x, axis=1)
    return shape_stats(x) | {"raw_norm_p50": float(np.median(norms)), "raw_abs_max": float(np.abs(x).max())}


def timed_single(index_search, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Milliseconds per single query (batch 1), after one warm-up query."""
    index_search(queries[:1], k)
    out = []
    for q in queries:
        t0 = time.perf_counter()
        index_search(q[None, :], k)
        out.append((time.perf_counter() - t0) * 1e3)
    return np.array(out)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="stored vectors")
    ap.add_argument("--queries", type=int, default=500, help="held-out queries (recall and ANN latency)")
    ap.add_argument("--exact-queries", type=int, default=30, help="single queries timed for exact search")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--real", type=int, default=0, help="also embed this many real messages (slow)")
    ap.add_argument("--dir", default=None, help="where to build the store (default: a temporary directory)")
    ap.add_argument("--out", default=None, help=f"results file (default {RESULTS} for --n 1000000)")
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    k = 10
    t_start = time.time()
    load_before = os.getloadavg()

    draw = activation_like(**GENERATOR)
    calibration = shape_stats(draw(3000, np.random.default_rng(7)))
    real = real_stats(args.real) if args.real else None

    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="tda-bench-"))
    try:
        # ---- the store: 1M rows, written in 4 appends like an incremental update would
        t0 = time.time()
        store = VectorStore.create(
            workdir / "store",
            DIM,
            {"model": "synthetic", "adapter_hash": None, "layer": -1, "pool": "mean"},
            overwrite=True,
        )
        rng = np.random.default_rng(1)
        step = max(1, args.n // 4)
        for a in range(0, args.n, step):
            m = min(step, args.n - a)
            records = [
                {
                    "speaker": "Ana" if (i * 2654435761) % 100 < 55 else "Ben",
                    "time": f"2024-01-01T00:00:00+{i}",
                    "text": f"synthetic message {i}",
                }
                for i in range(a, a + m)
            ]
            store.add(records, draw(m, rng))
            print(f"  store: {a + m:,} / {args.n:,} rows", flush=True)
        store_s = time.time() - t0
        t0 = time.time()
        store = VectorStore.open(workdir / "store", expect={"dim": DIM, "layer": -1, "pool": "mean"})
        open_s = time.time() - t0
        queries = draw(args.queries, np.random.default_rng(2))

        # ---- approximate index: build (and cache), then read back from the cache
        t0 = time.time()
        ann = index_for_store(store, kind="ivf", progress=True)
        build_s = time.time() - t0
        t0 = time.time()
        ann = index_for_store(store, kind="ivf")
        cache_load_s = time.time() - t0
        print(
            f"  ivf: built in {build_s:.1f} s, read from cache in {cache_load_s:.1f} s ({ann.describe()})", flush=True
        )

        # ---- exact ground truth over the same float16 rows
        t0 = time.time()
        exact = index_for_store(store, kind="exact")
        exact_build_s = time.time() - t0
        t0 = time.time()
        _, truth = exact.search(queries, k)
        exact_batch_s = time.time() - t0
        exact_ms = timed_single(exact.search, queries[: args.exact_queries], k)
        print(
            f"  exact: ground truth in {exact_batch_s:.1f} s, single query p50 {np.median(exact_ms):.1f} ms", flush=True
        )
        del exact

        # ---- approximate: the default nprobe, then a sweep
        _, found = ann.search(queries, k)
        recall = recall_at(found, truth)
        ann_ms = timed_single(ann.search, queries, k)
        default_nprobe = ann.params["nprobe"]
        sweep = []
        ivf = faiss.extract_index_ivf(ann.index)
        for nprobe in sorted({8, 16, 24, default_nprobe, 48, 64}):
            ivf.nprobe = nprobe
            ann.params["nprobe"] = nprobe
            ms = timed_single(ann.search, queries[:200], k)
            sweep.append(
                {
                    "nprobe": nprobe,
                    "recall_at_10": round(recall_at(ann.search(queries, k)[1], truth), 4),
                    "p50_ms": round(float(np.median(ms)), 2),
                    "p95_ms": round(float(np.percentile(ms, 95)), 2),
                }
            )
        ivf.nprobe = ann.params["nprobe"] = default_nprobe
        speaker_ms = timed_single(lambda q, kk: ann.search(q, kk, speaker="Ben"), queries[:200], k)
        _, ben = ann.search(queries[:50], k, speaker="Ben")
        assert (np.array(store.speakers(), dtype=object)[ben] == "Ben").all()
        load_after = os.getloadavg()
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = [("exact (IndexFlatIP)", float(np.median(exact_ms)), float(np.percentile(exact_ms, 95)), 1.0)]
    rows += [
        (
            f"ivf nprobe={s['nprobe']}" + (" (default)" if s["nprobe"] == default_nprobe else ""),
            s["p50_ms"],
            s["p95_ms"],
            s["recall_at_10"],
        )
        for s in sweep
    ]
    rows += [
        ("ivf default, speaker='Ben'", float(np.median(speaker_ms)), float(np.percentile(speaker_ms, 95)), float("nan"))
    ]
    print(f"\n{args.n:,} vectors × {DIM}, {args.threads} threads, single queries (batch 1), top-{k}")
    print(f"{'search':<30}{'p50 ms':>9}{'p95 ms':>9}{'recall@10':>11}")
    for name, p50, p95, rec in rows:
        print(f"{name:<30}{p50:>9.2f}{p95:>9.2f}{rec:>11.4f}")
    print(
        f"ivf build {build_s:.1f} s (cache read {cache_load_s:.1f} s); store write {store_s:.1f} s, "
        f"open {open_s:.1f} s; exact is {np.median(exact_ms) / np.median(ann_ms):.0f}× slower than ivf"
    )

    result = {
        "query_ms_p50_1m": round(float(np.median(ann_ms)), 3),
        "query_ms_p95_1m": round(float(np.percentile(ann_ms, 95)), 3),
        "ann_recall_at_10": round(recall, 4),
        "exact_query_ms_p50_1m": round(float(np.median(exact_ms)), 2),
        "exact_query_ms_p95_1m": round(float(np.percentile(exact_ms, 95)), 2),
        "build_s": round(build_s, 1),
        "index": f"faiss IndexIVFScalarQuantizer(QT_fp16) over IndexFlatIP, inner product on L2-normalised rows; "
        f"{ann.describe()}; k-means: spherical, {ivf_params(args.n)['niter']} iterations on 40 rows per list; "
        f"cached with faiss.write_index beside the store, read back in {cache_load_s:.1f} s",
        "vectors": f"{args.n:,} synthetic float16 vectors, dim {DIM}: mixture of {GENERATOR['clusters']} Gaussian "
        f"clusters (Zipf-like sizes, exponent {GENERATOR['zipf']}), large shared mean, power-law spread "
        f"of centres in a random basis, per-cluster anisotropic noise; tuned so that shape statistics "
        f"on 3000 samples match 3000 real chitchat messages embedded with Gemma 3 270M (layer -1, mean "
        f"pool). Queries: {args.queries} fresh draws from the same distribution (not in the index); "
        f"recall vs exact search over the same float16 rows.",
        "machine": f"2-core CPU, this container ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores seen), shared with other sessions' jobs: 1-min load average "
        f"{load_before[0]:.1f} at start, {load_after[0]:.1f} at end",
        "command": "python bench/tda_query.py" + (f" --n {args.n}" if args.n != 1_000_000 else ""),
        "n": args.n,
        "dim": DIM,
        "k": k,
        "threads": args.threads,
        "queries_timed": {"ivf": len(ann_ms), "exact": len(exact_ms)},
        "speaker_filtered_ms_p50": round(float(np.median(speaker_ms)), 3),
        "nprobe_sweep": sweep,
        "store_write_s": round(store_s, 1),
        "store_open_s": round(open_s, 1),
        "ivf_cache_load_s": round(cache_load_s, 1),
        "exact_index_build_s": round(exact_build_s, 1),
        "exact_batch_ground_truth_s": round(exact_batch_s, 1),
        "generator": GENERATOR,
        "synthetic_stats": calibration,
        "real_stats": real or REAL_STATS,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "total_s": round(time.time() - t_start, 1),
    }
    out = Path(args.out) if args.out else (RESULTS if args.n == 1_000_000 else None)
    if out:
        from convsim.fsutil import write_json

        write_json(out, result, private=False)
        os.chmod(out, 0o644)  # a result file in the repo, not private data (mkstemp makes it 0600)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
