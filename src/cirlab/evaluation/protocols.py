"""Benchmark rules in one place: from a split's query and gallery embeddings (or rankings) to its metrics.

The rules (FORMATS.md 1.4, 2.3, 3.4), driven by ``CIRSplit.protocol``:

* CIRR: the query's reference image is deleted from the full-gallery ranking before Recall@{1,5,10,50};
  Recall_subset@{1,2,3} ranks the ``img_set`` members other than the reference in full-ranking order;
  ``avg`` = (Recall@5 + Recall_subset@1) / 2.
* CIRCO: no removal (official; ``remove_reference`` can switch it on), mAP@{5,10,25,50} over all ground truths,
  Recall@{5,10,25,50} on the first ground truth, ``map_at_10/<aspect>`` for every semantic aspect present.
* FashionIQ: no removal, Recall@10/50 and ``avg`` per category; :func:`combine_metrics` averages categories.

:func:`rank_split` is the only place the ranking rules are applied: it ranks through
:func:`cirlab.evaluation.ranking.topk_inner_product` (exact, memory-bounded, higher score first, equal scores
ordered by the lower gallery index, i.e. the order of ``split.gallery``) with the reference excluded and the
subset members' scores gathered from the same products. :func:`ranking_metrics` is the only place the metric
families are applied, to rankings from :func:`rank_split` or read from submission files.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import numpy as np

from cirlab.data.benchmark import CIRSplit
from cirlab.evaluation import metrics as M
from cirlab.evaluation.ranking import Backend, Precision, index_matrix, topk_inner_product


def _index_of(split: CIRSplit, name: str, what: str, qid: str) -> int:
    try:
        return split.gallery_index[name]
    except KeyError:
        raise ValueError(f"{split.name}: query {qid}: {what} {name!r} is not in the gallery") from None


def reference_indices(split: CIRSplit) -> np.ndarray:
    """Gallery index of every query's reference image, (Q,) int64."""
    return np.array([_index_of(split, q.reference, "reference", q.qid) for q in split.queries], dtype=np.int64)


def subset_candidates(split: CIRSplit) -> list[np.ndarray]:
    """Per query, the gallery indices of its ``img_set`` members other than the reference, ascending (CIRR)."""
    out = []
    for q in split.queries:
        if q.subset is None:
            raise ValueError(f"{split.name}: query {q.qid} has no subset (img_set members)")
        idx = [_index_of(split, m, "img_set member", q.qid) for m in q.subset if m != q.reference]
        out.append(np.array(sorted(idx), dtype=np.int64))
    return out


class SplitRanking(NamedTuple):
    """A split's rankings under its protocol.

    Attributes:
        top: (Q, k) int64 gallery indices, best first, the reference removed where the protocol says so.
        subsets: CIRR: per query, its non-reference ``img_set`` members as gallery indices in full-ranking order
            (ordered by the same scores as ``top``, ties to the lower index); None when not ranked.
    """

    top: np.ndarray
    subsets: list[np.ndarray] | None = None

    def rows(self, indices: Sequence[int]) -> SplitRanking:
        """The rankings of the queries at ``indices`` (for :func:`cirlab.evaluation.evaluate.subset_split`)."""
        idx = np.asarray(indices, dtype=np.int64)
        subsets = [self.subsets[int(i)] for i in idx] if self.subsets is not None else None
        return SplitRanking(self.top[idx], subsets)


def rank_split(
    split: CIRSplit,
    queries: Any,
    gallery: Any,
    k: int | None = None,
    *,
    subsets: bool | None = None,
    backend: Backend = "auto",
    precision: Precision = "auto",
) -> SplitRanking:
    """Ranks the split's gallery for each of its queries under the split's protocol.

    Args:
        split: the split; ``queries`` row i is ``split.queries[i]``, ``gallery`` row j is ``split.gallery[j]``.
        queries: (Q, d) numpy array or torch tensor (L2-normalised composed queries).
        gallery: (N, d) numpy array, memmap, torch tensor or :class:`cirlab.evaluation.ranking.RankingGallery`.
        k: ranking depth (default: the largest K of the protocol's metrics; 50 for a submission).
        subsets: also rank each query's ``img_set`` members (default: when the protocol has Recall_subset).
        backend: float32 backend of :func:`cirlab.evaluation.ranking.topk_inner_product`.
        precision: ``"auto"``, ``"fp32"`` or ``"bf16"`` (see :func:`cirlab.evaluation.ranking.resolve_precision`).

    Returns:
        A :class:`SplitRanking`; ``top`` has min(k, N') columns, N' the gallery less the removed reference.

    Raises:
        ValueError: shapes that do not match the split, an empty gallery, or a reference or subset member that is
            not in the gallery.
    """
    expected = (len(split.queries), len(split.gallery))
    got = (int(queries.shape[0]), int(gallery.shape[0]))
    if got != expected:
        raise ValueError(f"{split.name}: {got[0]} queries and {got[1]} gallery rows, expected {expected}")
    if not split.gallery:
        raise ValueError(f"{split.name}: the gallery is empty (for CIRCO, provide image_info_unlabeled2017.json)")
    p = split.protocol
    k = p.max_k if k is None else k
    exclude = reference_indices(split) if p.remove_reference else None
    members = subset_candidates(split) if (bool(p.subset_ks) if subsets is None else subsets) else None
    gather = index_matrix(members, len(split.queries), len(split.gallery), "subset") if members else None
    result = topk_inner_product(
        queries, gallery, max(k, 1), exclude=exclude, gather=gather, backend=backend, precision=precision
    )
    ordered = None
    if members is not None:
        scores = result.gathered if result.gathered is not None else np.empty((len(members), 0), np.float32)
        ordered = [idx[np.lexsort((idx, -scores[i, : len(idx)]))] for i, idx in enumerate(members)]
    return SplitRanking(result.indices[:, :k], ordered)


def _require_ground_truth(split: CIRSplit) -> None:
    if not split.protocol.has_ground_truth:
        raise ValueError(
            f"{split.name} has no public ground truth; write a submission file for the test server instead"
        )


def ranking_metrics(
    split: CIRSplit,
    rankings: Sequence[Sequence[Hashable]] | np.ndarray | None,
    subsets: Sequence[Sequence[Hashable]] | None = None,
    *,
    item: Callable[[str], Hashable] | None = None,
    per_aspect: bool = True,
) -> dict[str, float]:
    """The split's benchmark metrics (percent) from rankings that already follow its protocol.

    Args:
        split: a split with ground truth.
        rankings: per query, the ranked gallery items, best first, the reference already removed where the
            protocol says so (:attr:`SplitRanking.top`, or a submission file's lists); None to skip the metrics of
            the full-gallery ranking (a CIRR ``recall_subset`` file alone).
        subsets: CIRR: per query, its non-reference ``img_set`` members in ranking order (or any ranking holding
            them, such as a ``recall_subset`` file's top 3); None to skip Recall_subset.
        item: how ``rankings`` spell a gallery image given its name (default: its index in ``split.gallery``;
            the scorer passes the names, or CIRCO's integer ids).
        per_aspect: CIRCO: add ``map_at_<K>/<aspect>`` for every semantic aspect present.

    Returns:
        CIRR: ``recall_at_{1,5,10,50}``, ``recall_subset_at_{1,2,3}`` and ``avg`` (with both rankings). CIRCO:
        ``map_at_{5,10,25,50}``, ``recall_at_{5,10,25,50}``, ``map_at_10/<aspect>``. FashionIQ (one category):
        ``recall_at_{10,50}``, ``avg``.
    """
    _require_ground_truth(split)
    p = split.protocol
    queries = split.queries
    if item is None:
        gts = [[_index_of(split, t, "ground truth", q.qid) for t in q.targets] for q in queries]
    else:
        gts = [[item(t) for t in q.targets] for q in queries]
    first = [g[0] for g in gts]
    out: dict[str, float] = {}
    if p.family == "circo":
        if rankings is not None:
            for k in p.map_ks:
                out[f"map_at_{k}"] = M.circo_map_at_k(rankings, gts, k)
            for k in p.recall_ks:
                out[f"recall_at_{k}"] = M.circo_recall_at_k(rankings, gts, k)
            if per_aspect and p.aspect_map_k and any(q.aspects for q in queries):
                aspects = M.circo_map_per_aspect(rankings, gts, [q.aspects for q in queries], p.aspect_map_k)
                out.update({f"map_at_{p.aspect_map_k}/{a}": v for a, v in aspects.items()})
        return out
    if rankings is not None:
        for k in p.recall_ks:
            out[f"recall_at_{k}"] = M.recall_at_k(rankings, first, k)
    if p.family == "cirr" and subsets is not None:
        if item is None:
            candidates: list[Any] = subset_candidates(split)
        else:
            candidates = [[item(m) for m in (q.subset or []) if m != q.reference] for q in queries]
        for k in p.subset_ks:
            out[f"recall_subset_at_{k}"] = M.cirr_recall_subset_at_k(subsets, first, candidates, k)
        if rankings is not None:
            out["avg"] = M.cirr_avg(out)
    elif p.family == "fashioniq" and rankings is not None:
        out["avg"] = M.fashioniq_avg(out)
    return out


def evaluate_ranking(split: CIRSplit, ranking: SplitRanking) -> dict[str, float]:
    """The split's benchmark metrics (percent) from :func:`rank_split`'s rankings (see :func:`ranking_metrics`)."""
    return ranking_metrics(split, ranking.top, ranking.subsets)


def combine_metrics(splits: Sequence[CIRSplit], results: Sequence[dict[str, float]]) -> dict[str, float]:
    """Merges the metrics of several splits into one flat dict.

    FashionIQ categories are combined by :func:`cirlab.evaluation.metrics.fashioniq_average` (per-category keys
    ``<category>/recall_at_10`` plus the category averages and ``avg``); a single split's metrics are returned
    unchanged; other combinations get ``<split.name>/`` prefixes.
    """
    if len(splits) != len(results) or not splits:
        raise ValueError("combine_metrics needs one result per split, and at least one split")
    if all(s.dataset == "fashioniq" and s.category for s in splits):
        return M.fashioniq_average({str(s.category): r for s, r in zip(splits, results, strict=True)})
    if len(splits) == 1:
        return dict(results[0])
    return {f"{s.name}/{k}": v for s, r in zip(splits, results, strict=True) for k, v in r.items()}
