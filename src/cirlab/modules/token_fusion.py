"""Adaptive Token Fusion (TMCIR, arXiv 2504.10995): similarity-weighted, position-aware merging of a reference
image's tokens with a modification text's tokens, read out by a small transformer.

Our reading (METHODS.md, "TMCIR"): project the image tokens ``P`` (CLS included) and the text tokens ``T`` to a
common width; ``S = cos(P, T)``. Every text token j takes its best visual token ``i*(j) = argmax_i S[i, j]`` and
merges with it, ``f_j = a_j * T_j + (1 - a_j) * P_i*(j) + pos_j`` with ``a_j = sigmoid(w * S[i*(j), j] + b)``;
visual tokens that no text token picked are kept as they are; one transformer layer runs over
``[CLS; fused; kept]`` and its CLS output, projected to ``d``, is the composed query.

Padding never takes part: padded text tokens match nothing and are masked out of attention, and the variable
number of kept visual tokens is a mask over all visual positions, so a batch gives the same queries as its rows
one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CLS_TOKENS = ("learned", "image")


@dataclass
class TokenMatch:
    """How text tokens matched visual tokens.

    Attributes:
        best: index of each text token's best visual token ``i*(j)``, (B, L) int64 (0 where the text is padding).
        score: ``S[i*(j), j]``, (B, L) (0 where the text is padding).
        kept: visual tokens that no real text token picked, (B, N) bool.
    """

    best: torch.Tensor
    score: torch.Tensor
    kept: torch.Tensor


def match_tokens(similarity: torch.Tensor, text_mask: torch.Tensor) -> TokenMatch:
    """Each real text token's best visual token, and the visual tokens no text token picked.

    Args:
        similarity: ``S``, (B, N, L): visual token i against text token j.
        text_mask: (B, L), 1 for real text tokens, 0 for padding.
    """
    valid = text_mask.bool()  # (B, L)
    score, best = similarity.max(dim=1)  # (B, L) each: best over the N visual tokens
    best = best.masked_fill(~valid, 0)
    score = score.masked_fill(~valid, 0.0)
    picks = torch.zeros(similarity.shape[:2], dtype=torch.long, device=similarity.device)  # (B, N)
    # Padding positions point at index 0 with count 0, so they never mark a token as picked.
    picks.scatter_add_(1, best, valid.long())
    return TokenMatch(best, score, picks == 0)


class FusionBlock(nn.Module):
    """A pre-LN transformer layer whose attention ignores masked keys.

    Args:
        width: token width.
        heads: attention heads (must divide ``width``).
        mlp_ratio: MLP hidden width over ``width``.
        dropout: dropout on attention weights and the MLP output.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"fusion width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """Tokens (B, S, width) and which of them may be attended to (B, S) bool -> tokens (B, S, width).

        With ``first_only`` only the first token's output (B, 1, width) is computed (all tokens still serve as keys
        and values): the last layer's CLS is all the fusion reads.
        """
        b, s, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if first_only:
            q, x = q[:, :, :1], x[:, :1]
        # A boolean mask gives masked keys exactly zero weight, so padding cannot change the unmasked outputs.
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )  # (B, heads, S or 1, width / heads)
        x = x + self.out(attn.transpose(1, 2).reshape(b, x.shape[1], w))
        return x + self.mlp(self.ln2(x))


class AdaptiveTokenFusion(nn.Module):
    """Fuses image tokens and text tokens into one query embedding (not normalised).

    Args:
        vision_width: width of the image tokens ``P``.
        text_width: width of the text tokens ``T``.
        embed_dim: output dimension ``d`` (the retrieval space).
        max_text_tokens: longest text (number of learned text position embeddings ``pos_j``).
        width: the common width the tokens are projected to.
        heads: attention heads of the fusion layers.
        layers: transformer layers over ``[CLS; fused; kept]`` (the paper's reading: 1).
        mlp_ratio: MLP width over ``width`` in those layers.
        dropout: dropout in those layers.
        cls_token: ``learned`` (a learned CLS token heads the sequence; the image's CLS is one of the visual tokens,
            fused or kept like any other) or ``image`` (the reference's own projected CLS heads the sequence and is
            not matched).
        type_embeddings: add a learned embedding per token role (CLS, fused, kept) so the layer can tell them apart.
        gate_weight: initial ``w`` of ``a_j = sigmoid(w * S + b)``.
        gate_bias: initial ``b``.
    """

    def __init__(
        self,
        vision_width: int,
        text_width: int,
        embed_dim: int,
        max_text_tokens: int,
        width: int,
        heads: int = 4,
        layers: int = 1,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        cls_token: str = "learned",
        type_embeddings: bool = True,
        gate_weight: float = 1.0,
        gate_bias: float = 0.0,
    ) -> None:
        super().__init__()
        if cls_token not in CLS_TOKENS:
            raise ValueError(f"cls_token must be one of {CLS_TOKENS}, got {cls_token!r}")
        self.cls_mode = cls_token
        self.proj_visual = nn.Linear(vision_width, width)
        self.proj_text = nn.Linear(text_width, width)
        self.gate_weight = nn.Parameter(torch.tensor(float(gate_weight)))
        self.gate_bias = nn.Parameter(torch.tensor(float(gate_bias)))
        self.pos = nn.Parameter(0.02 * torch.randn(max_text_tokens, width))  # (L_max, width)
        self.cls = nn.Parameter(0.02 * torch.randn(width)) if cls_token == "learned" else None
        self.types = nn.Parameter(0.02 * torch.randn(3, width)) if type_embeddings else None  # CLS, fused, kept
        self.blocks = nn.ModuleList(FusionBlock(width, heads, mlp_ratio, dropout) for _ in range(layers))
        self.ln_out = nn.LayerNorm(width)
        self.head = nn.Linear(width, embed_dim)

    def gate(self, score: torch.Tensor) -> torch.Tensor:
        """Merge weights ``a_j = sigmoid(w * S[i*(j), j] + b)`` in (0, 1), same shape as ``score``."""
        return torch.sigmoid(self.gate_weight * score + self.gate_bias)

    def similarity(self, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine similarity ``S`` (B, N, L) of projected visual tokens (B, N, w) and text tokens (B, L, w)."""
        return F.normalize(visual, dim=-1) @ F.normalize(text, dim=-1).transpose(1, 2)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Composed embeddings (B, d).

        Args:
            image_tokens: ``P``, the reference's token states, CLS first, (B, 1 + n, vision_width).
            text_tokens: ``T``, the text's token states, (B, L, text_width).
            text_mask: (B, L), 1 for real text tokens, 0 for padding.
        """
        length = text_tokens.shape[1]
        if length > self.pos.shape[0]:
            raise ValueError(f"text of {length} tokens is longer than the {self.pos.shape[0]} position embeddings")
        visual = self.proj_visual(image_tokens.float())  # (B, 1 + n, w)
        text = self.proj_text(text_tokens.float())  # (B, L, w)
        valid = text_mask.bool()  # (B, L)
        if self.cls_mode == "image":
            cls, candidates = visual[:, :1], visual[:, 1:]  # (B, 1, w), (B, n, w)
        else:
            cls, candidates = self.cls.expand(visual.shape[0], 1, -1), visual  # (B, 1, w), (B, 1 + n, w)
        match = match_tokens(self.similarity(candidates, text), valid)
        a = self.gate(match.score).unsqueeze(-1)  # (B, L, 1)
        matched = torch.gather(candidates, 1, match.best.unsqueeze(-1).expand(-1, -1, candidates.shape[-1]))
        fused = a * text + (1 - a) * matched + self.pos[:length]  # (B, L, w)
        kept = candidates
        if self.types is not None:
            cls, fused, kept = cls + self.types[0], fused + self.types[1], kept + self.types[2]
        tokens = torch.cat([cls, fused, kept], dim=1)  # (B, 1 + L + N, w)
        cls_mask = torch.ones_like(valid[:, :1])  # (B, 1)
        key_mask = torch.cat([cls_mask, valid, match.kept], dim=1)  # (B, 1 + L + N)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, key_mask, first_only=i == len(self.blocks) - 1)
        return self.head(self.ln_out(tokens[:, 0]))
