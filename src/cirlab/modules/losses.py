"""Contrastive and distillation losses shared by methods.

Under ``torch.distributed`` with several processes, each process holds its share of the global batch; the
contrastive losses gather the other processes' keys (with gradient) so that the negatives are the whole global
batch, as in one process. Each process then returns the mean over *its* queries, and the training loop averages
gradients over processes, which gives exactly the gradient of the single-process loss over the global batch.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's ``x`` (equal shapes) concatenated in rank order, differentiable; and where ours starts.

    Returns ``(x, 0)`` in a single process. The backward pass sums each process's gradient contributions into
    the process that owns the rows (``torch.distributed.nn.functional.all_gather``).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # Deprecated in favour of a private module (torch.distributed._functional_collectives); still the public
        # all-gather with autograd, so keep it and keep its warning out of every training step's output.
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(x.contiguous())
    return torch.cat(parts), dist.get_rank() * x.shape[0]


def clip_temperature(backbone, configured: float) -> float:
    """``configured`` when positive, else the backbone's own learned CLIP temperature ``1 / exp(logit_scale)``."""
    return configured if configured > 0 else float(1.0 / backbone.logit_scale.exp())


def info_nce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    temperature: float | torch.Tensor = 0.07,
    symmetric: bool = False,
    extra_negatives: torch.Tensor | None = None,
    gather: bool = True,
) -> torch.Tensor:
    """InfoNCE where ``queries[i]`` matches ``keys[i]`` and the other keys of the batch are negatives.

    Args:
        queries: (B, d), L2-normalised.
        keys: (B, d), L2-normalised.
        temperature: softmax temperature (a tensor for a learnable one).
        symmetric: average with the keys -> queries direction (CLIP's loss).
        extra_negatives: optional per-query hard negatives (B, k, d), L2-normalised.
        gather: under ``torch.distributed``, use every process's keys (and, when symmetric, queries) as
            negatives; False keeps the negatives of this process's share only.
    """
    all_keys, offset = gather_with_grad(keys) if gather else (keys, 0)  # (G, d), G = B * processes
    labels = torch.arange(queries.shape[0], device=queries.device) + offset
    logits = queries @ all_keys.t() / temperature  # (B, G)
    if extra_negatives is not None:
        hard = torch.einsum("bd,bkd->bk", queries, extra_negatives) / temperature  # (B, k)
        loss = F.cross_entropy(torch.cat([logits, hard], dim=1), labels)
    else:
        loss = F.cross_entropy(logits, labels)
    if symmetric:
        # One process: the transposed logits (bit-identical to before); several: keys against every query.
        reverse = logits.t() if all_keys is keys else keys @ gather_with_grad(queries)[0].t() / temperature  # (B, G)
        loss = 0.5 * (loss + F.cross_entropy(reverse, labels))
    return loss


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float, gather: bool = True) -> torch.Tensor:
    """NT-Xent (SimCLR's loss; SEARLE distils ``phi`` with it): ``a[i]`` and ``b[i]`` are positives, every other row
    of both sets is a negative.

    Both sets are L2-normalised here. Each of the 2B anchors scores against the other 2B - 1 rows; the loss is the
    mean over anchors of the cross-entropy of its positive.

    Args:
        a: (B, w), e.g. teacher tokens.
        b: (B, w), e.g. predicted tokens.
        temperature: softmax temperature.
        gather: under ``torch.distributed``, every process's rows are negatives too.
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    all_a, offset = gather_with_grad(a) if gather else (a, 0)  # (G, w)
    all_b = gather_with_grad(b)[0] if gather else b  # (G, w)
    g, n = all_a.shape[0], a.shape[0]
    keys = torch.cat([all_a, all_b])  # (2G, w)
    local = torch.arange(n, device=a.device) + offset
    logits = torch.cat([a, b]) @ keys.t() / temperature  # (2B, 2G)
    self_index = torch.cat([local, local + g])  # where each anchor sits among the keys
    logits[torch.arange(2 * n, device=a.device), self_index] = float("-inf")
    positives = torch.cat([local + g, local])
    return F.cross_entropy(logits, positives)
