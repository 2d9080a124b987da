"""Ranking at CIRCO scale: time and peak memory of the evaluator's ranking before and after the one ranking path.

A seeded random gallery the size of CIRCO's (123,403 x 768, float32, L2-normalised) and 800 unit queries are ranked
top-50 four ways in the same run:

* ``before``: the evaluator's path until the one ranking module (kept below as :func:`before_full_matrix_topk`, a
  copy of ``evaluate.score_matrix`` + ``protocols.topk_indices``): the full (Q, N) float32 score matrix from
  ``torch`` then an exact top-k of each block of rows;
* ``after``: :func:`cirlab.evaluation.ranking.topk_inner_product` with ``precision="auto"`` (bfloat16 pass and exact
  float32 re-rank where the CPU has native bfloat16, float32 elsewhere) on a
  :class:`~cirlab.evaluation.ranking.RankingGallery` whose bfloat16 copy was made once beforehand, as faiss' index
  copies its vectors once in ``add`` (the one-off conversion time is printed apart);
* ``after, fp32``: the same with ``precision="fp32"`` (the float32 backend ``"auto"`` picks: faiss when installed);
* ``bare faiss``: ``faiss.IndexFlatIP.search`` (BLAS threshold 20) over the same gallery, same threads.

Every search is warmed up once, then the searches run interleaved for ``--repeats`` rounds and each reports its best
time. Peak memory is the largest resident-set growth above the start of the call (sampled every millisecond; it sees
torch's and faiss' allocations) and the tracemalloc peak (numpy's). Targets: ``after`` at most 0.65x bare faiss
when the bfloat16 pass ran, and every top-50 equal to bare faiss' up to tied scores (the sorted float64 scores of
the two id lists of every query agree within 1e-5).

Usage:
    python benchmarks/bench_ranking.py [--n-gallery 123403 --dim 768 --n-queries 800 --k 50 --repeats 3]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from cirlab.evaluation.ranking import (
    FAISS_BLAS_THRESHOLD,
    NATIVE_BF16_FLAGS,
    RankingGallery,
    cpu_flags,
    resolve_backend,
    resolve_precision,
    topk_inner_product,
)

TARGET_RATIO = 0.65
TIE_TOLERANCE = 1e-5  # float32 inner products of unit vectors: BLAS libraries differ by ~1e-7
SHOWN_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", *sorted(NATIVE_BF16_FLAGS), "amx_int8")


def unit_rows(rng: np.random.Generator, n: int, dim: int, chunk: int = 16384) -> np.ndarray:
    """(n, dim) float32 rows uniformly on the unit sphere, generated a chunk at a time."""
    out = np.empty((n, dim), dtype=np.float32)  # (n, dim)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


# --- "before": the evaluator's ranking as it was, copied here as the baseline ---------------------------------------


def _before_topk_block(block: np.ndarray, k: int) -> np.ndarray:
    """protocols._topk_block before the one ranking path: top-k columns per row, ties to the lower index."""
    n = block.shape[1]
    if k >= n:
        return np.argsort(-block, axis=1, kind="stable")
    kth = np.partition(block, n - k, axis=1)[:, n - k]
    out = np.empty((block.shape[0], k), dtype=np.int64)
    for r in range(block.shape[0]):
        candidates = np.flatnonzero(block[r] >= kth[r])
        order = np.argsort(-block[r, candidates], kind="stable")
        out[r] = candidates[order[:k]]
    return out


def before_full_matrix_topk(queries: Any, gallery: Any, k: int, rows: int = 256) -> np.ndarray:
    """BASELINE, not cirlab's path any more: ``evaluate.score_matrix`` (the full (Q, N) matrix) then
    ``protocols.topk_indices`` (blocks of 256 rows), as the evaluator ranked CIRCO before."""
    import torch

    with torch.no_grad():
        scores = (queries @ gallery.t()).numpy().astype(np.float32, copy=False)  # (Q, N)
    return np.concatenate([_before_topk_block(scores[s : s + rows], k) for s in range(0, len(scores), rows)])


# --- measuring ------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    """Runs ``fn`` once; returns its result, the peak resident-set growth and the tracemalloc peak, in bytes."""
    start = _rss_bytes()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    tracemalloc.start()
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return result, max(peak[0], _rss_bytes()) - start, traced


def best_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` interleaved rounds, after one warm-up call each.

    Rounds interleave the functions, so a burst of load from other processes on the machine hits all of them
    rather than whichever happened to run during it.
    """
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def agreement(gallery: np.ndarray, queries: np.ndarray, ids: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(fraction of identical id rows, largest gap between the two rows' sorted float64 score profiles).

    Two exact searches may order or cut tied scores differently; their score profiles must still match.
    """
    q64 = queries.astype(np.float64)
    gaps = []
    for r in range(len(queries)):
        mine = np.sort(gallery[ids[r]].astype(np.float64) @ q64[r])
        theirs = np.sort(gallery[reference[r]].astype(np.float64) @ q64[r])
        gaps.append(np.abs(mine - theirs).max())
    return float((ids == reference).all(axis=1).mean()), float(max(gaps))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-gallery", type=int, default=123_403)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--n-queries", type=int, default=800)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import faiss
    import torch

    rng = np.random.default_rng(args.seed)
    gallery = unit_rows(rng, args.n_gallery, args.dim)  # (N, d)
    queries = unit_rows(rng, args.n_queries, args.dim)  # (Q, d)
    flags = cpu_flags()
    print(f"gallery {args.n_gallery:,} x {args.dim}, {args.n_queries} queries, top-{args.k}, float32, unit norm")
    shown = " ".join(f"{flag}={'yes' if flag in flags else 'no'}" for flag in SHOWN_FLAGS)
    print(f"CPU flags: {shown}")
    print(f"torch {torch.__version__} (oneDNN {torch.backends.mkldnn.is_available()}), faiss {faiss.__version__}")
    print(f"threads: torch {torch.get_num_threads()}, faiss (OpenMP) {faiss.omp_get_max_threads()}")
    precision = resolve_precision("auto", queries, args.n_gallery)
    fp32_backend = resolve_backend("auto", queries, gallery)
    print(f"path chosen by precision='auto': {precision} (float32 backend: {fp32_backend})")
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes on the machine skew every time)")

    prepared = RankingGallery(gallery)
    start = time.perf_counter()
    if precision == "bf16":
        prepared.bf16()
    convert = time.perf_counter() - start
    index = faiss.IndexFlatIP(args.dim)
    start = time.perf_counter()
    index.add(gallery)
    add = time.perf_counter() - start
    print(f"one-off preparation: bfloat16 copy {convert:.2f} s, faiss IndexFlatIP.add {add:.2f} s (not timed below)")

    def bare_faiss() -> np.ndarray:
        saved = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_THRESHOLD
        try:
            return index.search(queries, args.k)[1]
        finally:
            faiss.cvar.distance_compute_blas_threshold = saved

    q_t, g_t = torch.from_numpy(queries), torch.from_numpy(gallery)
    names = {
        "before": "before: full score matrix + topk (evaluator until now)",
        "after": f"after: topk_inner_product, precision=auto ({precision})",
        "fp32": f"after, fp32: topk_inner_product, precision=fp32 ({fp32_backend})",
        "faiss": "bare faiss IndexFlatIP.search",
    }
    fns: dict[str, Callable[[], Any]] = {
        "before": lambda: before_full_matrix_topk(q_t, g_t, args.k),
        "after": lambda: topk_inner_product(queries, prepared, args.k).indices,
        "fp32": lambda: topk_inner_product(queries, prepared, args.k, precision="fp32").indices,
        "faiss": bare_faiss,
    }
    memory = {key: peak_memory(fn) for key, fn in fns.items()}
    times = best_times(fns, args.repeats)

    print(
        f"\n{'ranking':<62} {'best of ' + str(args.repeats):>12} {'x faiss':>8} {'peak RSS +':>11} {'tracemalloc':>12}"
    )
    for key, label in names.items():
        _, rss, traced = memory[key]
        print(
            f"{label:<62} {times[key]:>10.3f} s {times[key] / times['faiss']:>7.2f}x "
            f"{rss / 2**20:>8.0f} MiB {traced / 2**20:>8.0f} MiB"
        )
    ratio = times["after"] / times["faiss"]
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    print(
        f"after / before: {times['after'] / times['before']:.2f}x time, "
        f"{memory['after'][1] / max(memory['before'][1], 1):.2f}x peak RSS growth"
    )
    target = f"(target <= {TARGET_RATIO:.2f}x)" if precision == "bf16" else "(no target: the float32 path ran)"
    print(f"after / bare faiss: {ratio:.2f}x {target}")
    gaps = []
    for key in ("before", "after", "fp32"):
        same, gap = agreement(gallery, queries, memory[key][0], memory["faiss"][0])
        gaps.append(gap)
        print(f"top-{args.k} ids of {key} vs bare faiss: {same:.2%} rows identical, score-profile gap {gap:.1e}")
    ok = max(gaps) <= TIE_TOLERANCE and (precision != "bf16" or ratio <= TARGET_RATIO)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
