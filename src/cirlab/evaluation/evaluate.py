"""The one prediction path for validation and test: encode the split's images, compose queries, rank the gallery
under the benchmark's protocol (``protocols.rank_split``), compute its metrics (``protocols.evaluate_ranking``).
Every method and every benchmark goes through here; no (queries x gallery) score matrix is built.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cirlab.data.benchmark import CIRSplit
from cirlab.evaluation.protocols import evaluate_ranking, rank_split
from cirlab.evaluation.ranking import Precision
from cirlab.features.images import split_features
from cirlab.features.table import FeatureTable
from cirlab.methods.base import compose_with_context, needs_context
from cirlab.types import QueryContext, ReferenceImage


@dataclass
class EvalResult:
    """Metrics of one method on one split (and on named query subsets, e.g. held-out vs seen)."""

    split: str
    metrics: dict[str, float]
    subsets: dict[str, dict[str, float]] = field(default_factory=dict)
    n_queries: int = 0
    seconds: float = 0.0
    conventions: str = ""


def method_view(method: Any, split: CIRSplit) -> CIRSplit:
    """``split`` as ``method`` reads it: a FashionIQ split re-joined by the method's caption convention
    (``CIRMethod.fashioniq_caption_join``, e.g. Pic2Word's reversed order); any other split unchanged."""
    join = method.fashioniq_caption_join() if hasattr(method, "fashioniq_caption_join") else ""
    if split.dataset != "fashioniq" or not join:
        return split
    from cirlab.data.fashioniq import with_caption_join

    return with_caption_join(split, join)


@torch.no_grad()
def compose_queries(
    method: Any,
    split: CIRSplit,
    features: FeatureTable,
    batch_size: int = 256,
    gallery: torch.Tensor | None = None,
) -> torch.Tensor:
    """Composed queries (Q, d), L2-normalised, in the order of ``split.queries``.

    A query with several ``extra["text_variants"]`` (FashionIQ's two caption orders) is the normalised mean of the
    normalised queries composed with each variant, as SEARLE and LinCIR average them. A method that reads the
    reference images gets them (files of the split, digested once each); one that reads the gallery gets
    ``gallery`` (computed here from ``features`` when not given).
    """
    if getattr(method, "reads_gallery", False) and gallery is None:
        gallery = gallery_embeddings(method, split, features)
    images: dict[str, ReferenceImage] = {}
    out = []
    for start in range(0, len(split.queries), batch_size):
        chunk = split.queries[start : start + batch_size]
        texts = [q.extra.get("text_variants") or [q.text] for q in chunk]
        owner = torch.tensor([i for i, variants in enumerate(texts) for _ in variants])  # (V,) query of each text
        refs = [q.reference for q, variants in zip(chunk, texts, strict=True) for _ in variants]
        ref = features.gather(features.rows(refs))
        context = None
        if needs_context(method):
            if method.reads_reference_images:
                for name in refs:
                    if name not in images:
                        images[name] = ReferenceImage.from_path(split.image_path(name))
            context = QueryContext(
                images=[images[name] for name in refs] if method.reads_reference_images else None,
                gallery=gallery,
            )
        composed = compose_with_context(method, ref, [t for v in texts for t in v], context)
        composed = F.normalize(composed.float().cpu(), dim=-1)  # (V, d)
        out.append(torch.zeros(len(chunk), composed.shape[1]).index_add_(0, owner, composed))
    return F.normalize(torch.cat(out), dim=-1) if out else torch.empty(0, 0)


@torch.no_grad()
def gallery_embeddings(method: Any, split: CIRSplit, features: FeatureTable, batch_size: int = 1024) -> torch.Tensor:
    """Gallery embeddings (N, d) in the method's retrieval space, in the order of ``split.gallery``."""
    rows = features.rows(split.gallery)
    out = [
        method.encode_gallery(features.gather(rows[s : s + batch_size])).float().cpu()
        for s in range(0, len(rows), batch_size)
    ]
    return F.normalize(torch.cat(out), dim=-1)


def subset_split(split: CIRSplit, indices: Sequence[int]) -> CIRSplit:
    """The same split restricted to the queries at ``indices`` (same gallery and protocol)."""
    return dataclasses.replace(split, queries=[split.queries[i] for i in indices])


def predict_embeddings(
    method: Any, split: CIRSplit, features: FeatureTable | None = None, batch_size: int = 256, cache: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's composed queries (Q, d) and its gallery (N, d) in the method's retrieval space, L2-normalised:
    the one prediction path shared by validation, test evaluation and test-server submissions (which rank them
    with :func:`cirlab.evaluation.protocols.rank_split`)."""
    was_training = method.training
    method.eval()
    split = method_view(method, split)
    try:
        if features is None:
            features = split_features(method, split, cache=cache)
        gallery = gallery_embeddings(method, split, features)
        queries = compose_queries(method, split, features, batch_size, gallery=gallery)
        return queries, gallery
    finally:
        method.train(was_training)


def evaluate(
    method: Any,
    split: CIRSplit,
    features: FeatureTable | None = None,
    subsets: dict[str, Sequence[int]] | None = None,
    batch_size: int = 256,
    cache: Any = None,
    precision: Precision = "auto",
) -> EvalResult:
    """Evaluates ``method`` on ``split`` with the split's own protocol.

    Args:
        method: a ``CIRMethod`` (put in eval mode here).
        split: a split with ground truth.
        features: precomputed image features of the split (reused across methods sharing a frozen backbone).
        subsets: named query-index subsets to report separately (e.g. ``{"heldout": [...], "seen": [...]}``).
        batch_size: composition batch size.
        cache: a ``FeatureCache`` used when ``features`` is None and the image encoder is frozen.
        precision: ranking precision (``cirlab.evaluation.ranking.resolve_precision``; every choice gives the
            float32 ranking up to ties).
    """
    t0 = time.perf_counter()
    split = method_view(method, split)
    queries, gallery = predict_embeddings(method, split, features, batch_size, cache)
    ranking = rank_split(split, queries, gallery, precision=precision)
    metrics = evaluate_ranking(split, ranking)
    parts = {
        name: evaluate_ranking(subset_split(split, idx), ranking.rows(idx))
        for name, idx in (subsets or {}).items()
        if len(idx)
    }
    return EvalResult(split.name, metrics, parts, len(split.queries), time.perf_counter() - t0, split.describe())
