"""A transformer diffusion prior over embedding vectors (x0-prediction), with a learned null condition for CFG.

The denoiser reads a short token sequence ``[noisy z_n, timestep embedding, condition tokens]`` (DALL-E 2's prior
reads a similar sequence) and predicts the clean ``z_0`` from the output at the ``z_n`` position. Embeddings are
unit vectors; the caller scales them (e.g. by ``sqrt(d)``) so that their coordinates have about unit variance,
like the noise. Hidden states can receive per-layer additive ``residuals`` (from a Control-Adapter); without them,
or with all-zero ones, the output is exactly the plain prior's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """A pre-LN transformer block (bidirectional self-attention, GELU MLP).

    Args:
        width: token width.
        heads: attention heads (must divide ``width``).
        mlp_ratio: MLP hidden width as a multiple of ``width``.
        dropout: dropout on the attention and MLP outputs.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, width) -> (B, L, width)."""
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).unbind(2)  # 3 x (B, L, h, w/h)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, h, L, .)
        x = x + self.dropout(self.proj(attn.transpose(1, 2).reshape(b, n, w)))
        return x + self.dropout(self.mlp(self.norm2(x)))


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embeddings (B, dim) of integer timesteps t (B,) (the Transformer / DDPM recipe)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float().unsqueeze(-1) * freqs  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of the timestep followed by a two-layer MLP: t (B,) -> (B, width)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.width))


class PriorDenoiser(nn.Module):
    """Transformer denoiser over ``[z_n, timestep, condition]`` tokens predicting ``z_0`` (x0-prediction).

    Args:
        dim: embedding size ``d`` of ``z``.
        cond_dim: size of each condition vector (usually ``d``).
        cond_tokens: number of condition vectors per example.
        width: token width.
        layers: transformer blocks.
        heads: attention heads.
        dropout: dropout inside the blocks.
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int | None = None,
        cond_tokens: int = 1,
        width: int = 512,
        layers: int = 4,
        heads: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.width = width
        self.cond_tokens = cond_tokens
        self.num_tokens = 2 + cond_tokens
        self.z_in = nn.Linear(dim, width)
        self.time = TimestepEmbedding(width)
        self.cond_in = nn.Linear(cond_dim or dim, width)
        # The learned "null" condition used when the condition is dropped (classifier-free guidance).
        self.null_cond = nn.Parameter(0.02 * torch.randn(cond_tokens, width))
        self.pos = nn.Parameter(0.02 * torch.randn(self.num_tokens, width))
        self.blocks = nn.ModuleList(Block(width, heads, dropout=dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks (one residual slot each for a Control-Adapter)."""
        return len(self.blocks)

    def embed_condition(self, cond: torch.Tensor | None, drop: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Condition tokens (B, cond_tokens, width): the projected condition, or the null tokens where dropped.

        Args:
            cond: (B, cond_tokens, cond_dim), or None for the unconditional prediction.
            drop: bool (B,), True where the condition is replaced by the null tokens (None: keep all).
            batch: batch size B.
        """
        null = self.null_cond.unsqueeze(0).expand(batch, -1, -1)  # (B, c, width)
        if cond is None:
            return null
        tokens = self.cond_in(cond)  # (B, c, width)
        if drop is None:
            return tokens
        # torch.where keeps the null tokens in the graph even when nothing is dropped (they always get a gradient).
        return torch.where(drop.view(-1, 1, 1), null, tokens)

    def forward(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None,
        drop: torch.Tensor | None = None,
        residuals: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predicts ``z_0`` (B, dim).

        Args:
            z_t: noisy (scaled) embeddings (B, dim).
            t: integer timesteps (B,).
            cond: condition vectors (B, cond_tokens, cond_dim), or None for the unconditional prediction.
            drop: bool (B,), True where the condition is replaced by the learned null condition.
            residuals: optional per-block additions to the hidden states, ``num_layers`` tensors (B, L, width),
                added before each block (a Control-Adapter's outputs).
        """
        b = z_t.shape[0]
        tokens = [self.z_in(z_t).unsqueeze(1), self.time(t).unsqueeze(1), self.embed_condition(cond, drop, b)]
        h = torch.cat(tokens, dim=1) + self.pos  # (B, L, width), L = 2 + cond_tokens
        if residuals is not None and len(residuals) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} residuals, got {len(residuals)}")
        for i, block in enumerate(self.blocks):
            if residuals is not None:
                h = h + residuals[i]
            h = block(h)
        return self.out(self.norm(h[:, 0]))  # (B, dim)
