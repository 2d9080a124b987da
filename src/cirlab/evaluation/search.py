"""Exact inner-product search over a (possibly memory-mapped) gallery: the ranking path of evaluator and index.

Scores are inner products (cosine similarities for L2-normalised inputs). :func:`topk_inner_product` reads the
gallery a chunk of rows at a time and keeps a running top-k per query, so a (Q, N) score matrix is never
materialised: CIRCO's 123,403 x 768 gallery ranked for 800 queries needs about Q x 16,384 floats of scratch, not
395 MB, and the gallery may be the ``np.memmap`` that :class:`cirlab.features.FeatureCache` returns.

Ranking order: higher score first; equal scores are ordered by the lower gallery index (the same rule as
:mod:`cirlab.evaluation.protocols`). Ties mean scores that compare equal *as computed by the backend*: BLAS
libraries and GPUs may round the same inner product differently in the last bit, so two backends agree up to
such near-ties. The rule holds at the top-k boundary too: every backend fetches k+1 candidates and, for the rare
query whose k-th and (k+1)-th scores are equal, redoes that query exactly (a linear pass over its scores).

Backends (``benchmarks/bench_ranking.py`` on a 2-core AMD EPYC, 123,403 x 768 gallery, 800 queries, top-50):
``faiss`` (``faiss.knn``, exhaustive, BLAS threshold 20) 0.71 s; ``numpy`` (OpenBLAS matmul + argpartition)
0.93 s; ``torch`` (MKL ``mm`` + ``topk``; MKL is slower than OpenBLAS on AMD CPUs) 1.09 s. ``"auto"`` therefore
picks ``torch`` when the queries are a tensor on an accelerator (the gallery is streamed to that device chunk by
chunk), else ``faiss`` when the optional ``[faiss]`` extra is installed and the gallery is float32 (faiss would
need a full float32 copy of a float16 gallery), else ``numpy``.

torch and faiss are imported lazily; importing this module costs only numpy.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from cirlab._optional import require

if TYPE_CHECKING:
    import torch

Backend = Literal["auto", "torch", "faiss", "numpy"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "faiss", "numpy")

GALLERY_CHUNK = 16384
"""Gallery rows scored per step; 16K rows x 768 dims is 48 MiB, large enough for BLAS to run at full speed."""

QUERY_CHUNK = 2048
"""Query rows scored per step; with GALLERY_CHUNK this bounds the score scratch to 128 MiB of float32."""

FAISS_BLAS_THRESHOLD = 20
"""faiss switches from its SIMD loop to BLAS at this many queries; set only for the duration of our call."""

ArrayLike = Any  # np.ndarray (np.memmap included) or torch.Tensor; kept loose so torch is never imported here


class SearchResult(NamedTuple):
    """Top-k of every query: ``scores`` (Q, k) float32, descending per row, and ``indices`` (Q, k) int64."""

    scores: np.ndarray
    indices: np.ndarray


def _is_tensor(x: Any) -> bool:
    # A tensor can only exist if torch was imported by the caller, so looking it up never imports torch.
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(x, torch_module.Tensor)


def _as_numpy(x: ArrayLike) -> np.ndarray:
    """A numpy view of an array or tensor (copied to the CPU; half-precision tensors widened to float32)."""
    if _is_tensor(x):
        x = x.detach().cpu()
        if x.is_floating_point() and x.element_size() < 4:
            x = x.float()  # numpy has no bfloat16
        return x.numpy()
    return np.asarray(x)


def _check_matrices(queries: ArrayLike, gallery: ArrayLike) -> tuple[int, int]:
    """Validates (Q, d) queries against an (N, d) gallery; returns (Q, N)."""
    q_shape, g_shape = tuple(queries.shape), tuple(gallery.shape)
    if len(q_shape) != 2 or len(g_shape) != 2:
        raise ValueError(f"queries and gallery must be 2-D, got shapes {q_shape} and {g_shape}")
    if q_shape[1] != g_shape[1]:
        raise ValueError(f"queries have dimension {q_shape[1]} but the gallery has {g_shape[1]}")
    return q_shape[0], g_shape[0]


def _check_finite_queries(queries: ArrayLike) -> None:
    # NaN has no place in a ranking and would silently float to the top of torch.topk; queries are small, so
    # checking them is cheap. The gallery is assumed finite (it may be 123K rows on disk).
    bad = ~np.isfinite(_as_numpy(queries)).all(axis=1)
    if bad.any():
        raise ValueError(f"query row {int(np.flatnonzero(bad)[0])} contains NaN or inf")


def _exclude_matrix(exclude: ArrayLike | Sequence[int] | None, n_queries: int, n_gallery: int) -> np.ndarray:
    """Per-query excluded gallery indices as a (Q, m) int64 matrix; negative entries exclude nothing."""
    if exclude is None:
        return np.empty((n_queries, 0), dtype=np.int64)
    ex = np.asarray(_as_numpy(exclude) if _is_tensor(exclude) else exclude, dtype=np.int64)
    if ex.ndim == 1:
        ex = ex[:, None]  # (Q, 1)
    if ex.ndim != 2 or ex.shape[0] != n_queries:
        raise ValueError(f"exclude must have shape (Q,) or (Q, m) with Q={n_queries}, got {ex.shape}")
    if ex.size and ex.max() >= n_gallery:
        raise ValueError(f"exclude holds gallery index {int(ex.max())} but the gallery has {n_gallery} rows")
    return np.where(ex < 0, -1, ex)


def resolve_backend(backend: str, queries: ArrayLike | None = None, gallery: ArrayLike | None = None) -> str:
    """The concrete backend ``"auto"`` stands for, given the queries' device and the gallery's dtype."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown search backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if _is_tensor(queries) and queries.device.type != "cpu":
        return "torch"
    float32_gallery = gallery is None or str(gallery.dtype) in ("float32", "torch.float32")
    if float32_gallery and importlib.util.find_spec("faiss") is not None:
        return "faiss"
    return "numpy"


def _sort_rows(scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orders every row by decreasing score, equal scores by increasing index."""
    order = np.lexsort((indices, -scores), axis=-1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)


class _NumpyScorer:
    """Scores with numpy's BLAS matmul and selects with ``np.argpartition``."""

    def __init__(self, queries: np.ndarray, query_chunk: int, gallery_chunk: int) -> None:
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, d)
        # One flat scratch buffer reshaped per step, so every matmul writes into contiguous memory.
        self._scratch = np.empty(min(query_chunk, len(queries)) * gallery_chunk, dtype=np.float32)

    def block(self, gallery: ArrayLike, start: int, stop: int) -> np.ndarray:
        # A float32 memmap slice passes through without a copy; float16 storage is widened chunk by chunk.
        return np.asarray(_as_numpy(gallery[start:stop]), dtype=np.float32)  # (n, d)

    def scores(self, q_start: int, q_stop: int, block: np.ndarray) -> np.ndarray:
        out = self._scratch[: (q_stop - q_start) * len(block)].reshape(q_stop - q_start, len(block))  # (q, n)
        return np.matmul(self.queries[q_start:q_stop], block.T, out=out)

    @staticmethod
    def mask(scores: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
        scores[rows, cols] = -np.inf

    @staticmethod
    def top_candidates(scores: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        cols = np.argpartition(scores, scores.shape[1] - m, axis=1)[:, -m:]  # (q, m), unordered
        return np.take_along_axis(scores, cols, axis=1), cols.astype(np.int64)

    @staticmethod
    def to_numpy(x: np.ndarray) -> np.ndarray:
        return x


class _TorchScorer:
    """Scores with ``torch.mm`` and selects with ``torch.topk`` on the queries' device."""

    def __init__(self, queries: ArrayLike, query_chunk: int, gallery_chunk: int) -> None:
        import torch

        self.torch = torch
        if _is_tensor(queries):
            self.queries = queries.detach().float()  # (Q, d) on the caller's device
        else:
            self.queries = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        self.device = self.queries.device
        self._staging: np.ndarray | None = None
        self._gallery_chunk = gallery_chunk

    def block(self, gallery: ArrayLike, start: int, stop: int) -> torch.Tensor:
        if _is_tensor(gallery):
            return gallery[start:stop].detach().to(self.device, self.torch.float32)  # (n, d)
        rows = gallery[start:stop]
        if not (rows.dtype == np.float32 and rows.flags.c_contiguous and rows.flags.writeable):
            # torch.from_numpy refuses to share read-only memory (memmaps) without a warning, and float16 storage
            # needs widening anyway: copy into one reused float32 staging buffer.
            if self._staging is None:
                self._staging = np.empty((self._gallery_chunk, gallery.shape[1]), dtype=np.float32)
            staged = self._staging[: len(rows)]  # (n, d)
            np.copyto(staged, rows)
            rows = staged
        return self.torch.from_numpy(rows).to(self.device)  # (n, d)

    def scores(self, q_start: int, q_stop: int, block: torch.Tensor) -> torch.Tensor:
        return self.torch.mm(self.queries[q_start:q_stop], block.T)  # (q, n)

    def mask(self, scores: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> None:
        scores[self.torch.from_numpy(rows).to(self.device), self.torch.from_numpy(cols).to(self.device)] = -np.inf

    @staticmethod
    def top_candidates(scores: torch.Tensor, m: int) -> tuple[np.ndarray, np.ndarray]:
        values, cols = scores.topk(m, dim=1, sorted=False)  # (q, m)
        return values.cpu().numpy(), cols.cpu().numpy()

    @staticmethod
    def to_numpy(x: torch.Tensor) -> np.ndarray:
        return x.cpu().numpy()


_Scorer = _NumpyScorer | _TorchScorer


def _select(scorer: _Scorer, scores: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k columns of every row of a score block, ordered by (score desc, column asc): (q, k) each."""
    n_cols = scores.shape[1]
    if k >= n_cols:
        values = scorer.to_numpy(scores).copy()  # (q, n)
        return _sort_rows(values, np.broadcast_to(np.arange(n_cols), values.shape).copy())
    values, cols = _sort_rows(*scorer.top_candidates(scores, k + 1))  # (q, k + 1)
    # Only where the k-th and (k+1)-th scores tie can an unseen lower column belong in the top-k; redo those rows
    # exactly (rare: duplicate images or quantised embeddings).
    for r in np.flatnonzero(values[:, k - 1] == values[:, k]):
        row = scorer.to_numpy(scores[int(r)])  # (n,)
        cand = np.flatnonzero(row >= values[r, k - 1])
        best = cand[np.lexsort((cand, -row[cand]))[:k]]
        values[r, :k], cols[r, :k] = row[best], best
    return values[:, :k], cols[:, :k]


def _chunked_topk(
    scorer: _Scorer, gallery: ArrayLike, k: int, exclude: np.ndarray, query_chunk: int, gallery_chunk: int
) -> SearchResult:
    """Streams the gallery once, keeping a running exact top-k for every query chunk."""
    n_queries, n_gallery = len(exclude), int(gallery.shape[0])
    q_starts = range(0, n_queries, query_chunk)
    best = [(np.empty((0, 0), np.float32), np.empty((0, 0), np.int64)) for _ in q_starts]
    for g_start in range(0, n_gallery, gallery_chunk):
        g_stop = min(g_start + gallery_chunk, n_gallery)
        block = scorer.block(gallery, g_start, g_stop)
        for c, q_start in enumerate(q_starts):
            q_stop = min(q_start + query_chunk, n_queries)
            scores = scorer.scores(q_start, q_stop, block)  # (q, n)
            ex = exclude[q_start:q_stop]
            rows, slots = np.nonzero((ex >= g_start) & (ex < g_stop))
            if len(rows):
                scorer.mask(scores, rows, ex[rows, slots] - g_start)
            values, cols = _select(scorer, scores, k)
            if best[c][0].size:
                values = np.concatenate([best[c][0], values], axis=1)
                cols = np.concatenate([best[c][1], cols + g_start], axis=1)
                values, cols = _sort_rows(values, cols)
            else:
                cols = cols + g_start
            best[c] = (values[:, :k], cols[:, :k])
    scores = np.concatenate([b[0] for b in best], axis=0).astype(np.float32, copy=False)
    indices = np.concatenate([b[1] for b in best], axis=0).astype(np.int64, copy=False)
    return SearchResult(scores, indices)


def _faiss_topk(
    queries: np.ndarray, gallery: ArrayLike, k: int, exclude: np.ndarray, query_chunk: int, gallery_chunk: int
) -> SearchResult:
    """One ``faiss.knn`` call over the whole gallery (faiss blocks it internally), then exclusion and tie repair."""
    faiss = require("faiss", extra="faiss", purpose="exact search with the faiss backend")
    xb = _as_numpy(gallery)
    if xb.dtype != np.float32 or not xb.flags.c_contiguous:
        xb = np.ascontiguousarray(xb, dtype=np.float32)  # faiss reads only contiguous float32: a full copy
    n_gallery, m = len(xb), exclude.shape[1]
    fetch = min(n_gallery, k + m + 1)  # room for every excluded item plus one to see ties at the boundary
    saved = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_THRESHOLD
    try:
        scores, indices = faiss.knn(queries, xb, fetch, metric=faiss.METRIC_INNER_PRODUCT)  # (Q, fetch)
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved
    if m:
        excluded = (indices[:, :, None] == exclude[:, None, :]).any(axis=2)  # (Q, fetch)
        scores[excluded] = -np.inf
    scores, indices = _sort_rows(scores, indices)
    if fetch < n_gallery:
        # faiss orders equal scores arbitrarily; a tie across the k-th place is redone exactly with numpy.
        tied = np.flatnonzero(scores[:, k - 1] == scores[:, k])
        if len(tied):
            scorer = _NumpyScorer(queries[tied], query_chunk, gallery_chunk)
            redo = _chunked_topk(scorer, gallery, k, exclude[tied], query_chunk, gallery_chunk)
            scores[tied, :k], indices[tied, :k] = redo.scores, redo.indices
    return SearchResult(np.ascontiguousarray(scores[:, :k]), np.ascontiguousarray(indices[:, :k]))


def topk_inner_product(
    queries: ArrayLike,
    gallery: ArrayLike,
    k: int,
    *,
    exclude: ArrayLike | Sequence[int] | None = None,
    backend: Backend = "auto",
    query_chunk: int = QUERY_CHUNK,
    gallery_chunk: int = GALLERY_CHUNK,
) -> SearchResult:
    """Exact top-k gallery items by inner product for every query, memory-bounded and deterministic.

    Args:
        queries: (Q, d) float numpy array or torch tensor (any device; an accelerator tensor selects ``torch``
            under ``"auto"``). Must be finite.
        gallery: (N, d) numpy array, ``np.memmap`` (float32 or float16 storage) or torch tensor. Assumed finite.
        k: results per query. Clamped to ``N - m`` (m = excluded slots per query), so a tiny gallery yields
            fewer columns instead of an error; slice ``indices[:, :k]`` for smaller depths.
        exclude: gallery indices never returned for a query, (Q,) or (Q, m) ints; negative entries exclude
            nothing (e.g. CIRR deletes each query's reference image from its ranking).
        backend: ``"auto"``, ``"torch"``, ``"faiss"`` or ``"numpy"`` (see the module docstring).
        query_chunk: queries scored per step (torch and numpy backends).
        gallery_chunk: gallery rows read and scored per step (torch and numpy backends).

    Returns:
        ``SearchResult(scores, indices)``: (Q, k') float32 scores, descending, and (Q, k') int64 gallery indices,
        equal scores ordered by the lower index; k' = min(k, N - m).

    Raises:
        ValueError: bad shapes, k < 1, an out-of-range exclude index, non-finite queries or an unknown backend.
        cirlab._optional.MissingExtraError: ``backend="faiss"`` without faiss installed.
    """
    n_queries, n_gallery = _check_matrices(queries, gallery)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if query_chunk < 1 or gallery_chunk < 1:
        raise ValueError(f"chunk sizes must be positive, got query_chunk={query_chunk}, gallery_chunk={gallery_chunk}")
    name = resolve_backend(backend, queries, gallery)
    _check_finite_queries(queries)
    ex = _exclude_matrix(exclude, n_queries, n_gallery)
    k = min(k, n_gallery - ex.shape[1])
    if k < 1 or n_queries == 0:
        return SearchResult(np.empty((n_queries, 0), np.float32), np.empty((n_queries, 0), np.int64))
    if name == "faiss":
        q = np.ascontiguousarray(_as_numpy(queries), dtype=np.float32)
        return _faiss_topk(q, gallery, k, ex, query_chunk, gallery_chunk)
    scorer = (
        _TorchScorer(queries, query_chunk, gallery_chunk)
        if name == "torch"
        else _NumpyScorer(_as_numpy(queries), query_chunk, gallery_chunk)
    )
    return _chunked_topk(scorer, gallery, k, ex, query_chunk, gallery_chunk)


def full_scores(
    queries: ArrayLike, gallery: ArrayLike, *, backend: Backend = "auto", gallery_chunk: int = GALLERY_CHUNK
) -> np.ndarray:
    """All query-gallery inner products, for galleries small enough to rank in full (CIRR val, FashionIQ).

    Args:
        queries: (Q, d) numpy array or torch tensor.
        gallery: (N, d) numpy array, memmap or torch tensor.
        backend: ``"auto"`` (torch for accelerator tensors, else numpy), ``"torch"`` or ``"numpy"``.
        gallery_chunk: gallery rows converted and scored per step.

    Returns:
        (Q, N) float32 numpy array on the CPU.
    """
    n_queries, n_gallery = _check_matrices(queries, gallery)
    name = resolve_backend(backend, queries)
    if name == "faiss":
        name = "numpy"  # faiss has no all-pairs call worth using; numpy runs the same BLAS
    chunk = max(1, gallery_chunk)
    scorer = (
        _TorchScorer(queries, n_queries, chunk)
        if name == "torch"
        else _NumpyScorer(_as_numpy(queries), n_queries, chunk)
    )
    out = np.empty((n_queries, n_gallery), dtype=np.float32)  # (Q, N)
    for start in range(0, n_gallery, chunk):
        stop = min(start + chunk, n_gallery)
        out[:, start:stop] = scorer.to_numpy(scorer.scores(0, n_queries, scorer.block(gallery, start, stop)))
    return out


def _index_matrix(index_lists: ArrayLike | Sequence[Sequence[int]], n_queries: int) -> np.ndarray:
    """(Q, m) int64 gallery indices from a matrix or ragged lists, short rows padded with -1."""
    if _is_tensor(index_lists) or isinstance(index_lists, np.ndarray):
        idx = np.asarray(_as_numpy(index_lists), dtype=np.int64)
    else:
        rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in index_lists]
        idx = np.full((len(rows), max((len(r) for r in rows), default=0)), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            idx[i, : len(r)] = r
    if idx.ndim != 2 or idx.shape[0] != n_queries:
        raise ValueError(f"index_lists must give one list per query (Q={n_queries}), got shape {idx.shape}")
    return idx


def pair_scores(
    queries: ArrayLike,
    gallery: ArrayLike,
    index_lists: ArrayLike | Sequence[Sequence[int]],
    *,
    query_chunk: int = 1024,
) -> np.ndarray:
    """Inner products of each query with its own few gallery items (CIRR Recall_subset's img_set members).

    Only the requested gallery rows are read, so this is cheap on a memory-mapped gallery. The scores come from
    a different summation than :func:`topk_inner_product` and may differ from it in the last bit; rank a subset
    by these scores alone.

    Args:
        queries: (Q, d) numpy array or torch tensor.
        gallery: (N, d) numpy array, memmap or torch tensor.
        index_lists: per query, gallery indices: a (Q, m) int matrix or Q sequences of any lengths; negative
            entries are padding.
        query_chunk: queries handled per step (bounds the gathered rows to query_chunk x m x d).

    Returns:
        (Q, m) float32 scores aligned with ``index_lists``; padding slots hold ``-inf``.
    """
    n_queries, n_gallery = _check_matrices(queries, gallery)
    idx = _index_matrix(index_lists, n_queries)
    if idx.size and idx.max() >= n_gallery:
        raise ValueError(f"index_lists holds gallery index {int(idx.max())} but the gallery has {n_gallery} rows")
    q = np.asarray(_as_numpy(queries), dtype=np.float32)
    g = _as_numpy(gallery)
    out = np.full(idx.shape, -np.inf, dtype=np.float32)  # (Q, m)
    for start in range(0, n_queries, max(1, query_chunk)):
        block = idx[start : start + query_chunk]
        valid = block >= 0
        rows = np.asarray(g[block[valid]], dtype=np.float32)  # (n_valid, d)
        query_rows = q[start : start + query_chunk][np.nonzero(valid)[0]]  # (n_valid, d)
        out[start : start + query_chunk][valid] = np.einsum("nd,nd->n", query_rows, rows)
    return out
