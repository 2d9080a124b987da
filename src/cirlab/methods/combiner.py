"""Supervised upper bound: a small Combiner (in the spirit of CLIP4Cir, Baldrati et al. 2022) trained on a
benchmark's training triplets with the backbone frozen.

Our design (METHODS.md): an MLP over ``[v_ref; t(text)]`` predicts a mixing weight and a residual added to the
weighted sum of the two normalised embeddings; InfoNCE against ``v_target`` with in-batch negatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.methods.base import CIRMethod, Stage, register_method
from cirlab.modules.losses import info_nce
from cirlab.modules.pseudo_word import text_embeds
from cirlab.types import ImageFeatures


@dataclass
class CombinerConfig:
    """Attributes: hidden: MLP width (default 4d when 0). dropout: MLP dropout. temperature: InfoNCE temperature."""

    hidden: int = 0
    dropout: float = 0.1
    temperature: float = 0.05


@register_method("combiner")
class Combiner(CIRMethod):
    """Supervised combiner of frozen image and text embeddings (upper bound for zero-shot methods)."""

    config_class = CombinerConfig
    stages = (Stage("combiner", "triplets", zero_shot=False),)
    supervised = True

    def __init__(self, backbone: Any, config: CombinerConfig | None = None) -> None:
        super().__init__(backbone, config)
        d = backbone.embed_dim
        hidden = self.config.hidden or 4 * d
        self.mlp = nn.Sequential(
            nn.Linear(2 * d, hidden), nn.ReLU(), nn.Dropout(self.config.dropout), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.residual = nn.Linear(hidden, d)
        self.gate = nn.Linear(hidden, 1)
        # Starts as the plain sum: the residual is zero and the gate is 0.5.
        nn.init.zeros_(self.residual.weight)
        nn.init.zeros_(self.residual.bias)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def combine(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Normalised image and text embeddings (B, d) -> composed query (B, d), L2-normalised."""
        h = self.mlp(torch.cat([v, t], dim=-1))  # (B, hidden)
        alpha = torch.sigmoid(self.gate(h))  # (B, 1)
        return F.normalize(alpha * v + (1 - alpha) * t + self.residual(h), dim=-1)

    def compose(self, reference: ImageFeatures, texts: list[str]) -> torch.Tensor:
        v = F.normalize(reference.embeds.float(), dim=-1)
        return self.combine(v, text_embeds(self.backbone, texts))

    def trainable_parameters(self, stage: str) -> list[nn.Parameter]:
        self.stage(stage)
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def training_loss(self, stage: str, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            t = text_embeds(self.backbone, batch["text"])
        v = F.normalize(batch["ref"].embeds.float(), dim=-1)
        target = F.normalize(batch["target"].embeds.float(), dim=-1)
        return {"loss": info_nce(self.combine(v, t), target, self.config.temperature)}
