"""Metrics on hand-made rankings with known answers, property tests, and the benchmark rules of protocols.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cirlab.data.benchmark import CIRQuery, CIRSplit, Protocol
from cirlab.evaluation import metrics as M
from cirlab.evaluation.protocols import SplitRanking, combine_metrics, evaluate_ranking, rank_split, ranking_metrics
from cirlab.evaluation.ranking import topk_inner_product


def _embed(scores) -> tuple[np.ndarray, np.ndarray]:
    """Queries and a gallery whose inner products are exactly ``scores``: the rows, against the identity."""
    return np.asarray(scores, dtype=np.float32), np.eye(np.asarray(scores).shape[1], dtype=np.float32)


def topk_indices(scores, k: int) -> np.ndarray:
    """The ranking path's top-k of a hand-made score matrix."""
    return topk_inner_product(*_embed(scores), k).indices


def rank_scores(split: CIRSplit, scores, k: int | None = None):
    return rank_split(split, *_embed(scores), k)


def evaluate_scores(split: CIRSplit, scores) -> dict[str, float]:
    """The evaluator's ranking and metrics on hand-made scores."""
    return evaluate_ranking(split, rank_scores(split, scores))


# --- Recall@K ------------------------------------------------------------------------------------------------------


def test_recall_at_k_hand_made():
    rankings = [["a", "b", "c"], ["c", "a", "b"], ["b", "c", "a"]]
    targets = ["b", "b", "b"]
    assert M.recall_at_k(rankings, targets, 1) == pytest.approx(100 / 3)
    assert M.recall_at_k(rankings, targets, 2) == pytest.approx(200 / 3)
    assert M.recall_at_k(rankings, targets, 3) == 100.0


def test_recall_k_larger_than_the_list_counts_only_what_is_there():
    assert M.recall_at_k([["a", "b"], ["c", "d"]], ["b", "z"], 50) == 50.0


def test_recall_array_and_list_paths_agree():
    rng = np.random.default_rng(0)
    rankings = np.stack([rng.permutation(30)[:10] for _ in range(40)])
    targets = rng.integers(0, 30, size=40)
    for k in (1, 3, 10, 20):
        assert M.recall_at_k(rankings, targets, k) == M.recall_at_k(rankings.tolist(), targets.tolist(), k)


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_invalid_k_raises(k):
    with pytest.raises(ValueError, match="K must be a positive integer"):
        M.recall_at_k([["a"]], ["a"], k)


def test_empty_or_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="no queries"):
        M.recall_at_k([], [], 1)
    with pytest.raises(ValueError, match="2 rankings but 1"):
        M.recall_at_k([["a"], ["b"]], ["a"], 1)


# --- CIRR Recall_subset@K ------------------------------------------------------------------------------------------


def test_cirr_subset_keeps_members_in_ranking_order():
    # Full ranking: r is the reference (not a candidate); x, y are not members.
    ranking = ["x", "a", "y", "b", "c", "d", "e"]
    subset = {"a", "b", "c", "d", "e"}
    assert M.cirr_recall_subset_at_k([ranking], ["b"], [subset], 1) == 0.0
    assert M.cirr_recall_subset_at_k([ranking], ["b"], [subset], 2) == 100.0
    assert M.cirr_recall_subset_at_k([ranking], ["e"], [subset], 3) == 0.0


def test_cirr_subset_accepts_a_submission_style_top3():
    assert M.cirr_recall_subset_at_k([["c", "b", "a"]], ["a"], [["a", "b", "c", "d", "e"]], 3) == 100.0
    assert M.cirr_recall_subset_at_k([["c", "b", "a"]], ["a"], [["a", "b", "c", "d", "e"]], 2) == 0.0


# --- CIRCO mAP@K ---------------------------------------------------------------------------------------------------


def test_map_hand_computed():
    # Ground truths at ranks 1, 3 and 5 out of 4 ground truths.
    ranking = ["g1", "x1", "g2", "x2", "g3", "x3"]
    gts = ["g1", "g2", "g3", "g4"]
    # K=5: (1/1 + 2/3 + 3/5) / min(5, 4)
    assert M.circo_map_at_k([ranking], [gts], 5) == pytest.approx((1 + 2 / 3 + 3 / 5) / 4 * 100)
    # K=2: only rank 1 counts; divided by min(2, 4) = 2
    assert M.circo_map_at_k([ranking], [gts], 2) == pytest.approx(50.0)
    # K=3: (1 + 2/3) / 3
    assert M.circo_map_at_k([ranking], [gts], 3) == pytest.approx((1 + 2 / 3) / 3 * 100)


def test_map_one_ground_truth_is_reciprocal_rank_within_k():
    ranking = ["x", "y", "g", "z"]
    assert M.circo_map_at_k([ranking], [["g"]], 5) == pytest.approx(100 / 3)
    assert M.circo_map_at_k([ranking], [["g"]], 2) == 0.0
    # K larger than the list: the sum is over the list; still divided by min(K, #gt) = 1.
    assert M.circo_map_at_k([ranking], [["g"]], 50) == pytest.approx(100 / 3)


def test_map_fourteen_ground_truths():
    gts = [f"g{i}" for i in range(14)]
    top = gts + [f"x{i}" for i in range(36)]  # all 14 first
    for k in (5, 10, 25, 50):
        assert M.circo_map_at_k([top], [gts], k) == pytest.approx(100.0)
    # Ground truths at every other rank: precision at the j-th hit (rank 2j-1) is j/(2j-1).
    interleaved = [item for pair in zip(gts, [f"x{i}" for i in range(14)], strict=True) for item in pair]
    for k in (5, 10, 25, 50):
        hits = [(j + 1) / (2 * j + 1) for j in range(14) if 2 * j + 1 <= k]
        assert M.circo_map_at_k([interleaved], [gts], k) == pytest.approx(sum(hits) / min(k, 14) * 100)


def test_map_is_the_mean_over_queries():
    rankings = [["g", "x"], ["x", "g"]]
    assert M.circo_map_at_k(rankings, [["g"], ["g"]], 5) == pytest.approx((1 + 0.5) / 2 * 100)


def test_map_rejects_duplicate_predictions_naming_the_query():
    with pytest.raises(ValueError, match=r"query 1: .*duplicate"):
        M.circo_map_at_k([["a", "b"], ["g", "g"]], [["a"], ["g"]], 5)


def test_circo_recall_uses_only_the_first_ground_truth():
    ranking = ["g2", "g3", "g1"]
    assert M.circo_recall_at_k([ranking], [["g1", "g2", "g3"]], 2) == 0.0
    assert M.circo_recall_at_k([ranking], [["g1", "g2", "g3"]], 3) == 100.0


def test_per_aspect_map_averages_over_queries_with_the_aspect():
    rankings = [["g"], ["x", "g"], ["x"]]
    gts = [["g"], ["g"], ["g"]]
    aspects = [["a", "b"], ["b"], ["c"]]
    out = M.circo_map_per_aspect(rankings, gts, aspects, 10)
    assert out == pytest.approx({"a": 100.0, "b": 75.0, "c": 0.0})


def _official_ap(predictions: list[int], gts: list[int], k: int) -> float:
    """The arithmetic of CIRCO's src/evaluation.py, re-typed from its description (FORMATS.md 2.3)."""
    preds = np.array(predictions, dtype=int)
    labels = np.isin(preds, gts)
    precisions = np.cumsum(labels, axis=0) * labels / np.arange(1, labels.shape[0] + 1)
    return float(np.sum(precisions[:k]) / min(len(gts), k))


# --- properties ----------------------------------------------------------------------------------------------------

_UNIVERSE = 40


@st.composite
def _queries(draw):
    """(rankings, ground truths): unique int rankings of length 1..30 and 1..14 unique ground truths."""
    n = draw(st.integers(1, 6))
    rankings, gts = [], []
    for _ in range(n):
        perm = draw(st.permutations(range(_UNIVERSE)))
        rankings.append(list(perm[: draw(st.integers(1, 30))]))
        gts.append(draw(st.lists(st.integers(0, _UNIVERSE - 1), min_size=1, max_size=14, unique=True)))
    return rankings, gts


@settings(max_examples=150, deadline=None)
@given(_queries(), st.integers(1, 60))
def test_property_map_in_range_and_equal_to_the_official_arithmetic(data, k):
    rankings, gts = data
    value = M.circo_map_at_k(rankings, gts, k)
    assert 0.0 <= value <= 100.0
    official = float(np.mean([_official_ap(r, g, k) for r, g in zip(rankings, gts, strict=True)])) * 100
    assert value == pytest.approx(official, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(_queries())
def test_property_recall_monotone_in_k(data):
    rankings, gts = data
    values = [M.circo_recall_at_k(rankings, gts, k) for k in range(1, 35)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    targets = [g[0] for g in gts]
    plain = [M.recall_at_k(rankings, targets, k) for k in range(1, 35)]
    assert values == plain


@settings(max_examples=100, deadline=None)
@given(_queries(), st.integers(1, 60))
def test_property_single_ground_truth(data, k):
    rankings, gts = data
    single = [g[:1] for g in gts]
    # With one ground truth AP@K is 1/rank within K: at K=1 mAP equals recall, and never exceeds it.
    assert M.circo_map_at_k(rankings, single, 1) == pytest.approx(M.circo_recall_at_k(rankings, single, 1))
    assert M.circo_map_at_k(rankings, single, k) <= M.circo_recall_at_k(rankings, single, k) + 1e-9


@settings(max_examples=100, deadline=None)
@given(_queries())
def test_property_subset_recall_reaches_100_at_subset_size(data):
    rankings, _ = data
    subsets = [list(r[:5]) for r in rankings]
    targets = [s[-1] for s in subsets]
    assert M.cirr_recall_subset_at_k(rankings, targets, subsets, 5) == 100.0


def test_summary_columns():
    assert M.cirr_avg({"recall_at_5": 60.0, "recall_subset_at_1": 40.0}) == 50.0
    out = M.fashioniq_average(
        {
            "dress": {"recall_at_10": 10.0, "recall_at_50": 30.0},
            "shirt": {"recall_at_10": 20.0, "recall_at_50": 40.0},
            "toptee": {"recall_at_10": 30.0, "recall_at_50": 50.0},
        }
    )
    assert out["dress/recall_at_10"] == 10.0 and out["toptee/recall_at_50"] == 50.0
    assert out["recall_at_10"] == pytest.approx(20.0)
    assert out["recall_at_50"] == pytest.approx(40.0)
    assert out["avg"] == pytest.approx(30.0)


# --- deterministic top-K -------------------------------------------------------------------------------------------


def _reference_order(scores: np.ndarray) -> np.ndarray:
    """Full ranking by (score desc, index asc), via lexsort: the documented tie rule."""
    idx = np.arange(scores.shape[1])
    return np.stack([np.lexsort((idx, -row)) for row in scores])


def test_topk_ties_go_to_the_lower_gallery_index():
    scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]], dtype=np.float32)
    assert topk_indices(scores, 2).tolist() == [[1, 0]]
    assert topk_indices(scores, 3).tolist() == [[1, 0, 2]]
    assert topk_indices(scores, 10).tolist() == [[1, 0, 2, 3, 4]]


@pytest.mark.parametrize("k", [1, 5, 17, 64, 200])
def test_topk_matches_a_full_stable_sort_on_tie_heavy_scores(k):
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 4, size=(300, 64)).astype(np.float32)  # many ties, more rows than one block
    expected = _reference_order(scores)[:, :k]
    assert np.array_equal(topk_indices(scores, k), expected)


def test_topk_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    scores = torch.randint(0, 3, (20, 30)).to(torch.bfloat16)
    expected = _reference_order(scores.float().numpy())[:, :7]
    assert np.array_equal(topk_inner_product(scores, torch.eye(30), 7).indices, expected)


def test_nan_queries_are_rejected():
    scores = np.zeros((3, 4), dtype=np.float32)
    scores[2, 1] = np.nan
    with pytest.raises(ValueError, match="query row 2 contains NaN"):
        topk_indices(scores, 2)


# --- benchmark rules on in-memory splits ---------------------------------------------------------------------------


def _cirr_split(n_gallery: int = 12, n_queries: int = 30, seed: int = 0) -> CIRSplit:
    rng = np.random.default_rng(seed)
    gallery = [f"img{i}" for i in range(n_gallery)]
    queries = []
    for q in range(n_queries):
        members = [gallery[i] for i in rng.choice(n_gallery, 6, replace=False)]
        queries.append(
            CIRQuery(qid=str(q), reference=members[0], text="t", texts=["t"], targets=[members[1]], subset=members)
        )
    protocol = Protocol(
        "cirr", remove_reference=True, has_ground_truth=True, recall_ks=(1, 5, 10, 50), subset_ks=(1, 2, 3)
    )
    return CIRSplit("cirr", "val", None, queries, gallery, protocol)


def _brute_force_cirr(split: CIRSplit, scores: np.ndarray) -> dict[str, float]:
    """The CIRR rules spelled out on full rankings (SEARLE's procedure), independent of protocols.py."""
    order = _reference_order(scores)
    hits = {f"recall_at_{k}": [] for k in (1, 5, 10, 50)} | {f"recall_subset_at_{k}": [] for k in (1, 2, 3)}
    for q, row in zip(split.queries, order, strict=True):
        names = [split.gallery[i] for i in row if split.gallery[i] != q.reference]
        for k in (1, 5, 10, 50):
            hits[f"recall_at_{k}"].append(q.targets[0] in names[:k])
        group = [n for n in names if n in q.subset]
        for k in (1, 2, 3):
            hits[f"recall_subset_at_{k}"].append(q.targets[0] in group[:k])
    return {key: float(np.mean(v)) * 100 for key, v in hits.items()}


def test_cirr_reference_is_removed_before_recall():
    split = _cirr_split(n_queries=1)
    q = split.queries[0]
    scores = np.zeros((1, len(split.gallery)), dtype=np.float32)
    scores[0, split.gallery_index[q.reference]] = 2.0  # the reference would be first
    scores[0, split.gallery_index[q.targets[0]]] = 1.0
    out = evaluate_scores(split, scores)
    assert out["recall_at_1"] == 100.0
    assert out["recall_subset_at_1"] == 100.0
    assert out["avg"] == 100.0
    assert q.reference not in [split.gallery[i] for i in rank_scores(split, scores, 50).top[0]]


@pytest.mark.parametrize("seed", range(4))
def test_cirr_scores_match_the_brute_force_protocol(seed):
    split = _cirr_split(seed=seed)
    rng = np.random.default_rng(100 + seed)
    scores = rng.integers(0, 3, size=(len(split.queries), len(split.gallery))).astype(np.float32)  # ties
    expected = _brute_force_cirr(split, scores)
    out = evaluate_scores(split, scores)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value), key
    # The scorer's path: the same metrics from the rankings spelt as names (reference removed, as in a file).
    names = [
        [split.gallery[i] for i in row if split.gallery[i] != q.reference]
        for row, q in zip(_reference_order(scores), split.queries, strict=True)
    ]
    subsets = [[n for n in row if n in q.subset] for row, q in zip(names, split.queries, strict=True)]
    assert ranking_metrics(split, names, subsets, item=str) == pytest.approx(out)


def _circo_split(remove_reference: bool = False) -> CIRSplit:
    gallery = [str(1000 + i) for i in range(60)]
    queries = [
        CIRQuery("0", "1000", "t", ["t"], ["1001"], aspects=["cardinality"]),
        CIRQuery("1", "1002", "t", ["t"], ["1003", "1004", "1005"], aspects=["addition", "cardinality"]),
        CIRQuery("2", "1010", "t", ["t"], [str(1020 + i) for i in range(14)], aspects=[]),
    ]
    protocol = Protocol(
        "circo", remove_reference, True, recall_ks=(5, 10, 25, 50), map_ks=(5, 10, 25, 50), aspect_map_k=10
    )
    return CIRSplit("circo", "val", None, queries, gallery, protocol)


def test_circo_protocol_keeps_the_reference_by_default():
    split = _circo_split()
    scores = np.zeros((3, 60), dtype=np.float32)
    for i, q in enumerate(split.queries):
        scores[i, split.gallery_index[q.reference]] = 3.0
        scores[i, split.gallery_index[q.targets[0]]] = 2.0
    out = evaluate_scores(split, scores)
    # Every ranking is: reference, target, then the zero-score images in gallery order.
    assert out["recall_at_5"] == 100.0
    ap_q0 = 1 / 2  # its only ground truth at rank 2
    ap_q1 = (1 / 2 + 2 / 5) / 3  # 1003 at rank 2; 1004 at rank 5 (after 1000, 1001); 1005 at rank 6 > K
    ap_q2 = (1 / 2) / 5  # 1020 at rank 2; the other 13 after 1000..1009 and 1011..1019
    assert out["map_at_5"] == pytest.approx((ap_q0 + ap_q1 + ap_q2) / 3 * 100)
    assert set(out) >= {"map_at_10/cardinality", "map_at_10/addition"}
    assert out["map_at_10/addition"] == pytest.approx((1 / 2 + 2 / 5 + 3 / 6) / 3 * 100)

    removed = evaluate_scores(_circo_split(remove_reference=True), scores)
    assert removed["map_at_5"] > out["map_at_5"]


def test_circo_scores_match_the_official_arithmetic_on_random_scores():
    split = _circo_split()
    scores = np.random.default_rng(3).random((3, 60)).astype(np.float32)
    out = evaluate_scores(split, scores)
    top = topk_indices(scores, 50)
    for k in (5, 10, 25, 50):
        aps = [
            _official_ap([int(split.gallery[i]) for i in row], [int(t) for t in q.targets], k)
            for row, q in zip(top, split.queries, strict=True)
        ]
        assert out[f"map_at_{k}"] == pytest.approx(float(np.mean(aps)) * 100, abs=1e-12)


def test_fashioniq_protocol_and_combination():
    gallery = [f"A{i}" for i in range(60)]
    splits, results = [], []
    for c, category in enumerate(("dress", "shirt", "toptee")):
        queries = [CIRQuery(str(i), gallery[i], "t", ["t"], [gallery[50 + i]]) for i in range(4)]
        protocol = Protocol("fashioniq", False, True, recall_ks=(10, 50))
        split = CIRSplit("fashioniq", "val", category, queries, gallery, protocol)
        scores = np.zeros((4, 60), dtype=np.float32)
        for i in range(c + 1):  # these queries rank their target first; the others tie it behind 50 images
            scores[i, 50 + i] = 1.0
        splits.append(split)
        results.append(evaluate_scores(split, scores))
    assert [r["recall_at_10"] for r in results] == [25.0, 50.0, 75.0]
    assert [r["recall_at_50"] for r in results] == [25.0, 50.0, 75.0]
    merged = combine_metrics(splits, results)
    assert merged["dress/recall_at_50"] == 25.0
    assert merged["recall_at_10"] == pytest.approx(50.0)
    assert merged["avg"] == pytest.approx(50.0)


def test_score_shape_and_ground_truth_are_checked():
    split = _cirr_split(n_queries=2)
    with pytest.raises(ValueError, match="2 queries and 11 gallery rows, expected \\(2, 12\\)"):
        evaluate_scores(split, np.zeros((2, 11), dtype=np.float32))
    no_gt = CIRSplit("cirr", "test1", None, split.queries, split.gallery, Protocol("cirr", True, False, (1,)))
    with pytest.raises(ValueError, match="no public ground truth"):
        evaluate_scores(no_gt, np.zeros((2, 12), dtype=np.float32))


# --- the ranking path against brute force, on embeddings -------------------------------------------------------------


def _tied_embeddings(rng: np.random.Generator, n_queries: int, n_gallery: int) -> tuple[np.ndarray, np.ndarray]:
    """Small-integer embeddings: every inner product is exact in float32 and bfloat16, and ties abound."""
    return (
        rng.integers(-2, 3, size=(n_queries, 6)).astype(np.float32),
        rng.integers(-2, 3, size=(n_gallery, 6)).astype(np.float32),
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("seed", range(3))
def test_rank_split_matches_brute_force_cirr(precision, seed):
    split = _cirr_split(n_gallery=70, seed=seed)
    queries, gallery = _tied_embeddings(np.random.default_rng(seed), len(split.queries), 70)
    scores = queries @ gallery.T  # (Q, N), exact
    ranking = rank_split(split, queries, gallery, precision=precision)
    for row, q, full in zip(ranking.top, split.queries, _reference_order(scores), strict=True):
        expected = [i for i in full if split.gallery[i] != q.reference][:50]
        assert row.tolist() == expected
    for members, q, full in zip(ranking.subsets, split.queries, _reference_order(scores), strict=True):
        assert [split.gallery[i] for i in members] == [
            split.gallery[i] for i in full if split.gallery[i] in q.subset and split.gallery[i] != q.reference
        ]
    out = evaluate_ranking(split, ranking)
    for key, value in _brute_force_cirr(split, scores).items():
        assert out[key] == pytest.approx(value), key


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("remove_reference", [False, True])
def test_rank_split_matches_brute_force_circo(precision, remove_reference):
    split = _circo_split(remove_reference)
    queries, gallery = _tied_embeddings(np.random.default_rng(7), 3, 60)
    scores = queries @ gallery.T
    top = rank_split(split, queries, gallery, precision=precision).top
    for row, q, full in zip(top, split.queries, _reference_order(scores), strict=True):
        expected = [i for i in full if not (remove_reference and split.gallery[i] == q.reference)][:50]
        assert row.tolist() == expected
    assert evaluate_ranking(split, SplitRanking(top)) == pytest.approx(evaluate_scores(split, scores))
