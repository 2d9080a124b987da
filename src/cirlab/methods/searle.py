"""SEARLE (Baldrati et al., "Zero-Shot Composed Image Retrieval with Textual Inversion", ICCV 2023): ``phi``
distilled from per-image OTI tokens.

Known (public code, github.com/miccunifi/SEARLE): ``phi`` (``src/phi.py``: Linear(d, 4d)-GELU-Dropout(0.5),
Linear(4d, 4d)-GELU-Dropout, Linear(4d, w_t)) maps the *raw* CLIP image embedding to a pseudo-word. It is trained
(``src/train_phi.py``) by distillation only, with no image-text contrastive loss:

* ``lambda_distil * NT-Xent(OTI tokens, phi(v))`` at temperature 0.25 in token space (``src/utils.py``:
  ``contrastive_loss``), the teacher tokens precomputed by OTI (``cirlab.modules.oti``; the EMA tokens) over the
  training images;
* ``lambda_gpt`` (0.75, the README's and the script's default) ``* (1 - cos(t(phrase with its concept := phi(v)),
  t(phrase)))`` for a random concept among the image's top 150 (``--top-k-concepts``; OTI's teacher keeps 15) and
  a random phrase of it, every occurrence of the concept replaced by ``$`` but the token spliced at the first only
  (``src/encode_with_pseudo_tokens.py``).

AdamW at a constant lr 1e-4, weight decay 0.01 on every parameter, no gradient clipping, batch 256 (``TrainConfig``
fields, set by the ``imagenet-vitl14`` preset, which also names ``targetpad`` preprocessing). Inference
(``src/validate.py``): ``q = t("a photo of $ that {text}")`` with ``$ := phi(v_ref)`` at the first ``$``;
FashionIQ averages the normalised queries of ``"{c1} and {c2}"`` and ``"{c2} and {c1}"``.

Every setting is a ``SearleConfig`` field whose default is the public code's (OTI's and the concepts' in
``oti`` / ``concepts``). Departures available as fields: ``normalize_input`` (feed ``phi`` the normalised embedding),
``oti_images`` (distil from the OTI tokens of the first N training images only; SEARLE inverts all of them),
``first_placeholder_only``, the prompt and ``fashioniq_join``; where no language model's phrases are available, a
template family of phrases stands in (``concepts.phrase_templates``, see ``cirlab.modules.oti``). The OTI teacher
tokens are computed when the stage starts (``prepare_data``), not loaded from a file; under ``torchrun`` every
process inverts the same images (``oti_images`` bounds that cost).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cirlab.config import budget_field
from cirlab.methods.base import CIRMethod, Stage, register_method
from cirlab.modules.losses import nt_xent
from cirlab.modules.mappers import SearlePhi
from cirlab.modules.oti import ConceptBank, ConceptConfig, OTIConfig, oti_invert
from cirlab.modules.pseudo_word import encode_with_pseudo, prompt_query
from cirlab.placeholder import DEFAULT_PROMPT
from cirlab.types import ImageFeatures


@dataclass
class SearleConfig:
    """Attributes:
    dropout: phi dropout. hidden: phi width (0: 4 d).
    normalize_input: feed ``phi`` the L2-normalised image embedding (the public code feeds the raw one).
    temperature: NT-Xent temperature of the distillation loss (in token space).
    lambda_distil: weight of the distillation loss. lambda_gpt: weight of the phrase loss.
    oti_images: distil from the first N training images' OTI tokens (0: every image); a dry run caps it.
    oti: the teacher's OTI settings. concepts: concept vocabulary and phrases (teacher and phrase loss).
    top_k_concepts: the phrase loss draws its concept from the image's top N (``concepts.top_k`` is OTI's).
    prompt: query prompt (``{text}`` = modification). first_placeholder_only: splice the token at the first ``$``.
    fashioniq_join: FashionIQ caption order (``both``: the two orders' normalised queries averaged).
    """

    dropout: float = 0.5
    hidden: int = 0
    normalize_input: bool = False
    temperature: float = 0.25
    lambda_distil: float = 1.0
    lambda_gpt: float = 0.75
    oti_images: int = budget_field(0, "items")
    oti: OTIConfig = field(default_factory=OTIConfig)
    concepts: ConceptConfig = field(default_factory=ConceptConfig)
    top_k_concepts: int = 150
    prompt: str = DEFAULT_PROMPT
    first_placeholder_only: bool = True
    fashioniq_join: str = "both"


@register_method("searle")
class Searle(CIRMethod):
    """SEARLE's phi, distilled from OTI tokens with a phrase regulariser."""

    config_class = SearleConfig
    stages = (Stage("mapping", "images"),)

    def __init__(self, backbone: Any, config: SearleConfig | None = None) -> None:
        super().__init__(backbone, config)
        c = self.config
        self.phi = SearlePhi(backbone.embed_dim, backbone.token_dim, hidden=c.hidden or None, dropout=c.dropout)
        self._bank: ConceptBank | None = None
        # The OTI tokens (N, w_t) of the stage's images, row i for table row i; set by prepare_data.
        self.teacher: torch.Tensor | None = None

    def concept_bank(self) -> ConceptBank:
        """The concepts embedded by the (frozen) backbone, built once."""
        if self._bank is None:
            self._bank = ConceptBank(self.backbone, self.config.concepts)
        return self._bank

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

    def prepare_data(self, stage: str, images: Any) -> Any:
        """Inverts the stage's images (the first ``oti_images``) with OTI: the teacher tokens of the distillation."""
        self.stage(stage)
        if not hasattr(images, "embeds"):
            raise TypeError("searle distils from cached image features; its image encoder is frozen")
        n = self.config.oti_images or len(images)
        if n < len(images):
            images = type(images)(images.names[:n], images.embeds[:n], None)
        with torch.no_grad():
            embeds = images.gather(torch.arange(len(images))).embeds.to(self.backbone.device)  # (N, d)
        self.teacher = oti_invert(
            self.backbone, embeds, self.concept_bank(), self.config.oti, self.config.first_placeholder_only
        ).detach()  # (N, w_t)
        return images

    def training_loss(self, stage: str, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.teacher is None:
            raise RuntimeError("searle: call prepare_data(stage, images) first (it computes the OTI teacher tokens)")
        embeds = batch["image"].embeds
        pseudo = self.phi(self.phi_input(embeds))  # (B, w_t)
        teacher = self.teacher[batch["rows"].to(self.teacher.device)].to(pseudo.device)  # (B, w_t)
        distil = nt_xent(teacher, pseudo, self.config.temperature)
        gpt = self._phrase_loss(embeds, pseudo)
        loss = self.config.lambda_distil * distil + self.config.lambda_gpt * gpt
        return {"loss": loss, "distil": distil, "gpt": gpt}

    def _phrase_loss(self, embeds: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        """``1 - cos(t(phrase with its concept := s), t(phrase))``, one random concept and phrase per image."""
        bank = self.concept_bank()
        pairs = []
        for cands in bank.candidates(embeds.detach(), self.config.top_k_concepts):
            concept = cands[int(torch.randint(len(cands), (1,)))]
            pairs.append(bank.phrase_pair(concept, int(torch.randint(len(bank.phrases[concept]), (1,))), False))
        target = bank.phrase_embeds([p for p, _ in pairs]).to(pseudo.device)  # (B, d)
        masked = encode_with_pseudo(self.backbone, [m for _, m in pairs], pseudo, self.config.first_placeholder_only)
        return (1 - (F.normalize(masked.embeds.float(), dim=-1) * target).sum(-1)).mean()
