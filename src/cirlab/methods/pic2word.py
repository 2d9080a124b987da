"""Pic2Word (Saito et al., "Pic2Word: Mapping Pictures to Words for Zero-shot Composed Image Retrieval", CVPR 2023).

Known (public code, github.com/google-research/composed_image_retrieval): a mapping network ``phi`` (IM2TEXT in
``model/model.py``: ``n_layer = 2`` blocks Linear(d, 512)-Dropout(0.1)-ReLU, then Linear(512, w_t)) turns the *raw*
CLIP image embedding into a pseudo-word ``s = phi(v)``; it is trained on unlabeled images only
(``src/trainer.py``: ``get_loss_img2text``) with CLIP's symmetric contrastive loss between ``t("a photo of $")``
(``$ := s``) and ``v`` at CLIP's own temperature, the backbone frozen. Inference (``src/data.py``):
``q = t("a photo of $ , {text}")``, the token inserted at the prompt's placeholder only (``model/model.py``
``encode_text_img_retrieval``: the first ``*``; a ``$`` in the modification text stays a word); FashionIQ joins the
captions in reverse order (``"{c2} and {c1}"``).
Optimiser (``src/main.py``, ``src/params.py`` and the README command): AdamW, betas (0.9, 0.98), eps 1e-6, weight
decay 0.1 except on biases and norms, lr 1e-4, 10,000 warm-up steps then cosine, no gradient clipping (those are
``TrainConfig`` fields, set by the ``cc3m-vitl14`` preset).

Every setting is a ``Pic2WordConfig`` field whose default is the public code's. Departures available as fields:
``normalize_input`` (feed ``phi`` the L2-normalised embedding instead of the raw one), ``temperature`` (a fixed
temperature instead of CLIP's), ``layers`` / ``hidden`` / ``dropout``, ``first_placeholder_only``, the prompts and
``fashioniq_join``.
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
from cirlab.types import ImageFeatures


@dataclass
class Pic2WordConfig:
    """Attributes:
    hidden: mapper width (IM2TEXT's ``middle_dim``). layers: mapper blocks (``n_layer``). dropout: mapper dropout.
    train_prompt: prompt read during training. prompt: query prompt at inference (``{text}`` = modification).
    temperature: InfoNCE temperature; <= 0 uses the backbone's learned CLIP temperature.
    normalize_input: feed ``phi`` the L2-normalised image embedding (the public code feeds the raw one).
    first_placeholder_only: splice the token at the first ``$`` of the query only (False: every ``$``, including
        any in the modification text).
    fashioniq_join: FashionIQ caption order of the query text (the public code: ``reverse``).
    """

    hidden: int = 512
    layers: int = 2
    dropout: float = 0.1
    train_prompt: str = "a photo of $"
    prompt: str = "a photo of $ , {text}"
    temperature: float = 0.0
    normalize_input: bool = False
    first_placeholder_only: bool = True
    fashioniq_join: str = "reverse"


@register_method("pic2word")
class Pic2Word(CIRMethod):
    """Pic2Word: image -> pseudo-word mapping trained on images only."""

    config_class = Pic2WordConfig
    stages = (Stage("mapping", "images"),)

    def __init__(self, backbone: Any, config: Pic2WordConfig | None = None) -> None:
        super().__init__(backbone, config)
        c = self.config
        self.phi = Pic2WordMapper(backbone.embed_dim, backbone.token_dim, c.hidden, c.layers, c.dropout)

    def phi_input(self, embeds: torch.Tensor) -> torch.Tensor:
        """What ``phi`` reads: the raw image embedding (B, d), or its L2 normalisation with ``normalize_input``."""
        embeds = embeds.float()
        return F.normalize(embeds, dim=-1) if self.config.normalize_input else embeds

    def compose(self, reference: ImageFeatures, texts: list[str]) -> torch.Tensor:
        pseudo = self.phi(self.phi_input(reference.embeds))  # (B, w_t)
        return prompt_query(self.backbone, self.config.prompt, texts, pseudo, self.config.first_placeholder_only)

    def trainable_parameters(self, stage: str) -> list[torch.nn.Parameter]:
        self.stage(stage)
        return list(self.phi.parameters())

    def training_loss(self, stage: str, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        embeds = batch["image"].embeds
        pseudo = self.phi(self.phi_input(embeds))  # (B, w_t)
        v = F.normalize(embeds.float(), dim=-1)  # (B, d)
        t = encode_with_pseudo(self.backbone, [self.config.train_prompt] * v.shape[0], pseudo).embeds
        tau = clip_temperature(self.backbone, self.config.temperature)
        loss = info_nce(F.normalize(t.float(), dim=-1), v, tau, symmetric=True)
        return {"loss": loss}
