"""Control-Adapter: a small trainable branch steering a frozen diffusion prior (in the spirit of ControlNet).

The adapter reads control vectors (for Fusion-Diff: the reference image's and the modification text's joint-space
embeddings, optionally the timestep) and produces, for every block of the frozen ``PriorDenoiser``, an addition
to its hidden states (B, L, width). Every output goes through a zero-initialised linear layer, so before any
training all additions are exactly zero and the adapted prior reproduces the plain prior bit for bit.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from cirlab.modules.prior import Block, PriorDenoiser, TimestepEmbedding

AdapterKind = Literal["mlp", "transformer"]


def zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """A linear layer whose weight and bias start at zero (its output is exactly 0 until it is trained)."""
    layer = nn.Linear(in_features, out_features)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ControlAdapter(nn.Module):
    """Maps control vectors to per-block hidden-state additions for a frozen ``PriorDenoiser``.

    Args:
        control_dim: size of each control vector.
        num_controls: number of control vectors per example (2 for Fusion-Diff: reference image, text).
        target_width: the denoiser's token width.
        target_layers: the denoiser's number of blocks (one addition each).
        target_tokens: the denoiser's sequence length (each token gets its own addition).
        kind: ``transformer`` (``layers`` pre-LN blocks over the control tokens, mean-pooled) or ``mlp``.
        width: the adapter's hidden width.
        layers: blocks of the transformer kind (hidden layers of the MLP kind).
        heads: attention heads of the transformer kind.
        use_timestep: also read the diffusion timestep (as one more token, or concatenated for the MLP).
        dropout: dropout inside the adapter.
    """

    def __init__(
        self,
        control_dim: int,
        num_controls: int,
        target_width: int,
        target_layers: int,
        target_tokens: int,
        kind: AdapterKind = "transformer",
        width: int = 256,
        layers: int = 2,
        heads: int = 4,
        use_timestep: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in ("mlp", "transformer"):
            raise ValueError(f"unknown adapter kind {kind!r} (mlp, transformer)")
        self.kind = kind
        self.num_controls = num_controls
        self.target_width = target_width
        self.target_tokens = target_tokens
        self.time = TimestepEmbedding(width) if use_timestep else None
        n_in = num_controls + int(use_timestep)
        if kind == "transformer":
            self.control_in = nn.Linear(control_dim, width)
            self.pos = nn.Parameter(0.02 * torch.randn(n_in, width))
            self.blocks = nn.ModuleList(Block(width, heads, dropout=dropout) for _ in range(layers))
            self.norm = nn.LayerNorm(width)
        else:
            mlp: list[nn.Module] = [nn.Linear(num_controls * control_dim + width * int(use_timestep), width), nn.GELU()]
            for _ in range(max(0, layers - 1)):
                mlp += [nn.Dropout(dropout), nn.Linear(width, width), nn.GELU()]
            self.mlp = nn.Sequential(*mlp)
        self.zero_outs = nn.ModuleList(zero_linear(width, target_tokens * target_width) for _ in range(target_layers))

    def features(self, controls: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """The adapter's pooled features (B, width) from controls (B, num_controls, control_dim) and timesteps (B,)."""
        if self.time is not None and t is None:
            raise ValueError("this adapter reads the timestep; pass t")
        if self.kind == "transformer":
            tokens = self.control_in(controls)  # (B, n, width)
            if self.time is not None:
                tokens = torch.cat([tokens, self.time(t).unsqueeze(1)], dim=1)  # (B, n + 1, width)
            h = tokens + self.pos
            for block in self.blocks:
                h = block(h)
            return self.norm(h).mean(dim=1)  # (B, width)
        flat = controls.flatten(1)  # (B, n * control_dim)
        if self.time is not None:
            flat = torch.cat([flat, self.time(t)], dim=-1)
        return self.mlp(flat)

    def forward(self, controls: torch.Tensor, t: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-block additions: ``target_layers`` tensors (B, target_tokens, target_width), all zero at init."""
        if controls.shape[1] != self.num_controls:
            raise ValueError(f"expected {self.num_controls} control vectors, got {controls.shape[1]}")
        h = self.features(controls, t)
        b = h.shape[0]
        return [out(h).view(b, self.target_tokens, self.target_width) for out in self.zero_outs]


def steered_x0(
    prior: PriorDenoiser,
    adapter: ControlAdapter | None,
    z_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor | None,
    controls: torch.Tensor | None,
    drop: torch.Tensor | None = None,
) -> torch.Tensor:
    """The prior's x0 prediction (B, d) with the adapter's additions (the plain prior when either is None).

    Args:
        prior: the denoiser.
        adapter: the Control-Adapter, or None.
        z_t: noisy embeddings (B, d); t: timesteps (B,).
        cond: the prior's condition (B, cond_tokens, cond_dim), or None for its null condition.
        controls: the adapter's inputs (B, num_controls, control_dim), or None.
        drop: bool (B,), where the prior's condition is replaced by its null condition; the adapter is switched
            off there too, so a dropped example gets the plain prior's unconditional prediction.
    """
    residuals = adapter(controls, t) if adapter is not None and controls is not None else None
    if residuals is not None and drop is not None:
        keep = (~drop).to(residuals[0].dtype).view(-1, 1, 1)  # (B, 1, 1); multiplying by 1 keeps values exact
        residuals = [r * keep for r in residuals]
    return prior(z_t, t, cond, drop=drop, residuals=residuals)
