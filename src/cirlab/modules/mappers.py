"""Mapping networks from an image embedding to a pseudo-word token (Pic2Word-, SEARLE- and LinCIR-style)."""

from __future__ import annotations

import torch
from torch import nn


class Pic2WordMapper(nn.Module):
    """Pic2Word's mapping network: Linear/Dropout/ReLU blocks of width ``hidden``, then a Linear to ``out_dim``.

    Args:
        in_dim: image embedding size ``d``.
        out_dim: text token width ``w_t``.
        hidden: hidden width (512 in the paper).
        layers: number of Linear/Dropout/ReLU blocks before the output layer (IM2TEXT's ``n_layer``, 2 in the
            public code).
        dropout: dropout rate (0.1).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.Dropout(dropout), nn.ReLU()]
            width = hidden
        blocks.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim) pseudo-word tokens."""
        return self.net(x)


class SearlePhi(nn.Module):
    """SEARLE's phi: Linear ``d -> 4d`` / GELU / Dropout, Linear ``4d -> 4d`` / GELU / Dropout, Linear ``-> w_t``.

    Args:
        in_dim: image embedding size ``d``.
        out_dim: text token width ``w_t``.
        hidden: hidden width (default ``4 * in_dim``).
        dropout: dropout rate (0.5 in SEARLE's public code).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None, dropout: float = 0.5) -> None:
        super().__init__()
        hidden = hidden or 4 * in_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim) pseudo-word tokens."""
        return self.net(x)
