"""Gallery search latency at scale: exact and approximate, 1 and 100 queries, on clustered 512-d vectors.

For each gallery size (``--sizes``, default 100k and 1M) a seeded gallery of L2-normalised vectors is drawn
around ``--clusters`` centres (image embeddings are clustered, and clustered data is where approximate search
loses recall); queries are fresh draws from the same distribution. It times the calls ``GalleryIndex`` makes:

* exact: ``cirlab.evaluation.ranking.topk_inner_product`` (faiss exhaustive search, BLAS for batches);
* baseline: a bare ``faiss.IndexFlatIP.search`` over the same array, measured in the same run;
* approximate: ``cirlab.index.ann.build_ann`` (HNSW and IVF, search knob tuned at build time to recall@50 >= 0.95
  on sample queries) then ``ann_search``; recall@50 is measured again here on the benchmark's own queries.

Each latency is the p50 and p95 of ``--repeats`` searches of 1 query and of a batch of 100 queries (k = 50).
Targets: approximate recall@50 vs exact >= 0.95; exact within 1.25x of the bare faiss baseline.

Usage:
    python benchmarks/bench_index_search.py [--sizes 100000 1000000 --dim 512 --kinds hnsw ivf --repeats 30]
"""

from __future__ import annotations

import argparse
import sys
import time

import faiss
import numpy as np

from cirlab.evaluation.ranking import topk_inner_product
from cirlab.index.ann import AnnConfig, ann_recall_at_k, ann_search, build_ann

K = 50
RECALL_TARGET = 0.95
EXACT_TARGET = 1.25


def clustered(n: int, centres: np.ndarray, spread: float, rng: np.random.Generator, chunk: int = 100_000) -> np.ndarray:
    """(n, dim) float32 unit vectors around random ``centres``, drawn a chunk at a time."""
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        noise = rng.standard_normal((m, centres.shape[1]), dtype=np.float32)
        block = centres[rng.integers(0, len(centres), m)] + spread * noise
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def latencies(search, queries: np.ndarray, batch: int, repeats: int, rng) -> tuple[float, float]:
    """p50 and p95 milliseconds of ``search(batch of queries)`` over ``repeats`` random batches."""
    times = []
    search(queries[:batch])  # warm-up
    for _ in range(repeats):
        q = queries[rng.integers(0, len(queries), batch)]
        start = time.perf_counter()
        search(q)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=0.035, help="per-dimension noise around a unit centre")
    parser.add_argument("--kinds", nargs="+", default=["hnsw", "ivf"])
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    failures = []
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads, k={K}, dim={args.dim}")
    for n in args.sizes:
        t0 = time.perf_counter()
        rng = np.random.default_rng(args.seed)
        centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        gallery = clustered(n, centres, args.spread, rng)
        queries = clustered(1000, centres, args.spread, rng)  # fresh draws from the same clusters
        made = time.perf_counter() - t0
        print(f"\n== {n:,} x {args.dim} gallery ({gallery.nbytes / 2**30:.2f} GiB), made in {made:.0f} s")
        exact = topk_inner_product(queries, gallery, K)
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(gallery)
        saved = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = 20

        def bare(q, flat=flat):
            return flat.search(q, K)

        rows = {
            "bare faiss flat (baseline)": bare,
            "cirlab exact": lambda q, g=gallery: topk_inner_product(q, g, K),
        }
        results = {
            name: {b: latencies(fn, queries, b, args.repeats, rng) for b in (1, 100)} for name, fn in rows.items()
        }
        faiss.cvar.distance_compute_blas_threshold = saved
        del flat
        recalls: dict[str, float] = {"cirlab exact": 1.0}
        for kind in args.kinds:
            t0 = time.perf_counter()
            index, report = build_ann(
                gallery, AnnConfig(kind=kind, k=K, target_recall=RECALL_TARGET, hnsw_m=args.hnsw_m)
            )
            build_s = time.perf_counter() - t0
            name = f"cirlab {kind} ({', '.join(f'{k}={v}' for k, v in report.params.items())})"
            scores, _ = ann_search(index, queries, K)
            recalls[name] = ann_recall_at_k(scores, exact.scores, K)
            print(f"{kind}: built and tuned in {build_s:.0f} s; build-time recall@{K} {report.recall:.3f}")
            results[name] = {
                b: latencies(lambda q, i=index: ann_search(i, q, K), queries, b, args.repeats, rng) for b in (1, 100)
            }
            del index
        base = results["bare faiss flat (baseline)"]
        print(f"{'search':<44} {'1 q p50':>8} {'p95':>8} {'100 q p50':>10} {'p95':>8} {'vs base':>8} {'recall@50':>10}")
        for name, r in results.items():
            ratio = r[100][0] / base[100][0]
            recall = recalls.get(name)
            print(
                f"{name:<44} {r[1][0]:8.2f} {r[1][1]:8.2f} {r[100][0]:10.2f} {r[100][1]:8.2f} {ratio:7.2f}x"
                f" {'' if recall is None else f'{recall:10.3f}'}"
            )
            if recall is not None and recall < RECALL_TARGET:
                failures.append(f"{n:,}: {name} recall@{K} {recall:.3f} < {RECALL_TARGET}")
        exact_ratio = results["cirlab exact"][100][0] / base[100][0]
        if exact_ratio > EXACT_TARGET:
            failures.append(f"{n:,}: cirlab exact is {exact_ratio:.2f}x the bare baseline (target {EXACT_TARGET})")
        del gallery
    print("\n(latencies in ms; 'vs base' is the 100-query p50 over the bare faiss flat p50)")
    if failures:
        print("MISSED:", *failures, sep="\n  ")
        sys.exit(1)
    print(f"all targets met: approximate recall@{K} >= {RECALL_TARGET}, exact within {EXACT_TARGET}x of bare faiss")


if __name__ == "__main__":
    main()
