"""SEARLE-style textual inversion (Baldrati et al., "Zero-Shot Composed Image Retrieval with Textual Inversion",
ICCV 2023).

Known (public code): ``phi`` (3 Linear layers ``d -> 4d -> 4d -> w_t`` with GELU and dropout) maps the image
embedding to a pseudo-word, trained contrastively like Pic2Word plus a regulariser pulling ``t("a photo of $")``
towards ``t("a photo of {concept}")`` for a concept word describing the image. SEARLE takes concepts from
GPT-generated phrases over Open Images classes; OTI (per-image optimisation) is optional and not implemented.
Inferred here: the concept is the best-scoring word of a configurable vocabulary under the backbone's own zero-shot
image-text similarity (computed on the fly with the frozen backbone); the regulariser is ``1 - cos``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cirlab.methods.base import CIRMethod, Stage, register_method
from cirlab.modules.losses import clip_temperature, info_nce
from cirlab.modules.mappers import SearlePhi
from cirlab.modules.pseudo_word import encode_with_pseudo, prompt_query, text_embeds
from cirlab.placeholder import DEFAULT_PROMPT
from cirlab.types import ImageFeatures

GENERIC_CONCEPTS = [
    *("person", "man", "woman", "child", "dog", "cat", "bird", "horse", "car", "bus", "train", "bicycle", "boat"),
    *("airplane", "table", "chair", "bed", "sofa", "food", "pizza", "cake", "fruit", "flower", "tree", "building"),
    *("street", "sky", "beach", "mountain", "water", "snow", "room", "kitchen", "shirt", "dress", "shoe", "bag"),
]


@dataclass
class SearleConfig:
    """Attributes:
    dropout: phi dropout. train_prompt / prompt: training and query prompts. concept_prompt: fills ``{concept}``.
    concepts: concept vocabulary scored zero-shot by the backbone. lambda_reg: weight of the concept regulariser.
    temperature: InfoNCE temperature (<= 0: the backbone's CLIP temperature).
    """

    dropout: float = 0.5
    train_prompt: str = "a photo of $"
    prompt: str = DEFAULT_PROMPT
    concept_prompt: str = "a photo of {concept}"
    concepts: list[str] = field(default_factory=lambda: list(GENERIC_CONCEPTS))
    lambda_reg: float = 0.5
    temperature: float = 0.0


@register_method("searle")
class Searle(CIRMethod):
    """SEARLE-style phi with a concept regulariser (no OTI)."""

    config_class = SearleConfig
    stages = (Stage("mapping", "images"),)

    def __init__(self, backbone: Any, config: SearleConfig | None = None) -> None:
        super().__init__(backbone, config)
        self.phi = SearlePhi(backbone.embed_dim, backbone.token_dim, dropout=self.config.dropout)
        self._concept_cache: torch.Tensor | None = None

    def _concept_embeds(self) -> torch.Tensor:
        # The backbone is frozen, so the concept prompts' embeddings never change: compute them once.
        if self._concept_cache is None:
            if not self.config.concepts:
                raise ValueError("searle: the concept vocabulary (config.concepts) is empty")
            with torch.no_grad():
                prompts = [self.config.concept_prompt.replace("{concept}", c) for c in self.config.concepts]
                self._concept_cache = text_embeds(self.backbone, prompts)  # (C, d)
        return self._concept_cache

    def compose(self, reference: ImageFeatures, texts: list[str]) -> torch.Tensor:
        pseudo = self.phi(F.normalize(reference.embeds.float(), dim=-1))
        return prompt_query(self.backbone, self.config.prompt, texts, pseudo)

    def trainable_parameters(self, stage: str) -> list[torch.nn.Parameter]:
        self.stage(stage)
        return list(self.phi.parameters())

    def training_loss(self, stage: str, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        v = F.normalize(batch["image"].embeds.float(), dim=-1)  # (B, d)
        pseudo = self.phi(v)
        t = F.normalize(encode_with_pseudo(self.backbone, [self.config.train_prompt] * len(v), pseudo).embeds, dim=-1)
        contrastive = info_nce(t.float(), v, clip_temperature(self.backbone, self.config.temperature), symmetric=True)
        concepts = self._concept_embeds()
        nearest = concepts[(v @ concepts.t()).argmax(dim=1)]  # (B, d): each image's zero-shot concept
        reg = (1.0 - (t.float() * nearest).sum(dim=-1)).mean()
        return {"loss": contrastive + self.config.lambda_reg * reg, "contrastive": contrastive, "reg": reg}
