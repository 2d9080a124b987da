"""Exact top-k search: agreement with brute force, exclusion, tie-breaking, backends, helpers."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cirlab.evaluation import search
from cirlab.evaluation.search import full_scores, pair_scores, resolve_backend, topk_inner_product

HAS_FAISS = importlib.util.find_spec("faiss") is not None
BACKENDS = [
    "numpy",
    "torch",
    pytest.param("faiss", marks=pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")),
]


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
    backend=st.sampled_from(["numpy", "torch", "faiss"] if HAS_FAISS else ["numpy", "torch"]),
    seed=st.integers(0, 2**16),
)
def test_matches_brute_force_exactly(
    n_queries, n_gallery, dim, k, query_chunk, gallery_chunk, with_exclude, backend, seed
):
    rng = np.random.default_rng(seed)
    queries, gallery = small_ints(rng, (n_queries, dim)), small_ints(rng, (n_gallery, dim))
    exclude = rng.integers(-1, n_gallery, size=n_queries) if with_exclude else None
    result = topk_inner_product(
        queries, gallery, k, exclude=exclude, backend=backend, query_chunk=query_chunk, gallery_chunk=gallery_chunk
    )
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
    result = topk_inner_product(queries, gallery, 20, backend=backend, gallery_chunk=128, query_chunk=4)
    scores, indices = brute_force(queries, gallery, 20)
    np.testing.assert_array_equal(result.indices, indices)
    np.testing.assert_allclose(result.scores, scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gallery_chunk", [1, 2, 3, 1000])
def test_equal_scores_rank_lower_gallery_index_first(backend, gallery_chunk):
    gallery = np.array([[0, 1], [1, 0], [0, 1], [1, 0], [1, 0], [0.5, 0]], dtype=np.float32)
    queries = np.array([[1, 0], [0, 1]], dtype=np.float32)
    result = topk_inner_product(queries, gallery, 4, backend=backend, gallery_chunk=gallery_chunk)
    np.testing.assert_array_equal(result.indices, [[1, 3, 4, 5], [0, 2, 1, 3]])
    np.testing.assert_array_equal(result.scores, [[1, 1, 1, 0.5], [1, 1, 0, 0]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tie_across_the_kth_place_keeps_the_lowest_indices(backend):
    # 100 identical rows tie for every place: only the lowest 5 indices may come back, whatever the backend's
    # selection returned first (faiss and torch.topk pick arbitrary members of a tie).
    gallery = np.ones((100, 4), dtype=np.float32)
    gallery[::7] = 2.0  # 15 strictly better rows
    queries = np.ones((3, 4), dtype=np.float32)
    result = topk_inner_product(queries, gallery, 20, backend=backend, gallery_chunk=33)
    best = np.arange(0, 100, 7)
    rest = np.setdiff1d(np.arange(100), best)[:5]
    np.testing.assert_array_equal(result.indices, np.tile(np.concatenate([best, rest]), (3, 1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_removes_each_querys_own_items(backend):
    rng = np.random.default_rng(1)
    gallery = small_ints(rng, (40, 6))
    queries = gallery[[3, 7, 11]]  # each query's best match is its own reference image
    exclude = np.array([[3, -1], [7, 8], [-1, -1]])
    result = topk_inner_product(queries, gallery, 10, exclude=exclude, backend=backend, gallery_chunk=9)
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
    for backend in ["numpy", "torch"] + (["faiss"] if HAS_FAISS else []):
        for q, g in variants:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # e.g. torch's warning about sharing a read-only memmap
                result = topk_inner_product(q, g, 12, backend=backend, gallery_chunk=64)
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
    monkeypatch.setattr(search.importlib.util, "find_spec", lambda name: None)
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


def test_full_scores_matches_matmul():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    queries = rng.standard_normal((6, 10), dtype=np.float32)
    gallery = rng.standard_normal((53, 10), dtype=np.float32)
    expected = queries @ gallery.T
    for backend in ("numpy", "torch", "auto"):
        out = full_scores(queries, gallery, backend=backend, gallery_chunk=16)
        assert out.shape == (6, 53) and out.dtype == np.float32
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    out = full_scores(torch.from_numpy(queries), torch.from_numpy(gallery))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_pair_scores_from_ragged_lists_and_matrices():
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((3, 8), dtype=np.float32)
    gallery = rng.standard_normal((20, 8), dtype=np.float32)
    full = queries @ gallery.T
    out = pair_scores(queries, gallery, [[4, 1, 19], [], [7]], query_chunk=2)
    assert out.shape == (3, 3)
    np.testing.assert_allclose(out[0], full[0, [4, 1, 19]], rtol=1e-5)
    assert np.isneginf(out[1]).all()
    np.testing.assert_allclose(out[2, 0], full[2, 7], rtol=1e-5)
    assert np.isneginf(out[2, 1:]).all()
    matrix = pair_scores(queries, gallery, np.array([[0, 5], [6, -1], [2, 2]]))
    np.testing.assert_allclose(matrix[0], full[0, [0, 5]], rtol=1e-5)
    np.testing.assert_allclose(matrix[1, 0], full[1, 6], rtol=1e-5)
    assert np.isneginf(matrix[1, 1])
    np.testing.assert_allclose(matrix[2], full[2, [2, 2]], rtol=1e-5)
    with pytest.raises(ValueError, match="gallery index 20"):
        pair_scores(queries, gallery, [[20], [], []])
