"""Benchmark rules in one place: from a split and per-query scores (or rankings) to the benchmark's metrics.

The rules (FORMATS.md 1.4, 2.3, 3.4), driven by ``CIRSplit.protocol``:

* CIRR: the query's reference image is deleted from the full-gallery ranking before Recall@{1,5,10,50};
  Recall_subset@{1,2,3} ranks the ``img_set`` members other than the reference in full-ranking order;
  ``avg`` = (Recall@5 + Recall_subset@1) / 2.
* CIRCO: no removal (official; ``remove_reference`` can switch it on), mAP@{5,10,25,50} over all ground truths,
  Recall@{5,10,25,50} on the first ground truth, ``map_at_10/<aspect>`` for every semantic aspect present.
* FashionIQ: no removal, Recall@10/50 and ``avg`` per category; :func:`combine_metrics` averages categories.

Rankings come from scores by an exact, deterministic top-K: higher score first, equal scores ordered by the lower
gallery index (the order of ``split.gallery``). Only the top ``max K`` (+1 when the reference is removed) is ever
selected, with ``np.argpartition``-style partial selection, so a (Q, 123403) CIRCO matrix needs no full sort.
Scores may be a numpy array or a torch tensor (any device); torch is never imported here, tensors are copied to
the CPU a block of rows at a time.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from cirlab.data.benchmark import CIRSplit
from cirlab.evaluation import metrics as M

ROW_BLOCK = 256
"""Rows of the score matrix converted and ranked at a time (bounds the extra memory to ROW_BLOCK x N)."""


def _to_numpy_block(block: Any) -> np.ndarray:
    if hasattr(block, "detach"):  # a torch tensor; duck-typed so that this module never imports torch
        block = block.detach()
        if str(block.dtype) != "torch.float64":
            block = block.float()  # half / bfloat16 have no numpy equivalent for every dtype
        block = block.cpu().numpy()
    block = np.asarray(block)
    if not np.issubdtype(block.dtype, np.floating):
        block = block.astype(np.float64)
    return block


def iter_score_blocks(scores: Any, rows: int = ROW_BLOCK) -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(first_row, block)`` with ``block`` a float numpy array of up to ``rows`` rows of ``scores``.

    Raises:
        ValueError: scores are not 2-D or contain NaN (NaN has no place in a ranking).
    """
    if len(getattr(scores, "shape", ())) != 2:
        raise ValueError(f"scores must be a 2-D (queries, gallery) matrix, got shape {getattr(scores, 'shape', None)}")
    for start in range(0, int(scores.shape[0]), rows):
        block = _to_numpy_block(scores[start : start + rows])
        if np.isnan(block).any():
            bad = start + int(np.flatnonzero(np.isnan(block).any(axis=1))[0])
            raise ValueError(f"scores of query row {bad} contain NaN")
        yield start, block


def _topk_block(block: np.ndarray, k: int) -> np.ndarray:
    """Top-k column indices of each row, (rows, k), by decreasing score, ties to the lower index."""
    n = block.shape[1]
    if k >= n:
        return np.argsort(-block, axis=1, kind="stable")
    # The k-th largest value of each row; every index scoring at least that is a candidate. Candidates beyond k
    # exist only when scores tie at the boundary, and the stable sort keeps the lower indices among them.
    kth = np.partition(block, n - k, axis=1)[:, n - k]
    out = np.empty((block.shape[0], k), dtype=np.int64)
    for r in range(block.shape[0]):
        candidates = np.flatnonzero(block[r] >= kth[r])
        order = np.argsort(-block[r, candidates], kind="stable")
        out[r] = candidates[order[:k]]
    return out


def topk_indices(scores: Any, k: int) -> np.ndarray:
    """Exact, deterministic top-K of every row of a score matrix.

    Args:
        scores: (Q, N) numpy array or torch tensor; higher is better.
        k: how many to keep (clipped to N).

    Returns:
        (Q, min(k, N)) int64 column indices, best first; equal scores are ordered by the lower column index.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    blocks = [_topk_block(block, min(k, block.shape[1])) for _, block in iter_score_blocks(scores)]
    if not blocks:
        return np.zeros((0, 0), dtype=np.int64)
    return np.concatenate(blocks, axis=0)


def _check_scores(split: CIRSplit, scores: Any) -> None:
    shape = tuple(getattr(scores, "shape", ()))
    expected = (len(split.queries), len(split.gallery))
    if shape != expected:
        raise ValueError(f"{split.name}: scores have shape {shape}, expected (queries, gallery) = {expected}")
    if not split.gallery:
        raise ValueError(f"{split.name}: the gallery is empty (for CIRCO, provide image_info_unlabeled2017.json)")


def _index_of(split: CIRSplit, name: str, what: str, qid: str) -> int:
    try:
        return split.gallery_index[name]
    except KeyError:
        raise ValueError(f"{split.name}: query {qid}: {what} {name!r} is not in the gallery") from None


def reference_indices(split: CIRSplit) -> np.ndarray:
    """Gallery index of every query's reference image, (Q,) int64."""
    return np.array([_index_of(split, q.reference, "reference", q.qid) for q in split.queries], dtype=np.int64)


def _drop_reference(top: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Deletes each row's reference from a (Q, m) top list; rows without it lose their last entry -> (Q, m - 1)."""
    keep = top != refs[:, None]
    keep[keep.all(axis=1), -1] = False
    return top[keep].reshape(top.shape[0], top.shape[1] - 1)


def ranked_gallery_indices(split: CIRSplit, scores: Any, k: int) -> np.ndarray:
    """Top-k gallery indices per query under the split's protocol (the reference deleted when it says so).

    Args:
        split: the split; ``scores`` has one row per query and one column per ``split.gallery`` entry.
        scores: (Q, N) numpy array or torch tensor.
        k: ranking depth (e.g. 50 for a submission).

    Returns:
        (Q, min(k, N')) int64, best first; N' is the gallery size less the reference when it is removed.
    """
    _check_scores(split, scores)
    if not split.protocol.remove_reference:
        return topk_indices(scores, k)
    top = topk_indices(scores, k + 1)  # one spare slot for the reference
    out = _drop_reference(top, reference_indices(split))
    return out[:, :k]


def _subset_candidates(split: CIRSplit) -> list[np.ndarray]:
    """Per query, the gallery indices of the img_set members other than the reference, ascending."""
    out = []
    for q in split.queries:
        if q.subset is None:
            raise ValueError(f"{split.name}: query {q.qid} has no subset (img_set members)")
        idx = [_index_of(split, m, "img_set member", q.qid) for m in q.subset if m != q.reference]
        out.append(np.array(sorted(idx), dtype=np.int64))
    return out


def ranked_subset_indices(split: CIRSplit, scores: Any) -> list[np.ndarray]:
    """CIRR: per query, its non-reference ``img_set`` members as gallery indices, in full-ranking order.

    Only the members' scores are read; ordering them by (score desc, gallery index asc) is exactly their order in
    the full ranking, so no full sort is needed.
    """
    _check_scores(split, scores)
    candidates = _subset_candidates(split)
    out: list[np.ndarray] = []
    for start, block in iter_score_blocks(scores):
        for r in range(block.shape[0]):
            idx = candidates[start + r]
            out.append(idx[np.argsort(-block[r, idx], kind="stable")])
    return out


def _require_ground_truth(split: CIRSplit) -> None:
    if not split.protocol.has_ground_truth:
        raise ValueError(
            f"{split.name} has no public ground truth; write a submission file for the test server instead"
        )


def _target_indices(split: CIRSplit) -> list[list[int]]:
    return [[_index_of(split, t, "ground truth", q.qid) for t in q.targets] for q in split.queries]


def _metrics_from_rankings(
    split: CIRSplit, rankings: Sequence[Sequence[int]] | np.ndarray, subsets: list[np.ndarray] | None
) -> dict[str, float]:
    """Applies the split's metric family to gallery-index rankings (already reference-free if required).

    ``subsets`` holds, per query, its non-reference subset members in ranking order (CIRR), or None.
    """
    p = split.protocol
    gts = _target_indices(split)
    first = np.array([g[0] for g in gts], dtype=np.int64)
    out: dict[str, float] = {}
    if p.family == "circo":
        for k in p.map_ks:
            out[f"map_at_{k}"] = M.circo_map_at_k(rankings, gts, k)
        for k in p.recall_ks:
            out[f"recall_at_{k}"] = M.circo_recall_at_k(rankings, gts, k)
        if p.aspect_map_k and any(q.aspects for q in split.queries):
            per_aspect = M.circo_map_per_aspect(rankings, gts, [q.aspects for q in split.queries], p.aspect_map_k)
            out.update({f"map_at_{p.aspect_map_k}/{a}": v for a, v in per_aspect.items()})
        return out
    for k in p.recall_ks:
        out[f"recall_at_{k}"] = M.recall_at_k(rankings, first, k)
    if p.family == "cirr":
        if subsets is not None:
            candidates = _subset_candidates(split)
            for k in p.subset_ks:
                out[f"recall_subset_at_{k}"] = M.cirr_recall_subset_at_k(subsets, first, candidates, k)
            out["avg"] = M.cirr_avg(out)
    elif p.family == "fashioniq":
        out["avg"] = M.fashioniq_avg(out)
    return out


def evaluate_scores(split: CIRSplit, scores: Any) -> dict[str, float]:
    """The split's benchmark metrics (percent) from a score matrix.

    Args:
        split: a split with ground truth.
        scores: (Q, N) float numpy array or torch tensor, row i for ``split.queries[i]``, column j for
            ``split.gallery[j]``; higher is better.

    Returns:
        CIRR: ``recall_at_{1,5,10,50}``, ``recall_subset_at_{1,2,3}``, ``avg``. CIRCO: ``map_at_{5,10,25,50}``,
        ``recall_at_{5,10,25,50}``, ``map_at_10/<aspect>``. FashionIQ (one category): ``recall_at_{10,50}``,
        ``avg``.
    """
    _require_ground_truth(split)
    top = ranked_gallery_indices(split, scores, split.protocol.max_k)
    subsets = ranked_subset_indices(split, scores) if split.protocol.subset_ks else None
    return _metrics_from_rankings(split, top, subsets)


def _normalise_ranking(split: CIRSplit, i: int, row: Any) -> list[int]:
    """One query's ranking as gallery indices; names are looked up, duplicates rejected."""
    items = row.tolist() if isinstance(row, np.ndarray) else list(row)
    n = len(split.gallery)
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(_index_of(split, item, "ranked image", split.queries[i].qid))
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool) and 0 <= item < n:
            out.append(int(item))
        else:
            raise ValueError(f"{split.name}: query {split.queries[i].qid}: invalid ranked item {item!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{split.name}: query {split.queries[i].qid}: the ranking has duplicates")
    return out


def evaluate_rankings(split: CIRSplit, rankings: Sequence[Sequence[Any]] | np.ndarray) -> dict[str, float]:
    """The split's benchmark metrics (percent) from precomputed rankings (e.g. the ids of an exact top-K search).

    The protocol is applied here: with ``remove_reference`` the reference is deleted from each ranking, so pass
    one more item than the largest K (CIRR: top 51). CIRR Recall_subset is computed only when every ranking
    contains all of its query's subset members (full rankings); otherwise those keys are left out with a warning.

    Args:
        split: a split with ground truth.
        rankings: per query, gallery indices ((Q, K) int array or lists) or gallery image names, best first.

    Raises:
        ValueError: a ranking is too short to compute every metric, has duplicates or unknown items.
    """
    _require_ground_truth(split)
    if len(rankings) != len(split.queries):
        raise ValueError(f"{split.name}: {len(rankings)} rankings for {len(split.queries)} queries")
    p = split.protocol
    full = [_normalise_ranking(split, i, row) for i, row in enumerate(rankings)]
    if p.remove_reference:
        refs = reference_indices(split)
        full = [[g for g in row if g != refs[i]] for i, row in enumerate(full)]
    available = len(split.gallery) - (1 if p.remove_reference else 0)
    need = min(p.max_k, available)
    for i, row in enumerate(full):
        if len(row) < need:
            extra = " plus one for the removed reference" if p.remove_reference else ""
            raise ValueError(
                f"{split.name}: query {split.queries[i].qid}: ranking has {len(row)} usable items, need {need}{extra}"
            )
    top = np.array([row[:need] for row in full], dtype=np.int64)
    subsets = None
    if p.subset_ks:
        members = [set(c.tolist()) for c in _subset_candidates(split)]
        if all(m <= set(row) for m, row in zip(members, full, strict=True)):
            subsets = [np.array([g for g in row if g in m]) for m, row in zip(members, full, strict=True)]
        else:
            warnings.warn(
                f"{split.name}: rankings do not contain every subset member; Recall_subset is not computed",
                stacklevel=2,
            )
    return _metrics_from_rankings(split, top, subsets)


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
