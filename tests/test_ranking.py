"""The ranking path: agreement with brute force, exclusion, gathering, tie-breaking, backends, the bfloat16 pass."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cirlab.evaluation import ranking
from cirlab.evaluation.ranking import (
    RankingGallery,
    cpu_flags,
    resolve_backend,
    resolve_precision,
    topk_inner_product,
)

HAS_FAISS = importlib.util.find_spec("faiss") is not None
BACKENDS = [
    "numpy",
    "torch",
    pytest.param("faiss", marks=pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")),
    "bf16",
]
"""The float32 backends, and "bf16": the bfloat16 pass with its float32 re-rank (explicitly asked for, so it runs
on any CPU; slowly without native bfloat16, but these problems are tiny)."""


def rank(queries, gallery, k, backend, **kwargs):
    """``topk_inner_product`` with one of BACKENDS."""
    if backend == "bf16":
        return topk_inner_product(queries, gallery, k, backend="numpy", precision="bf16", **kwargs)
    return topk_inner_product(queries, gallery, k, backend=backend, precision="fp32", **kwargs)


def brute_force(queries: np.ndarray, gallery: np.ndarray, k: int, exclude: np.ndarray | None = None):
    """Reference ranking: full float64 scores, sorted by (score desc, index asc)."""
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T  # (Q, N)
    if exclude is not None:
        rows = np.flatnonzero(exclude >= 0)
        scores[rows, exclude[rows]] = -np.inf
    index = np.broadcast_to(np.arange(gallery.shape[0]), scores.shape)
    order = np.lexsort((index, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def small_ints(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # Small integers make every inner product exact in float32 whatever the summation order, and produce many
    # ties, so rankings can be compared exactly, tie-breaking included.
    return rng.integers(-2, 3, size=shape).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(
    n_queries=st.integers(1, 6),
    n_gallery=st.integers(1, 60),
    dim=st.integers(1, 8),
    k=st.integers(1, 70),
    query_chunk=st.integers(1, 7),
    gallery_chunk=st.integers(1, 25),
    with_exclude=st.booleans(),
    backend=st.sampled_from(["numpy", "torch", "bf16"] + (["faiss"] if HAS_FAISS else [])),
    seed=st.integers(0, 2**16),
)
def test_matches_brute_force_exactly(
    n_queries, n_gallery, dim, k, query_chunk, gallery_chunk, with_exclude, backend, seed
):
    rng = np.random.default_rng(seed)
    queries, gallery = small_ints(rng, (n_queries, dim)), small_ints(rng, (n_gallery, dim))
    exclude = rng.integers(-1, n_gallery, size=n_queries) if with_exclude else None
    result = rank(queries, gallery, k, backend, exclude=exclude, query_chunk=query_chunk, gallery_chunk=gallery_chunk)
    expected_k = max(0, min(k, n_gallery - (1 if with_exclude else 0)))
    scores, indices = brute_force(queries, gallery, expected_k, exclude)
    assert result.indices.shape == result.scores.shape == (n_queries, expected_k)
    assert result.indices.dtype == np.int64 and result.scores.dtype == np.float32
    np.testing.assert_array_equal(result.indices, indices)
    np.testing.assert_array_equal(result.scores, scores.astype(np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_float_data_agrees_with_brute_force(backend):
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((9, 32), dtype=np.float32)
    gallery = rng.standard_normal((700, 32), dtype=np.float32)
    result = rank(queries, gallery, 20, backend, gallery_chunk=128, query_chunk=4)
    scores, indices = brute_force(queries, gallery, 20)
    np.testing.assert_array_equal(result.indices, indices)
    np.testing.assert_allclose(result.scores, scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gallery_chunk", [1, 2, 3, 1000])
def test_equal_scores_rank_lower_gallery_index_first(backend, gallery_chunk):
    gallery = np.array([[0, 1], [1, 0], [0, 1], [1, 0], [1, 0], [0.5, 0]], dtype=np.float32)
    queries = np.array([[1, 0], [0, 1]], dtype=np.float32)
    result = rank(queries, gallery, 4, backend, gallery_chunk=gallery_chunk)
    np.testing.assert_array_equal(result.indices, [[1, 3, 4, 5], [0, 2, 1, 3]])
    np.testing.assert_array_equal(result.scores, [[1, 1, 1, 0.5], [1, 1, 0, 0]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tie_across_the_kth_place_keeps_the_lowest_indices(backend):
    # 100 identical rows tie for every place: only the lowest 5 indices may come back, whatever the backend's
    # selection returned first (faiss and torch.topk pick arbitrary members of a tie).
    gallery = np.ones((100, 4), dtype=np.float32)
    gallery[::7] = 2.0  # 15 strictly better rows
    queries = np.ones((3, 4), dtype=np.float32)
    result = rank(queries, gallery, 20, backend, gallery_chunk=33)
    best = np.arange(0, 100, 7)
    rest = np.setdiff1d(np.arange(100), best)[:5]
    np.testing.assert_array_equal(result.indices, np.tile(np.concatenate([best, rest]), (3, 1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_removes_each_querys_own_items(backend):
    rng = np.random.default_rng(1)
    gallery = small_ints(rng, (40, 6))
    queries = gallery[[3, 7, 11]]  # each query's best match is its own reference image
    exclude = np.array([[3, -1], [7, 8], [-1, -1]])
    result = rank(queries, gallery, 10, backend, exclude=exclude, gallery_chunk=9)
    assert 3 not in result.indices[0]
    assert not {7, 8} & set(result.indices[1].tolist())
    _, expected = brute_force(queries, gallery, 10, exclude=None)
    masked = brute_force(queries, gallery, 10, exclude=np.array([3, 7, -1]))[1]
    np.testing.assert_array_equal(result.indices[0], masked[0])
    np.testing.assert_array_equal(result.indices[2], expected[2])
    assert result.indices.shape == (3, 10)


def test_k_is_clamped_to_the_rankable_items():
    gallery = np.eye(5, dtype=np.float32)
    queries = np.ones((2, 5), dtype=np.float32)
    assert topk_inner_product(queries, gallery, 50).indices.shape == (2, 5)
    assert topk_inner_product(queries, gallery, 50, exclude=[0, 1]).indices.shape == (2, 4)
    assert topk_inner_product(queries, gallery, 50, exclude=[[0, 1]] * 2).indices.shape == (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be at least 1"),
        ({"exclude": [9, 0]}, "exclude holds gallery index 9"),
        ({"exclude": [0, 0, 0]}, "exclude must have shape"),
        ({"backend": "annoy"}, "unknown search backend"),
        ({"gallery_chunk": 0}, "chunk sizes must be positive"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    args = {"k": 3} | kwargs
    with pytest.raises(ValueError, match=message):
        topk_inner_product(np.ones((2, 4), np.float32), np.ones((5, 4), np.float32), **args)


def test_shape_mismatch_and_nan_queries_raise():
    with pytest.raises(ValueError, match="dimension 4 but the gallery has 3"):
        topk_inner_product(np.ones((2, 4), np.float32), np.ones((5, 3), np.float32), 1)
    queries = np.ones((2, 4), np.float32)
    queries[1, 2] = np.nan
    with pytest.raises(ValueError, match="query row 1"):
        topk_inner_product(queries, np.ones((5, 4), np.float32), 1)


def test_backends_agree_and_accept_tensors_memmaps_and_float16(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    queries, gallery = small_ints(rng, (5, 8)), small_ints(rng, (300, 8))
    np.save(tmp_path / "g.npy", gallery)
    mapped = np.load(tmp_path / "g.npy", mmap_mode="r")
    expected = brute_force(queries, gallery, 12)[1]
    variants = [
        (torch.from_numpy(queries), torch.from_numpy(gallery)),
        (queries, mapped),
        (torch.from_numpy(queries), mapped),
        (queries, gallery.astype(np.float16)),  # small integers are exact in float16
    ]
    for backend in ["numpy", "torch", "bf16"] + (["faiss"] if HAS_FAISS else []):
        for q, g in variants:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # e.g. torch's warning about sharing a read-only memmap
                result = rank(q, g, 12, backend, gallery_chunk=64)
            np.testing.assert_array_equal(result.indices, expected, err_msg=f"{backend} {type(g)} {g.dtype}")


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
def test_faiss_blas_threshold_is_restored():
    import faiss

    before = faiss.cvar.distance_compute_blas_threshold
    topk_inner_product(np.ones((30, 4), np.float32), np.ones((50, 4), np.float32), 5, backend="faiss")
    assert faiss.cvar.distance_compute_blas_threshold == before


def test_auto_backend_choice(monkeypatch):
    queries = np.ones((1, 2), np.float32)
    assert resolve_backend("auto", queries) == ("faiss" if HAS_FAISS else "numpy")
    assert resolve_backend("torch", queries) == "torch"
    assert resolve_backend("auto", queries, np.ones((3, 2), np.float16)) == "numpy"  # faiss would copy it whole
    assert resolve_backend("auto", __import__("torch").ones(1, 2)) == "torch"  # the evaluator's torch.mm products
    monkeypatch.setattr(ranking.importlib.util, "find_spec", lambda name: None)
    assert resolve_backend("auto", queries) == "numpy"


def test_accelerator_queries_stay_on_their_device():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(3)
    queries, gallery = small_ints(rng, (4, 16)), small_ints(rng, (500, 16))
    assert resolve_backend("auto", torch.from_numpy(queries).cuda()) == "torch"
    result = topk_inner_product(torch.from_numpy(queries).cuda(), gallery, 10, gallery_chunk=128)
    np.testing.assert_array_equal(result.indices, brute_force(queries, gallery, 10)[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gathered_scores_are_the_ranking_scores(backend):
    rng = np.random.default_rng(4)
    queries, gallery = small_ints(rng, (6, 10)), small_ints(rng, (53, 10))
    gather = [[4, 1, 19], [], [7], [0, 52], [3], [5, 5]]
    result = rank(queries, gallery, 5, backend, gather=gather, gallery_chunk=16)
    full = queries @ gallery.T  # exact: small integers
    assert result.gathered.shape == (6, 3)
    for i, cols in enumerate(gather):
        np.testing.assert_array_equal(result.gathered[i, : len(cols)], full[i, cols])
        assert np.isneginf(result.gathered[i, len(cols) :]).all()
    top_scores = np.take_along_axis(full, result.indices, axis=1)
    np.testing.assert_array_equal(result.scores, top_scores)
    with pytest.raises(ValueError, match="gather holds gallery index 53"):
        rank(queries, gallery, 5, backend, gather=[[53]] * 6)


def near_tie_problem(seed: int, n_gallery: int = 3000, n_near: int = 400, dim: int = 48):
    """Unit queries and a gallery where, per query, ``n_near`` items crowd the top with scores far closer together
    than bfloat16 can tell apart (its spacing near 1 is 2^-8), so the bfloat16 order of the top is mostly noise."""
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((4, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gallery = rng.standard_normal((n_gallery, dim)).astype(np.float32)
    for q in queries:
        rows = rng.choice(n_gallery, n_near, replace=False)
        gallery[rows] = q + rng.uniform(0.0, 0.06, (n_near, 1)) * rng.standard_normal((n_near, dim))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    gallery[:20] = gallery[20]  # exact duplicates: ties in float32 as well
    return queries, gallery.astype(np.float32)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 10, 50])
def test_bf16_pass_gives_the_float32_top_k(seed, k):
    queries, gallery = near_tie_problem(seed)
    n = len(gallery)
    exclude = np.array([[20, 5], [-1, -1], [0, 1], [2999, -1]])
    bf16 = topk_inner_product(queries, gallery, k, exclude=exclude, precision="bf16", gallery_chunk=700)
    # Brute force with the re-rank's own float32 arithmetic over the whole gallery: identical, ties included.
    own = ranking._exact_scores(queries, gallery, np.tile(np.arange(n), (len(queries), 1))).astype(np.float64)
    for r, c in zip(*np.nonzero(exclude >= 0), strict=True):
        own[r, exclude[r, c]] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(n), own.shape), -own), axis=1)[:, :k]
    np.testing.assert_array_equal(bf16.indices, order)
    # Against another float32 backend (another summation order): the same top-k up to last-bit near-ties.
    fp32 = topk_inner_product(queries, gallery, k, exclude=exclude, backend="numpy", precision="fp32")
    np.testing.assert_allclose(bf16.scores, fp32.scores, rtol=0, atol=1e-6)
    exact = queries.astype(np.float64) @ gallery.T.astype(np.float64)
    for r in range(len(queries)):
        np.testing.assert_allclose(np.sort(exact[r, bf16.indices[r]]), np.sort(exact[r, fp32.indices[r]]), atol=1e-6)


def test_bf16_error_bound_holds_for_every_pair():
    # The bound the candidate set rests on, checked on every query-gallery pair: bfloat16 scores (torch's oneDNN
    # matmul, as the pass computes them) against float32 and float64 evaluations, scores near 1 included.
    torch = pytest.importorskip("torch")
    queries, gallery = near_tie_problem(1, n_gallery=2000, dim=256)
    gallery[:4] = queries  # scores of exactly 1 in real arithmetic
    prepared = RankingGallery(gallery)
    reduced, g_norm, g_err = prepared.bf16()
    q16 = torch.from_numpy(queries).to(torch.bfloat16)
    q_err = np.linalg.norm(q16.float().numpy() - queries, axis=1)
    e, c = ranking.bf16_error_bound(np.linalg.norm(queries, axis=1), q_err, g_norm, g_err, 256)
    approx = torch.mm(q16, reduced.T).double().numpy()  # (Q, N)
    bound = e[:, None] + c * np.abs(approx)
    for exact in (queries @ gallery.T, queries.astype(np.float64) @ gallery.T.astype(np.float64)):
        assert (np.abs(approx - exact) <= bound).all()
    assert 0 < e.max() < 0.004  # measured rounding: well under the worst case 2u = 0.0078


def test_ranking_gallery_converts_once_and_bounds_its_rounding():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    gallery = rng.standard_normal((300, 24)).astype(np.float32)
    prepared = RankingGallery(gallery)
    first, norm, err = prepared.bf16()
    assert prepared.bf16()[0] is first and first.dtype == torch.bfloat16
    assert norm >= np.linalg.norm(gallery, axis=1).max()
    assert err >= np.linalg.norm(first.float().numpy() - gallery, axis=1).max() > 0
    queries = rng.standard_normal((5, 24)).astype(np.float32)
    a = topk_inner_product(queries, prepared, 7, precision="bf16")
    b = topk_inner_product(queries, gallery, 7, backend="numpy", precision="fp32")
    np.testing.assert_array_equal(a.indices, b.indices)
    assert topk_inner_product(queries, prepared, 7, backend="numpy").indices.shape == (5, 7)


def test_precision_is_chosen_from_cpu_features_and_size():
    big = np.ones((800, 4), np.float32)
    native, avx2 = frozenset({"avx2", "avx512_bf16"}), frozenset({"avx2", "fma"})
    assert resolve_precision("auto", big, 123_403, flags=native) == "bf16"
    assert resolve_precision("auto", big, 123_403, flags=frozenset({"amx_bf16"})) == "bf16"
    # torch's bfloat16 matmul without native support is several times slower than float32: never chosen there.
    assert resolve_precision("auto", big, 123_403, flags=avx2) == "fp32"
    assert resolve_precision("auto", big, 1_000, flags=native) == "fp32"  # too small to profit
    assert resolve_precision("auto", big[:1], 10_000_000, flags=native) == "fp32"  # one query: memory-bound
    assert resolve_precision("fp32", big, 123_403, flags=native) == "fp32"
    assert resolve_precision("bf16", big, 10, flags=avx2) == "bf16"  # an explicit choice is kept
    with pytest.raises(ValueError, match="unknown ranking precision"):
        resolve_precision("int4", big, 10)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512_bf16 avx512_vnni\n\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16", "avx512_vnni"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_bf16_pass_over_several_slices_matches_brute_force(sign):
    """Enough queries for one filtering slice per thread, exclusions in every slice, and (sign -1) every score
    negative, so the thresholds stay negative and the key transform is never skipped."""
    rng = np.random.default_rng(7)
    n_queries, n_gallery, dim, k = 300, 4000, 48, 20
    queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gallery = rng.standard_normal((n_gallery, dim)).astype(np.float32)
    if sign < 0:  # every gallery row on the far side of every query
        gallery = -np.abs(gallery)
        queries = np.abs(queries)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    exclude = rng.integers(-1, n_gallery, (n_queries, 3))
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        bf16 = topk_inner_product(queries, gallery, k, exclude=exclude, precision="bf16", gallery_chunk=900)
    finally:
        torch.set_num_threads(threads)
    own = ranking._exact_scores(queries, gallery, np.tile(np.arange(n_gallery), (n_queries, 1))).astype(np.float64)
    for r, c in zip(*np.nonzero(exclude >= 0), strict=True):
        own[r, exclude[r, c]] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(n_gallery), own.shape), -own), axis=1)[:, :k]
    np.testing.assert_array_equal(bf16.indices, order)
    assert (bf16.scores < 0).all() if sign < 0 else (bf16.scores > 0).all()
