"""The one ranking path: exact top-k inner-product search over a (possibly memory-mapped) gallery.

Everything that ranks a gallery calls :func:`topk_inner_product`: the evaluator, the submission writers and the
demo report's showcase (through :func:`cirlab.evaluation.protocols.rank_split`, which adds the benchmark rules),
and the gallery index. No (Q, N) score matrix is ever built: the gallery is read a block of rows at a time and a
running top-k is kept per query, so CIRCO's 123,403 x 768 gallery ranked for 800 queries needs a few blocks of
scratch, not a 395 MB matrix, and the gallery may be the ``np.memmap`` that :class:`cirlab.features.FeatureCache`
returns.

Ranking order: higher score first; equal scores are ordered by the lower gallery index. Ties mean scores that
compare equal *as computed by the backend*: BLAS libraries and GPUs may round the same inner product differently
in the last bit, so two backends agree up to such near-ties. The rule holds at the top-k boundary too: every
backend fetches k+1 candidates and, for the rare query whose k-th and (k+1)-th scores are equal, redoes that query
exactly (a linear pass over its scores).

float32 backends: ``faiss`` (``faiss.knn``, exhaustive, BLAS threshold 20), ``numpy`` (OpenBLAS matmul +
argpartition) and ``torch`` (``torch.mm`` + ``topk``). ``"auto"`` picks ``torch`` when the queries are a torch
tensor (on an accelerator the gallery is streamed to that device block by block; on the CPU the evaluator's
scores stay the ``torch.mm`` products it always ranked), else ``faiss`` when the optional ``[faiss]`` extra is
installed and the gallery is float32 (faiss would need a full float32 copy of a float16 gallery), else ``numpy``.

Reduced precision (``precision="bf16"``): where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16,
used by torch through oneDNN), the gallery is scored in bfloat16 first, every item that could still be in the
float32 top-k is kept, and only those are re-scored in float32 (see :func:`bf16_error_bound` for why the kept set
is provably sufficient). The result is the float32 top-k, equal up to ties to what a float32 backend returns.
``"auto"`` picks it only from the CPU's feature flags (:func:`cpu_has_native_bf16`) and only for problems large
enough to profit (:data:`REDUCED_MIN_WORK`); without native bf16, torch's bfloat16 matmul is several times
*slower* than float32 (5.9x measured on an AVX2-only EPYC), so it is never chosen there. int8 (``torch._int_mm``,
VNNI) was measured no faster than bfloat16 here and needs a far wider candidate margin, so it is not offered.

torch and faiss are imported lazily; importing this module costs only numpy.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from cirlab._optional import require

if TYPE_CHECKING:
    import torch

Backend = Literal["auto", "torch", "faiss", "numpy"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "faiss", "numpy")
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")

GALLERY_CHUNK = 16384
"""Gallery rows scored per step; 16K rows x 768 dims is 48 MiB, large enough for BLAS to run at full speed."""

QUERY_CHUNK = 2048
"""Query rows scored per step; with GALLERY_CHUNK this bounds the score scratch to 128 MiB of float32."""

FAISS_BLAS_THRESHOLD = 20
"""faiss switches from its SIMD loop to BLAS at this many queries; set only for the duration of our call."""

REDUCED_MIN_WORK = 1 << 26
"""``"auto"`` scores in reduced precision only from this many query-gallery pairs on (CIRCO's 800 x 123,403 is
98.7M): below it the bfloat16 copy of the gallery and the re-rank cost about what they save, and the rankings of
every smaller benchmark (CIRR, FashionIQ, the Shapes worlds) stay the float32 backends' own."""

REDUCED_MIN_QUERIES = 32
"""... and only from this many queries: a single query is a memory-bound matrix-vector product either way."""

RERANK_BYTES = 2 << 20
"""Gathered float32 gallery rows held at a time while candidates are re-scored: small enough to stay in the
CPU's cache between the gather and the products (at CIRCO size, 2 MiB made the whole bfloat16 search 0.81x -> 0.75x
of bare faiss on the development VM; 64 MiB wrote and re-read every gathered row through memory)."""

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""CPU flags (``/proc/cpuinfo``) of native bfloat16 dot products that oneDNN uses for torch's bfloat16 matmul."""

ArrayLike = Any  # np.ndarray (np.memmap included) or torch.Tensor; kept loose so torch is never imported here

_KEY_MIN = np.int16(-32768)
"""Sort key of excluded items in the bfloat16 pass (below every finite score's key)."""


class SearchResult(NamedTuple):
    """Top-k of every query: ``scores`` (Q, k) float32, descending per row, and ``indices`` (Q, k) int64.

    ``gathered`` (Q, m) float32 holds the scores of the items asked for with ``gather`` (``-inf`` in padding
    slots), taken from the same float32 products the ranking used; None when nothing was asked for.
    """

    scores: np.ndarray
    indices: np.ndarray
    gathered: np.ndarray | None = None


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


class RankingGallery:
    """A gallery prepared for ranking: its float32 rows, plus a bfloat16 copy made once, on first reduced use.

    Wrapping a gallery that is ranked many times (an index serving batches, a benchmark) converts it once, as a
    faiss index copies its vectors once; a bare array passed to :func:`topk_inner_product` is converted per call.

    Args:
        embeddings: (N, d) numpy array, ``np.memmap`` (float32 or float16 storage) or torch tensor.
    """

    def __init__(self, embeddings: ArrayLike) -> None:
        if len(tuple(embeddings.shape)) != 2:
            raise ValueError(f"the gallery must be 2-D, got shape {tuple(embeddings.shape)}")
        self.embeddings = embeddings
        self._bf16: torch.Tensor | None = None
        self._max_norm = self._max_err = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.embeddings.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> Any:
        return self.embeddings.dtype

    def bf16(self) -> tuple[torch.Tensor, float, float]:
        """The (N, d) bfloat16 copy (round to nearest even), an upper bound on the largest row norm and one on the
        largest row rounding error ``|g~ - g|`` (both measured in float64 while converting)."""
        if self._bf16 is None:
            import torch

            n, d = self.shape
            out = torch.empty((n, d), dtype=torch.bfloat16)  # (N, d)
            max_sq, max_err_sq = 0.0, 0.0
            for start in range(0, n, GALLERY_CHUNK):
                # Writable and contiguous: torch.from_numpy warns about read-only memory (a memmap's rows).
                rows = np.require(_as_numpy(self.embeddings[start : start + GALLERY_CHUNK]), np.float32, ["C", "W"])
                if not len(rows):
                    continue
                rounded = torch.from_numpy(rows).to(torch.bfloat16)  # (n, d)
                out[start : start + len(rows)] = rounded
                err = rounded.float().numpy() - rows  # exact: both are float32 numbers 2^-8 apart at most
                max_sq = max(max_sq, float(np.einsum("nd,nd->n", rows, rows, dtype=np.float64).max()))
                max_err_sq = max(max_err_sq, float(np.einsum("nd,nd->n", err, err, dtype=np.float64).max()))
            # float64 sums of squares are exact to ~1e-16 relative; the factor covers that and the square root.
            self._bf16 = out
            self._max_norm, self._max_err = math.sqrt(max_sq) * (1 + 1e-9), math.sqrt(max_err_sq) * (1 + 1e-9)
        return self._bf16, self._max_norm, self._max_err


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux lists them; empty where that file does not exist (other systems)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU has native bfloat16 dot products (AVX512-BF16 or AMX-BF16) that torch's matmul uses."""
    flags = cpu_flags() if flags is None else flags
    if not flags & NATIVE_BF16_FLAGS:
        return False
    import torch

    return bool(torch.backends.mkldnn.is_available())


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


def index_matrix(
    index_lists: ArrayLike | Sequence[Sequence[int]] | None, n_queries: int, n_gallery: int, what: str
) -> np.ndarray:
    """Per-query gallery indices as a (Q, m) int64 matrix, short rows padded with -1 (negative entries = none).

    Args:
        index_lists: None, a (Q,) or (Q, m) int array or tensor, or Q sequences of any lengths.
        n_queries: Q.
        n_gallery: N, the bound every index must stay under.
        what: the argument's name, for error messages.
    """
    if index_lists is None:
        return np.empty((n_queries, 0), dtype=np.int64)
    if _is_tensor(index_lists) or isinstance(index_lists, np.ndarray):
        idx = np.asarray(_as_numpy(index_lists), dtype=np.int64)
    elif all(isinstance(r, (int, np.integer)) for r in index_lists):
        idx = np.asarray(index_lists, dtype=np.int64)
    else:
        rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in index_lists]
        idx = np.full((len(rows), max((len(r) for r in rows), default=0)), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            idx[i, : len(r)] = r
    if idx.ndim == 1:
        idx = idx[:, None]  # (Q, 1)
    if idx.ndim != 2 or idx.shape[0] != n_queries:
        raise ValueError(
            f"{what} must have shape (Q,) or (Q, m) or hold one list per query with Q={n_queries}, got {idx.shape}"
        )
    if idx.size and idx.max() >= n_gallery:
        raise ValueError(f"{what} holds gallery index {int(idx.max())} but the gallery has {n_gallery} rows")
    return np.where(idx < 0, -1, idx)


def resolve_backend(backend: str, queries: ArrayLike | None = None, gallery: ArrayLike | None = None) -> str:
    """The concrete float32 backend ``"auto"`` stands for, given the queries' type and the gallery's dtype."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown search backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if _is_tensor(queries):
        return "torch"
    if isinstance(gallery, RankingGallery):
        gallery = gallery.embeddings
    float32_gallery = gallery is None or str(gallery.dtype) in ("float32", "torch.float32")
    if float32_gallery and importlib.util.find_spec("faiss") is not None:
        return "faiss"
    return "numpy"


def resolve_precision(
    precision: str, queries: ArrayLike | None = None, n_gallery: int = 0, flags: frozenset[str] | None = None
) -> str:
    """The concrete precision ``"auto"`` stands for: ``"bf16"`` on a CPU with native bfloat16 dot products for a
    large enough CPU problem (:data:`REDUCED_MIN_WORK`, :data:`REDUCED_MIN_QUERIES`), else ``"fp32"``.

    Args:
        precision: ``"auto"``, ``"fp32"`` or ``"bf16"``.
        queries: the (Q, d) queries (accelerator tensors always rank in float32).
        n_gallery: N.
        flags: the CPU's flags (default: :func:`cpu_flags`, read only when the size calls for it).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown ranking precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if queries is None or (_is_tensor(queries) and queries.device.type != "cpu"):
        return "fp32"
    n_queries = int(queries.shape[0])
    if n_queries < REDUCED_MIN_QUERIES or n_queries * n_gallery < REDUCED_MIN_WORK:
        return "fp32"
    return "bf16" if cpu_has_native_bf16(flags) else "fp32"


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
    def pick(scores: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return scores[rows, cols]

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

    def _at(self, rows: np.ndarray, cols: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.torch.from_numpy(rows).to(self.device), self.torch.from_numpy(cols).to(self.device)

    def mask(self, scores: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> None:
        scores[self._at(rows, cols)] = -np.inf

    def pick(self, scores: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return scores[self._at(rows, cols)].cpu().numpy()

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


def _in_block(index: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, slots) of the entries of a (q, m) index matrix that fall in gallery rows [start, stop)."""
    return np.nonzero((index >= start) & (index < stop))


def _chunked_topk(
    scorer: _Scorer,
    gallery: ArrayLike,
    k: int,
    exclude: np.ndarray,
    gather: np.ndarray,
    query_chunk: int,
    gallery_chunk: int,
) -> SearchResult:
    """Streams the gallery once, keeping a running exact top-k for every query chunk."""
    n_queries, n_gallery = len(exclude), int(gallery.shape[0])
    q_starts = range(0, n_queries, query_chunk)
    best = [(np.empty((0, 0), np.float32), np.empty((0, 0), np.int64)) for _ in q_starts]
    gathered = np.full(gather.shape, -np.inf, dtype=np.float32)  # (Q, m)
    for g_start in range(0, n_gallery, gallery_chunk):
        g_stop = min(g_start + gallery_chunk, n_gallery)
        block = scorer.block(gallery, g_start, g_stop)
        for c, q_start in enumerate(q_starts):
            q_stop = min(q_start + query_chunk, n_queries)
            scores = scorer.scores(q_start, q_stop, block)  # (q, n)
            ga = gather[q_start:q_stop]
            rows, slots = _in_block(ga, g_start, g_stop)
            if len(rows):
                gathered[q_start + rows, slots] = scorer.pick(scores, rows, ga[rows, slots] - g_start)
            ex = exclude[q_start:q_stop]
            rows, slots = _in_block(ex, g_start, g_stop)
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
    return SearchResult(scores, indices, gathered if gather.size else None)


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
            no_gather = np.empty((len(tied), 0), np.int64)
            redo = _chunked_topk(scorer, gallery, k, exclude[tied], no_gather, query_chunk, gallery_chunk)
            scores[tied, :k], indices[tied, :k] = redo.scores, redo.indices
    return SearchResult(np.ascontiguousarray(scores[:, :k]), np.ascontiguousarray(indices[:, :k]))


# --- reduced precision ---------------------------------------------------------------------------------------------

BF16_UNIT_ROUNDOFF = 2.0**-8
"""u of bfloat16 (8 significant bits): round-to-nearest changes a value by at most u times its magnitude."""

FP32_UNIT_ROUNDOFF = 2.0**-24


def bf16_error_bound(
    q_norm: np.ndarray, q_err: np.ndarray, g_norm: float, g_err: float, dim: int
) -> tuple[np.ndarray, float]:
    """How far a bfloat16 score can lie from any float32 evaluation of the same inner product.

    For a query q and a gallery row g of dimension d, the bfloat16 pass computes ``s~ = round16(sum_i q~_i g~_i)``:
    the inputs rounded to bfloat16 (``q~ = q + dq``; round to nearest even gives ``|dq_i| <= u |q_i|``,
    u = 2^-8), the products exact and summed in float32 (oneDNN's bf16 GEMM; 8 x 8 significant bits fit float32's
    24), the sum rounded to bfloat16 on output. A float32 backend computes ``r = fl32(sum_i q_i g_i)`` in some
    order. With ``gamma_d = d u32 / (1 - d u32)`` (u32 = 2^-24; Higham's bound for any summation order) and
    Cauchy-Schwarz:

    * input rounding: ``|q~.g~ - q.g| = |dq.g + q.dg + dq.dg| <= |dq| |g| + |q| |dg| + |dq| |dg|``; the rounding
      errors are measured (``|dq|`` per query, ``|dg|`` as the gallery's largest), which for unit vectors is about
      0.4 of the worst case ``(2u + u^2) |q| |g|``;
    * bfloat16 pass accumulation: ``gamma_d |q~| |g~|``;
    * the float32 evaluation it is compared with: ``gamma_d |q| |g|``;
    * output rounding: ``|s~ - a| <= 2u |a|`` for the accumulated a (any faithful rounding, not only nearest), so
      ``|s~ - a| <= c |s~|`` with ``c = 2u / (1 - 2u)``;
    * bfloat16 subnormals flushed to zero: below 2^-126 per term, covered by an absolute ``2^-100``.

    So ``|s~ - r| <= eps(s~) = e + c |s~|`` with e the sum of the other terms (G, dG: the largest gallery row norm
    and rounding error). Every item of the float32 top-k has ``r >= r_(k)``, and ``r_(k) >= s~_(k) - eps(s~_(k))``
    (the k-th largest of lower bounds), so it has ``s~ + eps(s~) >= s~_(k) - eps(s~_(k))``: keeping every item whose
    bfloat16 score is within twice the bound of the k-th best bfloat16 score keeps the whole float32 top-k, its
    ties at the k-th place included. For unit vectors in d = 768, e is about 0.0032 and c = 0.0079.

    Args:
        q_norm: (q,) upper bounds on the query norms.
        q_err: (q,) upper bounds on the queries' rounding error norms ``|q~ - q|``.
        g_norm: upper bound on the gallery's row norms.
        g_err: upper bound on the gallery's row rounding error norms.
        dim: d.

    Returns:
        ``(e, c)``: (q,) absolute terms and the relative output-rounding factor.
    """
    u, u32 = BF16_UNIT_ROUNDOFF, FP32_UNIT_ROUNDOFF
    gamma = dim * u32 / (1 - dim * u32)
    rounding = q_err * g_norm + q_norm * g_err + q_err * g_err
    accumulation = gamma * (q_norm + q_err) * (g_norm + g_err) + gamma * q_norm * g_norm
    return rounding + accumulation + 2.0**-100, 2 * u / (1 - 2 * u)


def _keys(bits: np.ndarray) -> np.ndarray:
    """Monotone int16 sort keys of bfloat16 bit patterns (and back: the map is its own inverse).

    Non-negative values keep their bits; negative ones have their magnitude bits flipped, so larger numbers get
    larger keys and integer comparisons of keys order the floats (+0 and -0 get the adjacent keys 0 and -1).
    """
    return bits ^ ((bits >> 15) & np.int16(0x7FFF))


def _key_values(keys: np.ndarray) -> np.ndarray:
    """float64 values of int16 sort keys."""
    bits = _keys(keys).view(np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32).astype(np.float64)


def _floor_keys(values: np.ndarray) -> np.ndarray:
    """Sort keys of the largest bfloat16 numbers at most ``values`` (float64), so ``key >= floor`` keeps ``>= v``."""
    f32 = values.astype(np.float32)
    keys = _keys((f32.view(np.uint32) >> 16).astype(np.uint16).view(np.int16))  # truncated toward zero
    for _ in range(3):  # truncation (or float32 rounding) may land one step above the value
        above = _key_values(keys) > values
        if not above.any():
            break
        keys = np.where(above, keys - np.int16(1), keys).astype(np.int16)
    return np.where(keys == 0, np.int16(-1), keys).astype(np.int16)  # -0 compares equal to +0: keep it


def _thresholds(kth_keys: np.ndarray, e: np.ndarray, c: float) -> np.ndarray:
    """Per query, the smallest bfloat16 key an item may have and still be in the float32 top-k, given the key of the
    k-th best bfloat16 score seen so far and the bound ``eps(s) = e + c |s|`` of :func:`bf16_error_bound`."""
    s = _key_values(kth_keys)
    lower = s - e - c * np.abs(s)  # a lower bound on the float32 k-th score
    # The smallest x with x + e + c|x| >= lower (the map is increasing in x), a hair lower for float64 rounding.
    x = np.where(lower - e >= 0, (lower - e) / (1 + c), (lower - e) / (1 - c))
    return _floor_keys(x - 1e-12 * (1 + np.abs(x)))


def _kth_keys(keys: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest key of every row (``_KEY_MIN`` where a row has fewer than k real entries)."""
    if keys.shape[1] < k:
        return np.full(len(keys), _KEY_MIN, dtype=np.int16)
    return np.partition(keys, keys.shape[1] - k, axis=1)[:, keys.shape[1] - k]


def _exact_scores(queries: np.ndarray, gallery: ArrayLike, cols: np.ndarray) -> np.ndarray:
    """float32 inner products of each query with its own gallery rows ``cols`` (Q, C); ``-inf`` where col < 0."""
    n, width = cols.shape
    out = np.full((n, width), -np.inf, dtype=np.float32)  # (Q, C)
    if not width:
        return out
    source = _as_numpy(gallery)
    step = max(1, RERANK_BYTES // (width * queries.shape[1] * 4))
    for start in range(0, n, step):
        c = cols[start : start + step]  # (q, C)
        rows = np.asarray(np.take(source, np.maximum(c, 0).ravel(), axis=0), dtype=np.float32)
        scores = np.einsum("qcd,qd->qc", rows.reshape(*c.shape, -1), queries[start : start + step])  # (q, C)
        out[start : start + step] = np.where(c >= 0, scores, -np.inf)
    return out


def _pack(rows: np.ndarray, keys: np.ndarray, cols: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(q, C) key and column matrices, -1 padded, from entries listed by ascending row."""
    counts = np.bincount(rows, minlength=n_rows)
    width = max(int(counts.max(initial=0)), 1)
    pos = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
    out_keys = np.full((n_rows, width), _KEY_MIN, dtype=np.int16)  # (q, C)
    out_cols = np.full((n_rows, width), -1, dtype=np.int64)
    out_keys[rows, pos], out_cols[rows, pos] = keys, cols
    return out_keys, out_cols


class _Candidates:
    """The bfloat16 pass's running state for a slice of a query chunk: per query, the entries kept from each block
    (keys and gallery columns), its k best keys so far, and the key threshold below which no item can be in the
    float32 top-k.

    Queries are independent, so each slice is filtered on its own thread between two blocks' matrix products
    (which use every thread themselves): numpy releases the GIL in every whole-array step.
    """

    def __init__(self, rows: slice, e: np.ndarray, c: float, exclude: np.ndarray, k: int) -> None:
        n = len(e)
        self.rows, self.e, self.c, self.exclude, self.k = rows, e, c, exclude, k
        self.best = np.full((n, k), _KEY_MIN, dtype=np.int16)  # (q, k): the k best keys so far, any order
        self.found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per block: rows, keys, columns kept
        self.threshold = np.full(n, _KEY_MIN + 1, dtype=np.int16)  # keeps everything until a k-th is known
        self.known = np.zeros(n, dtype=bool)

    def add_block(self, raw: np.ndarray, g_start: int, probe: int) -> None:
        """Keeps the entries of one block of bfloat16 scores (``raw``: their (q, n) int16 bit patterns, which this
        overwrites) that can still be in the top-k, and raises the thresholds."""
        k, e, c, threshold, known = self.k, self.e, self.c, self.threshold, self.known
        g_stop = g_start + raw.shape[1]
        # Once every threshold is positive the raw bits order like the keys where it matters: a non-negative
        # bfloat16's bits are its key, a negative one's are negative, below any positive threshold. The key
        # transform of the whole block is then skipped (it cost as much as the rest of the block's filtering).
        keys = raw if known.all() and (threshold > 0).all() else _keys(raw)
        rows, slots = _in_block(self.exclude, g_start, g_stop)
        keys[rows, self.exclude[rows, slots] - g_start] = _KEY_MIN
        unknown = np.flatnonzero(~known)
        if len(unknown):
            kth = _kth_keys(keys[unknown, :probe], k)
            found = kth > _KEY_MIN
            threshold[unknown[found]] = _thresholds(kth[found], e[unknown[found]], c)
            known[unknown[found]] = True
        flat = np.flatnonzero(keys >= threshold[:, None])  # row-major: rows come out sorted
        rows, cols = np.divmod(flat, g_stop - g_start)
        found = keys.ravel()[flat]
        self.found.append((rows, found, cols + g_start))
        # Only the k best keys matter for the threshold: the kept entries themselves are filtered once, at the end.
        new_keys, _ = _pack(rows, found, cols, len(e))
        merged = np.concatenate([self.best, new_keys], axis=1)
        self.best = np.partition(merged, merged.shape[1] - k, axis=1)[:, merged.shape[1] - k :]
        kth = self.best.min(axis=1)
        full = kth > _KEY_MIN
        threshold[full] = np.maximum(threshold[full], _thresholds(kth[full], e[full], c))
        known |= full

    def candidates(self) -> tuple[np.ndarray, np.ndarray]:
        """(q, C) keys and gallery columns (-1 padded) of every entry that reaches the final thresholds."""
        rows, keys, cols = (np.concatenate(parts) for parts in zip(*self.found, strict=True))
        keep = keys >= self.threshold[rows]
        order = np.argsort(rows[keep], kind="stable")  # blocks came in order, so columns stay ascending per row
        return _pack(rows[keep][order], keys[keep][order], cols[keep][order], len(self.e))

    def rerank(self, queries: np.ndarray, gallery: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """The float32 top-k of the slice's queries: (q, k) scores and gallery indices.

        In two rounds, because gathering the rows is most of the re-rank's cost: first the k candidates with the
        best bfloat16 scores, whose lowest exact score L is a lower bound on the exact k-th score (they are k real
        items); then only the other candidates that can still reach L, those with ``s + eps(s) >= L``. At CIRCO
        size that re-scores about 80 rows per query instead of 127.
        """
        k = self.k
        keys, cols = self.candidates()
        if cols.shape[1] <= k:
            exact = _exact_scores(queries, gallery, cols)  # (q, C)
            values, indices = _sort_rows(exact, cols)
            return values[:, :k], indices[:, :k]
        top = np.argpartition(keys, cols.shape[1] - k, axis=1)[:, cols.shape[1] - k :]  # (q, k), any order
        first = np.take_along_axis(cols, top, axis=1)
        first_exact = _exact_scores(queries, gallery, first)  # (q, k); -inf in padding slots
        lowest = first_exact.min(axis=1).astype(np.float64)  # (q,)
        s = _key_values(keys)  # (q, C) float64
        reach = s + self.e[:, None] + self.c * np.abs(s)
        reach += 1e-12 * (1 + np.abs(reach))  # float64 rounding of the bound, on the safe side
        rest = (reach >= lowest[:, None]) & (cols >= 0)
        np.put_along_axis(rest, top, False, axis=1)
        rows, slots = np.nonzero(rest)
        _, second = _pack(rows, keys[rows, slots], cols[rows, slots], len(cols))
        second_exact = _exact_scores(queries, gallery, second)  # (q, C2)
        values, indices = _sort_rows(
            np.concatenate([first_exact, second_exact], axis=1), np.concatenate([first, second], axis=1)
        )
        return values[:, :k], indices[:, :k]


def _slices(n: int, parts: int, least: int = 64) -> list[slice]:
    """``n`` rows cut into at most ``parts`` contiguous slices of at least ``least`` rows (one when n is small)."""
    parts = max(1, min(parts, n // least))
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def _bf16_topk(
    queries: np.ndarray,
    gallery: RankingGallery,
    k: int,
    exclude: np.ndarray,
    gather: np.ndarray,
    query_chunk: int,
    gallery_chunk: int,
) -> SearchResult:
    """bfloat16 scoring pass with a provably sufficient candidate set, then an exact float32 re-rank.

    torch's bfloat16 product of a whole block runs on every thread; the filtering after it and the re-rank are
    numpy, single-threaded per call, so the query chunk is cut into one slice per torch thread and the slices are
    filtered and re-ranked side by side.
    """
    import torch

    reduced, g_norm, g_err = gallery.bf16()  # (N, d) bfloat16
    n_queries, (n_gallery, dim) = len(queries), gallery.shape
    out_scores = np.empty((n_queries, k), dtype=np.float32)
    out_indices = np.empty((n_queries, k), dtype=np.int64)
    probe = max(2048, 4 * k)  # columns a first threshold is read from (any subset gives a valid lower bound)
    threads = max(1, torch.get_num_threads())
    with ThreadPoolExecutor(threads) as pool:
        for q_start in range(0, n_queries, query_chunk):
            q = queries[q_start : q_start + query_chunk]  # (q, d)
            q16 = torch.from_numpy(q).to(torch.bfloat16)
            q_err = q16.float().numpy() - q  # exact rounding errors, (q, d)
            q_norm = np.sqrt(np.einsum("qd,qd->q", q, q, dtype=np.float64)) * (1 + 1e-9)
            q_err = np.sqrt(np.einsum("qd,qd->q", q_err, q_err, dtype=np.float64)) * (1 + 1e-9)
            e, c = bf16_error_bound(q_norm, q_err, g_norm, g_err, dim)  # (q,)
            ex = exclude[q_start : q_start + query_chunk]
            parts = [_Candidates(r, e[r], c, ex[r], k) for r in _slices(len(q), threads)]
            for g_start in range(0, n_gallery, gallery_chunk):
                scores = torch.mm(q16, reduced[g_start : g_start + gallery_chunk].T)  # (q, n) bfloat16
                raw = scores.view(torch.int16).numpy()  # (q, n) bit patterns
                list(pool.map(lambda p, raw=raw, g=g_start: p.add_block(raw[p.rows], g, probe), parts))
            for part, (values, indices) in zip(
                parts, pool.map(lambda p, q=q: p.rerank(q[p.rows], gallery.embeddings), parts), strict=True
            ):
                rows = slice(q_start + part.rows.start, q_start + part.rows.stop)
                out_scores[rows], out_indices[rows] = values, indices
    gathered = _exact_scores(queries, gallery.embeddings, gather) if gather.size else None
    return SearchResult(out_scores, out_indices, gathered)


def topk_inner_product(
    queries: ArrayLike,
    gallery: ArrayLike | RankingGallery,
    k: int,
    *,
    exclude: ArrayLike | Sequence[int] | Sequence[Sequence[int]] | None = None,
    gather: ArrayLike | Sequence[Sequence[int]] | None = None,
    backend: Backend = "auto",
    precision: Precision = "auto",
    query_chunk: int = QUERY_CHUNK,
    gallery_chunk: int = GALLERY_CHUNK,
) -> SearchResult:
    """Exact top-k gallery items by inner product for every query, memory-bounded and deterministic.

    Args:
        queries: (Q, d) float numpy array or torch tensor (any device; a tensor selects ``torch`` under
            ``"auto"``). Must be finite.
        gallery: (N, d) numpy array, ``np.memmap`` (float32 or float16 storage), torch tensor, or a
            :class:`RankingGallery` (which keeps its bfloat16 copy between calls). Assumed finite.
        k: results per query. Clamped to ``N - m`` (m = excluded slots per query), so a tiny gallery yields
            fewer columns instead of an error; slice ``indices[:, :k]`` for smaller depths.
        exclude: gallery indices never returned for a query: (Q,) or (Q, m) ints or Q lists; negative entries
            exclude nothing (e.g. CIRR deletes each query's reference image from its ranking).
        gather: gallery indices whose scores to return as well, in the same forms as ``exclude`` (CIRR orders
            each query's ``img_set`` members by these); they come from the same float32 products as the ranking.
        backend: ``"auto"``, ``"torch"``, ``"faiss"`` or ``"numpy"`` for float32 ranking (see the module
            docstring); with ``gather``, ``faiss`` hands over to ``numpy`` (faiss returns no other scores).
        precision: ``"auto"``, ``"fp32"`` or ``"bf16"`` (a bfloat16 pass plus an exact float32 re-rank, on the
            CPU; see :func:`resolve_precision` for what ``"auto"`` picks).
        query_chunk: queries scored per step.
        gallery_chunk: gallery rows read and scored per step (all but the faiss backend).

    Returns:
        ``SearchResult(scores, indices, gathered)``: (Q, k') float32 scores, descending, and (Q, k') int64
        gallery indices, equal scores ordered by the lower index; k' = min(k, N - m).

    Raises:
        ValueError: bad shapes, k < 1, an out-of-range index, non-finite queries, an unknown backend or
            precision, or ``"bf16"`` asked for accelerator queries.
        cirlab._optional.MissingExtraError: ``backend="faiss"`` without faiss installed.
    """
    n_queries, n_gallery = _check_matrices(queries, gallery)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if query_chunk < 1 or gallery_chunk < 1:
        raise ValueError(f"chunk sizes must be positive, got query_chunk={query_chunk}, gallery_chunk={gallery_chunk}")
    name = resolve_backend(backend, queries, gallery)
    mode = resolve_precision(precision, queries, n_gallery)
    if mode == "bf16" and _is_tensor(queries) and queries.device.type != "cpu":
        raise ValueError("bf16 ranking runs on the CPU; rank accelerator queries with precision='fp32'")
    _check_finite_queries(queries)
    ex = index_matrix(exclude, n_queries, n_gallery, "exclude")
    ga = index_matrix(gather, n_queries, n_gallery, "gather")
    k = min(k, n_gallery - ex.shape[1])
    if k < 1 or n_queries == 0:
        empty = np.full(ga.shape, -np.inf, np.float32) if ga.size else None
        return SearchResult(np.empty((n_queries, 0), np.float32), np.empty((n_queries, 0), np.int64), empty)
    if mode == "bf16":
        prepared = gallery if isinstance(gallery, RankingGallery) else RankingGallery(gallery)
        q = np.require(_as_numpy(queries), np.float32, ["C", "W"])  # torch.from_numpy needs writable memory
        return _bf16_topk(q, prepared, k, ex, ga, query_chunk, gallery_chunk)
    rows = gallery.embeddings if isinstance(gallery, RankingGallery) else gallery
    if name == "faiss" and not ga.size:
        q = np.ascontiguousarray(_as_numpy(queries), dtype=np.float32)
        return _faiss_topk(q, rows, k, ex, query_chunk, gallery_chunk)
    scorer = (
        _TorchScorer(queries, query_chunk, gallery_chunk)
        if name == "torch"
        else _NumpyScorer(_as_numpy(queries), query_chunk, gallery_chunk)
    )
    return _chunked_topk(scorer, rows, k, ex, ga, query_chunk, gallery_chunk)
