"""LinCIR-style language-only training (Gu et al., "Language-only Efficient Training of Zero-shot Composed Image
Retrieval", CVPR 2024).

Known (public code): ``phi`` is trained from text alone: keywords of a caption ``c`` are replaced by ``$`` and
``s = phi(t(c) + noise)``; the loss makes ``t(c with keywords := s)`` reproduce ``t(c)``; the noise bridges the gap
between text and image embeddings, so at inference ``phi`` reads the image embedding ``v_ref``.
The public loader replaces each maximal run of determiner/adjective/noun tokens (a whole phrase such as "a large
red circle") by a single ``$``; ``mask: phrases`` (the default) does that, ``mask: words`` replaces each keyword
alone (so one object becomes "a $ $ $", a context the one-``$`` query prompt never shows).
Inferred here (METHODS.md): keywords come from a configurable word list instead of a part-of-speech tagger, and a
phrase is a run of keywords with the article before it; noise ``sigma * eps`` with ``eps ~ N(0, I)`` and
``sigma ~ U[0, noise_max)`` per sample on the normalised text embedding; MSE between normalised embeddings;
captions without a keyword get their last word replaced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cirlab.methods.base import CIRMethod, Stage, register_method
from cirlab.modules.mappers import SearlePhi
from cirlab.modules.pseudo_word import encode_with_pseudo, prompt_query, text_embeds
from cirlab.placeholder import DEFAULT_PROMPT, PLACEHOLDER
from cirlab.types import ImageFeatures


@dataclass
class LinCIRConfig:
    """Attributes:
    keywords: words replaced by the placeholder in training captions (empty: the last word of each caption).
    mask: "phrases" (each run of keywords, with the article before it, becomes one placeholder, as LinCIR's
        loader does with its parser's phrases) or "words" (each keyword becomes a placeholder).
    noise_max: upper bound of the per-sample noise scale. dropout: phi dropout. prompt: query prompt.
    """

    keywords: list[str] = field(default_factory=list)
    mask: str = "phrases"
    noise_max: float = 1.0
    dropout: float = 0.1
    prompt: str = DEFAULT_PROMPT


@register_method("lincir")
class LinCIR(CIRMethod):
    """LinCIR-style phi trained on captions only, with noise on the text embedding."""

    config_class = LinCIRConfig
    stages = (Stage("mapping", "captions"),)

    def __init__(self, backbone: Any, config: LinCIRConfig | None = None) -> None:
        super().__init__(backbone, config)
        self.phi = SearlePhi(backbone.embed_dim, backbone.token_dim, dropout=self.config.dropout)
        if self.config.mask not in ("phrases", "words"):
            raise ValueError(f"lincir: mask must be 'phrases' or 'words', got {self.config.mask!r}")
        words = sorted(self.config.keywords, key=len, reverse=True)
        self._keyword_re = None
        if words:
            keyword = "(?:" + "|".join(map(re.escape, words)) + ")"
            if self.config.mask == "phrases":
                keyword = rf"(?:(?:a|an|the)\s+)?{keyword}(?:\s+{keyword})*"
            self._keyword_re = re.compile(rf"\b{keyword}\b")

    def mask_keywords(self, caption: str) -> str:
        """The caption with every keyword (or keyword phrase, see ``mask``) replaced by the placeholder, or its last
        word if it has none."""
        if self._keyword_re is not None:
            masked = self._keyword_re.sub(PLACEHOLDER, caption.lower())
            if PLACEHOLDER in masked:
                return masked
        head, _, _ = caption.strip().rpartition(" ")
        return f"{head} {PLACEHOLDER}".strip()

    def compose(self, reference: ImageFeatures, texts: list[str]) -> torch.Tensor:
        pseudo = self.phi(F.normalize(reference.embeds.float(), dim=-1))
        return prompt_query(self.backbone, self.config.prompt, texts, pseudo)

    def trainable_parameters(self, stage: str) -> list[torch.nn.Parameter]:
        self.stage(stage)
        return list(self.phi.parameters())

    def training_loss(self, stage: str, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        captions: list[str] = batch["caption"]
        with torch.no_grad():
            target = text_embeds(self.backbone, captions)  # (B, d)
        sigma = torch.rand(len(captions), 1, device=target.device) * self.config.noise_max
        pseudo = self.phi(target + sigma * torch.randn_like(target))
        masked = [self.mask_keywords(c) for c in captions]
        pred = F.normalize(encode_with_pseudo(self.backbone, masked, pseudo).embeds.float(), dim=-1)
        return {"loss": F.mse_loss(pred, target) * target.shape[1]}
