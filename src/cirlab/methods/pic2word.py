"""Pic2Word (Saito et al., "Pic2Word: Mapping Pictures to Words for Zero-shot Composed Image Retrieval", CVPR 2023).

Known (public code): a mapping network ``phi`` turns the image embedding into a pseudo-word ``s = phi(v)``; it is
trained on unlabeled images only, with a contrastive loss between ``t("a photo of $")`` (``$ := s``) and ``v``,
the backbone frozen. Inference: ``q = t(prompt with $ := phi(v_ref))``.
Inferred here: the prompt wording (config), the temperature (the backbone's own CLIP temperature unless set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cirlab.methods.base import CIRMethod, Stage, register_method
from cirlab.modules.losses import clip_temperature, info_nce
from cirlab.modules.mappers import Pic2WordMapper
from cirlab.modules.pseudo_word import encode_with_pseudo, prompt_query
from cirlab.placeholder import DEFAULT_PROMPT
from cirlab.types import ImageFeatures


@dataclass
class Pic2WordConfig:
    """Attributes:
    hidden: mapper width. layers: mapper blocks. dropout: mapper dropout.
    train_prompt: prompt read during training. prompt: query prompt at inference (``{text}`` = modification).
    temperature: InfoNCE temperature; <= 0 uses the backbone's learned CLIP temperature.
    """

    hidden: int = 512
    layers: int = 3
    dropout: float = 0.1
    train_prompt: str = "a photo of $"
    prompt: str = DEFAULT_PROMPT
    temperature: float = 0.0


@register_method("pic2word")
class Pic2Word(CIRMethod):
    """Pic2Word: image -> pseudo-word mapping trained on images only."""

    config_class = Pic2WordConfig
    stages = (Stage("mapping", "images"),)

    def __init__(self, backbone: Any, config: Pic2WordConfig | None = None) -> None:
        super().__init__(backbone, config)
        c = self.config
        self.phi = Pic2WordMapper(backbone.embed_dim, backbone.token_dim, c.hidden, c.layers, c.dropout)

    def compose(self, reference: ImageFeatures, texts: list[str]) -> torch.Tensor:
        pseudo = self.phi(F.normalize(reference.embeds.float(), dim=-1))  # (B, w_t)
        return prompt_query(self.backbone, self.config.prompt, texts, pseudo)

    def trainable_parameters(self, stage: str) -> list[torch.nn.Parameter]:
        self.stage(stage)
        return list(self.phi.parameters())

    def training_loss(self, stage: str, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        v = F.normalize(batch["image"].embeds.float(), dim=-1)  # (B, d)
        pseudo = self.phi(v)
        t = encode_with_pseudo(self.backbone, [self.config.train_prompt] * v.shape[0], pseudo).embeds
        tau = clip_temperature(self.backbone, self.config.temperature)
        loss = info_nce(F.normalize(t.float(), dim=-1), v, tau, symmetric=True)
        return {"loss": loss}
