"""Retrieval metrics as pure functions of rankings and ground truth (no model, no benchmark rules).

A *ranking* is one query's retrieved items, best first: a list of image names, a list of ids, or one row of a
(Q, K) integer array of gallery indices. Rankings are taken as given, so ties in the underlying scores have
already been resolved by whoever ordered them (``cirlab.evaluation.protocols`` puts the lower gallery index
first). A ranking shorter than K simply has no hit beyond its end (K larger than the list is allowed).

Every metric is returned in percent (0..100): the mean over queries of a per-query value in [0, 1], times 100,
which is the order of operations of the official CIRCO script. Which items to rank and which to remove (the CIRR
reference, the CIRR subset) is decided by ``cirlab.evaluation.protocols``, not here.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

Rankings = Sequence[Sequence[Hashable]] | np.ndarray
"""Per query, the ranked items (best first); a 2-D integer array is one row per query."""


def _check(rankings: Rankings, n_truth: int, k: int) -> int:
    """Validates K and matching lengths; returns the number of queries."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"K must be a positive integer, got {k!r}")
    n = len(rankings)
    if n == 0:
        raise ValueError("no queries to evaluate")
    if n != n_truth:
        raise ValueError(f"{n} rankings but {n_truth} ground-truth entries")
    return n


def _percent(values: np.ndarray) -> float:
    return float(np.mean(values)) * 100.0


def _row(rankings: Rankings, i: int) -> list[Any]:
    row = rankings[i]
    return row.tolist() if isinstance(row, np.ndarray) else list(row)


def recall_at_k(rankings: Rankings, targets: Sequence[Hashable] | np.ndarray, k: int) -> float:
    """Recall@K: percentage of queries whose single target is among the first K ranked items.

    Args:
        rankings: per query, the ranked items.
        targets: per query, the one target item (same kind as the ranked items).
        k: cut-off.

    Returns:
        The recall in percent.
    """
    n = _check(rankings, len(targets), k)
    if isinstance(rankings, np.ndarray) and rankings.ndim == 2:
        hits = (rankings[:, :k] == np.asarray(targets)[:, None]).any(axis=1)
    else:
        hits = np.array([targets[i] in _row(rankings, i)[:k] for i in range(n)], dtype=bool)
    return _percent(hits.astype(np.float64))


def cirr_recall_subset_at_k(
    rankings: Rankings, targets: Sequence[Hashable] | np.ndarray, subsets: Sequence[Collection[Hashable]], k: int
) -> float:
    """CIRR Recall_subset@K: keep only the subset's items, in ranking order; hit if the target is in the first K.

    Args:
        rankings: per query, a ranking containing the subset members (the full gallery ranking, or a ranking of
            the members alone such as a ``recall_subset`` submission list).
        targets: per query, the target item.
        subsets: per query, the candidate items (CIRR: the ``img_set`` members other than the reference).
        k: cut-off (1, 2, 3 in the benchmark).

    Returns:
        The recall in percent.
    """
    n = _check(rankings, len(targets), k)
    if len(subsets) != n:
        raise ValueError(f"{n} rankings but {len(subsets)} subsets")
    hits = np.zeros(n, dtype=np.float64)
    for i in range(n):
        members = set(subsets[i])
        kept = [item for item in _row(rankings, i) if item in members]
        hits[i] = targets[i] in kept[:k]
    return _percent(hits)


def average_precision_at_k(
    ranking: Sequence[Hashable] | np.ndarray, ground_truth: Collection[Hashable], k: int
) -> float:
    """CIRCO AP@K of one query, in [0, 1].

    The sum of precision@i over the ranks i <= K that hold a ground truth, divided by min(K, #ground truths).

    Args:
        ranking: the ranked items, without duplicates.
        ground_truth: the query's ground-truth items (at least one).
        k: cut-off.

    Raises:
        ValueError: duplicate items in the ranking (the CIRCO server rejects them: they would count a ground truth
            twice), or no ground truth.
    """
    items = ranking.tolist() if isinstance(ranking, np.ndarray) else list(ranking)
    if len(set(items)) != len(items):
        raise ValueError("ranking contains duplicate items; CIRCO predictions must be unique")
    gt = set(ground_truth)
    if not gt:
        raise ValueError("a query needs at least one ground truth for AP")
    labels = np.array([item in gt for item in items[:k]], dtype=np.float64)
    # Same arithmetic as the official script: cumulative hits at hit positions, divided by the rank.
    precisions = np.cumsum(labels) * labels / np.arange(1, labels.shape[0] + 1)
    return float(np.sum(precisions) / min(len(gt), k))


def circo_average_precisions(rankings: Rankings, ground_truths: Sequence[Collection[Hashable]], k: int) -> np.ndarray:
    """Per-query AP@K (values in [0, 1]), shape (Q,); see :func:`average_precision_at_k`."""
    n = _check(rankings, len(ground_truths), k)
    aps = np.zeros(n, dtype=np.float64)
    for i in range(n):
        try:
            aps[i] = average_precision_at_k(_row(rankings, i), ground_truths[i], k)
        except ValueError as err:
            raise ValueError(f"query {i}: {err}") from None
    return aps


def circo_map_at_k(rankings: Rankings, ground_truths: Sequence[Collection[Hashable]], k: int) -> float:
    """CIRCO mAP@K in percent: the mean over queries of AP@K (see :func:`average_precision_at_k`).

    Args:
        rankings: per query, the ranked items without duplicates.
        ground_truths: per query, all ground-truth items (1 to 14 in CIRCO val).
        k: cut-off (5, 10, 25, 50 in the benchmark).
    """
    return _percent(circo_average_precisions(rankings, ground_truths, k))


def circo_recall_at_k(rankings: Rankings, ground_truths: Sequence[Sequence[Hashable]], k: int) -> float:
    """CIRCO Recall@K in percent: only the first ground truth (``target_img_id``) counts as a hit.

    Args:
        rankings: per query, the ranked items.
        ground_truths: per query, the ground truths with the target first.
        k: cut-off.
    """
    targets = [gt[0] for gt in ground_truths]
    return recall_at_k(rankings, targets, k)


def circo_map_per_aspect(
    rankings: Rankings,
    ground_truths: Sequence[Collection[Hashable]],
    aspects: Sequence[Collection[str]],
    k: int = 10,
) -> dict[str, float]:
    """Per-semantic-aspect mAP@K in percent, over the queries carrying each aspect (CIRCO reports K = 10).

    Returns:
        Aspect -> mAP@K, sorted by aspect name; aspects no query carries are absent.
    """
    aps = circo_average_precisions(rankings, ground_truths, k)
    if len(aspects) != len(aps):
        raise ValueError(f"{len(aps)} rankings but {len(aspects)} aspect lists")
    by_aspect: dict[str, list[float]] = {}
    for ap, labels in zip(aps, aspects, strict=True):
        for label in labels:
            by_aspect.setdefault(label, []).append(float(ap))
    return {label: _percent(np.array(values)) for label, values in sorted(by_aspect.items())}


def cirr_avg(metrics: Mapping[str, float]) -> float:
    """The CIRR summary column: (Recall@5 + Recall_subset@1) / 2 (a reporting convention)."""
    return (metrics["recall_at_5"] + metrics["recall_subset_at_1"]) / 2.0


def fashioniq_avg(metrics: Mapping[str, float]) -> float:
    """The FashionIQ summary column: (Recall@10 + Recall@50) / 2 (a reporting convention)."""
    return (metrics["recall_at_10"] + metrics["recall_at_50"]) / 2.0


def fashioniq_average(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Combines FashionIQ per-category results into one flat dict.

    Args:
        per_category: category -> metrics with ``recall_at_10`` and ``recall_at_50``.

    Returns:
        ``<category>/recall_at_10``, ``<category>/recall_at_50`` for each category; ``recall_at_10`` and
        ``recall_at_50`` averaged over the categories (unweighted, as SEARLE prints them); and ``avg``, the mean
        of those two averages.
    """
    if not per_category:
        raise ValueError("no FashionIQ categories to average")
    out: dict[str, float] = {}
    for category, metrics in per_category.items():
        for key in ("recall_at_10", "recall_at_50"):
            out[f"{category}/{key}"] = metrics[key]
    for key in ("recall_at_10", "recall_at_50"):
        out[key] = float(np.mean([m[key] for m in per_category.values()]))
    out["avg"] = fashioniq_avg(out)
    return out
