"""Approximate inner-product search with faiss (HNSW or IVF), tuned and measured against exact search at build time.

Exact search (``cirlab.evaluation.ranking.topk_inner_product``, faiss' exhaustive ``knn`` with BLAS for batches)
is the default and is always right. For large galleries an approximate structure trades a little recall for
speed. Its search-time knob (``efSearch`` for HNSW, ``nprobe`` for IVF) is raised step by step until recall@k
against exact search reaches a target on a sample of queries; the knob and the measured recall are stored with the
index and printed, so nobody uses an approximate index without knowing what it misses.

Sample queries mimic composed queries, which land between gallery images rather than on one: the normalised sum
of two random gallery embeddings. Recall counts an approximate hit as correct when its score is at least the
exact k-th score (faiss ``contrib.evaluation``'s tie-tolerant rule), so equal-scored items are not held against it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cirlab._optional import require
from cirlab.evaluation.ranking import topk_inner_product

APPROXIMATE_KINDS = ("hnsw", "ivf")
TIE_TOLERANCE = 1e-5
"""Scores within this of the exact k-th score count as ties (float32 sums differ in the last bits)."""


@dataclass
class AnnConfig:
    """Settings of an approximate index.

    Attributes:
        kind: ``"hnsw"`` (graph; no training, larger memory) or ``"ivf"`` (inverted lists over k-means cells).
        target_recall: recall@k against exact search that the search knob is tuned to reach.
        k: the depth recall is measured at.
        sample_queries: how many sample queries measure recall.
        hnsw_m: HNSW graph degree.
        hnsw_ef_construction: HNSW build-time beam width.
        ivf_lists: IVF cell count; 0 picks ``sqrt(N)`` (capped so every cell trains on 39+ points).
        seed: sample queries and k-means initialisation.
    """

    kind: str = "hnsw"
    target_recall: float = 0.95
    k: int = 50
    sample_queries: int = 200
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    ivf_lists: int = 0
    seed: int = 0


@dataclass
class AnnReport:
    """What was built and how well it does: stored in the manifest under ``approximate``."""

    kind: str
    params: dict[str, int]
    recall: float
    k: int
    queries: int
    target: float
    build_seconds: float
    tuning: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _faiss() -> Any:
    return require("faiss", extra="faiss", purpose="approximate search")


def sample_queries(embeddings: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` query-like vectors: the normalised sums of random pairs of gallery embeddings, (n, d) float32."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(embeddings), size=n)
    b = rng.integers(0, len(embeddings), size=n)
    q = np.asarray(embeddings[a], np.float32) + np.asarray(embeddings[b], np.float32)  # (n, d)
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    return (q / np.maximum(norms, 1e-12)).astype(np.float32)


def ann_recall_at_k(approx_scores: np.ndarray, exact_scores: np.ndarray, k: int) -> float:
    """Tie-tolerant recall@k of approximate search against exact search: the fraction of approximate top-k hits
    scoring at least the exact k-th score (not the benchmark metric, ``cirlab.evaluation.metrics.recall_at_k``).

    Args:
        approx_scores: (Q, >=k) scores of the approximate hits (missing hits as -inf).
        exact_scores: (Q, >=k) exact top scores, descending.
        k: depth.
    """
    k = min(k, exact_scores.shape[1])
    if k == 0 or not len(exact_scores):
        return 1.0
    threshold = exact_scores[:, k - 1 : k] - TIE_TOLERANCE  # (Q, 1)
    return float((approx_scores[:, :k] >= threshold).sum() / (len(exact_scores) * k))


def _ivf_lists(n: int, requested: int) -> int:
    if requested > 0:
        return max(1, min(requested, n))
    return max(1, min(int(math.sqrt(n)), n // 39))


def build_ann(
    embeddings: np.ndarray, config: AnnConfig, log: Callable[[str], None] | None = None
) -> tuple[Any, AnnReport]:
    """Builds the approximate index over ``embeddings`` (N, d) and tunes its search knob to the target recall.

    Returns:
        The faiss index (search knob set) and its report.

    Raises:
        ValueError: unknown kind or an empty gallery.
        cirlab._optional.MissingExtraError: faiss is not installed.
    """
    if config.kind not in APPROXIMATE_KINDS:
        raise ValueError(f"unknown approximate index {config.kind!r}; choose one of {', '.join(APPROXIMATE_KINDS)}")
    if not len(embeddings):
        raise ValueError("cannot build an approximate index over an empty gallery")
    faiss = _faiss()
    xb = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = xb.shape
    t0 = time.perf_counter()
    if config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
        index.add(xb)
        knob, steps = "efSearch", [16, 32, 64, 128, 256, 512, 1024, 2048]
    else:
        lists = _ivf_lists(n, config.ivf_lists)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True  # unit-norm embeddings: spherical k-means cells match inner-product search
        index.cp.seed = config.seed
        # k-means on a sample: 64 points per cell place the centroids well and keep a 1M gallery's training short.
        index.cp.max_points_per_centroid = 64
        index.train(xb)
        index.add(xb)
        knob, steps = "nprobe", [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if p < lists] + [lists]
    build_seconds = time.perf_counter() - t0
    queries = sample_queries(xb, min(config.sample_queries, max(1, n)), config.seed)
    k = min(config.k, n)
    exact = topk_inner_product(queries, xb, k).scores  # (Q, k)
    tuning = []
    for value in steps:
        if config.kind == "hnsw":
            index.hnsw.efSearch = max(value, k)
        else:
            index.nprobe = value
        scores, _ = index.search(queries, k)
        recall = ann_recall_at_k(scores, exact, k)
        tuning.append({knob: float(value), "recall": recall})
        if log is not None:
            log(f"{config.kind} {knob}={value}: recall@{k} {recall:.4f}")
        if recall >= config.target_recall:
            break
    params = {knob: int(index.hnsw.efSearch if config.kind == "hnsw" else index.nprobe)}
    if config.kind == "hnsw":
        params.update(M=config.hnsw_m, efConstruction=config.hnsw_ef_construction)
    else:
        params["nlist"] = int(index.nlist)
    report = AnnReport(
        config.kind, params, tuning[-1]["recall"], k, len(queries), config.target_recall, build_seconds, tuning
    )
    return index, report


def write_ann(index: Any, path: Path) -> None:
    """Writes a faiss index to ``path`` (the caller makes it atomic)."""
    _faiss().write_index(index, str(path))


def read_ann(path: Path, manifest_ann: dict[str, Any]) -> Any:
    """Reads a faiss index and restores its tuned search knob from the manifest."""
    faiss = _faiss()
    index = faiss.read_index(str(path))
    params = manifest_ann.get("params", {})
    if manifest_ann.get("kind") == "hnsw":
        index.hnsw.efSearch = int(params.get("efSearch", 64))
    elif manifest_ann.get("kind") == "ivf":
        index.nprobe = int(params.get("nprobe", 1))
    return index


def ann_search(
    index: Any, queries: np.ndarray, k: int, exclude: list[set[int]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k: (Q, k) scores and ids, ``-inf`` / ``-1`` where fewer than k were found.

    ``exclude[q]`` holds gallery ids never returned for query ``q`` (the reference image itself).
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    extra = max((len(e) for e in exclude), default=0) if exclude else 0
    fetch = min(k + extra, index.ntotal)
    faiss = _faiss()
    params = None
    if isinstance(index, faiss.IndexHNSW) and index.hnsw.efSearch < fetch:
        # HNSW returns at most efSearch hits; widen the beam for this call only (the index is shared by threads).
        params = faiss.SearchParametersHNSW(efSearch=fetch)
    scores, ids = index.search(q, fetch, params=params)  # (Q, fetch)
    out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(q), k), -1, dtype=np.int64)
    for r in range(len(q)):
        keep = ids[r] >= 0
        if exclude:
            keep &= ~np.isin(ids[r], list(exclude[r]))
        s, i = scores[r][keep][:k], ids[r][keep][:k]
        out_s[r, : len(s)], out_i[r, : len(i)] = s, i
    return out_s, out_i
