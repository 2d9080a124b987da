"""Contrastive and distillation losses shared by methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_temperature(backbone, configured: float) -> float:
    """``configured`` when positive, else the backbone's own learned CLIP temperature ``1 / exp(logit_scale)``."""
    return configured if configured > 0 else float(1.0 / backbone.logit_scale.exp())


def info_nce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    temperature: float | torch.Tensor = 0.07,
    symmetric: bool = False,
    extra_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE where ``queries[i]`` matches ``keys[i]`` and the other keys of the batch are negatives.

    Args:
        queries: (B, d), L2-normalised.
        keys: (B, d), L2-normalised.
        temperature: softmax temperature (a tensor for a learnable one).
        symmetric: average with the keys -> queries direction (CLIP's loss).
        extra_negatives: optional per-query hard negatives (B, k, d), L2-normalised.
    """
    logits = queries @ keys.t() / temperature  # (B, B)
    labels = torch.arange(queries.shape[0], device=queries.device)
    if extra_negatives is not None:
        hard = torch.einsum("bd,bkd->bk", queries, extra_negatives) / temperature  # (B, k)
        loss = F.cross_entropy(torch.cat([logits, hard], dim=1), labels)
    else:
        loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.t(), labels))
    return loss
