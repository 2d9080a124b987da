"""Visual semantic injection (VSI): enrich a pseudo-word token with the image's patch tokens.

One cross-attention block: the query is the mapped token ``s0`` (B, w_t), keys and values are the image encoder's
token states ``P`` (B, 1 + n, w_v) projected to ``w_t``; the result enters through a gate initialised to zero,
``s = s0 + gate * xattn(s0, P)``, so training starts exactly from the plain mapping network and the block only
contributes as far as it helps (Map-to-Compose, arXiv 2504.17990; the block's exact form is our reading).
"""

from __future__ import annotations

import torch
from torch import nn


class VisualSemanticInjection(nn.Module):
    """``s = s0 + gate * xattn(LN(s0), LN(proj(P)))`` with a scalar ``gate`` initialised to 0.

    Args:
        token_dim: width ``w_t`` of the pseudo-word token (the text encoder's input embeddings).
        vision_width: width ``w_v`` of the image token states.
        heads: attention heads; must divide ``token_dim``.
        dropout: attention dropout.
    """

    def __init__(self, token_dim: int, vision_width: int, heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        if token_dim % heads:
            raise ValueError(f"VSI: {heads} heads do not divide the token width {token_dim}")
        self.kv_proj = nn.Linear(vision_width, token_dim)
        # Pre-norm on both sides: s0 and the projected tokens live on different scales.
        self.norm_q = nn.LayerNorm(token_dim)
        self.norm_kv = nn.LayerNorm(token_dim)
        self.attn = nn.MultiheadAttention(token_dim, heads, dropout=dropout, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, s0: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Injects image tokens into pseudo-words.

        Args:
            s0: pseudo-word tokens (B, w_t).
            tokens: image token states, CLS first (B, 1 + n, w_v); any float dtype (the cache stores float16).

        Returns:
            Enriched pseudo-word tokens (B, w_t); equal to ``s0`` while ``gate`` is 0.
        """
        if tokens.dim() != 3 or tokens.shape[0] != s0.shape[0] or tokens.shape[1] == 0:
            raise ValueError(
                f"VSI needs image token states (B, 1 + n, w_v) for {s0.shape[0]} tokens, got {tuple(tokens.shape)} "
                "(were the features computed without tokens? the method sets needs_image_tokens)"
            )
        kv = self.norm_kv(self.kv_proj(tokens.to(self.kv_proj.weight.dtype)))  # (B, 1 + n, w_t)
        query = self.norm_q(s0).unsqueeze(1)  # (B, 1, w_t)
        attended, _ = self.attn(query, kv, kv, need_weights=False)  # (B, 1, w_t)
        return s0 + self.gate.to(s0.dtype) * attended.squeeze(1).to(s0.dtype)
