"""SEARLE-OTI (Baldrati et al., ICCV 2023): the reference image inverted by Optimization-based Textual Inversion at
query time, no trained network.

Known (public code, github.com/miccunifi/SEARLE): ``src/oti_inversion.py`` optimises one pseudo-token per reference
image of a benchmark split (see ``cirlab.modules.oti`` for the objective and its defaults: 350 AdamW steps at lr
2e-2, EMA 0.99, a template cosine loss plus 0.5 x a phrase regulariser over the image's top concepts), and
``src/validate.py`` (``--eval-type oti``) queries with the EMA tokens: ``q = t("a photo of $ that {text}")`` with the
token at the first ``$``; FashionIQ averages the normalised queries of both caption orders.

Every setting is a ``SearleOTIConfig`` field whose default is the public code's. Here the tokens are computed when
queries are composed (the reference computes them once per split and stores them), so evaluation costs ``oti.steps``
text-encoder passes per batch of reference images; identical reference embeddings in a batch are inverted once.
Departures: the template family of phrases where no language model's phrases are available
(``concepts.phrase_templates``), and the batching choices stated in ``cirlab.modules.oti``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cirlab.methods.base import CIRMethod, register_method
from cirlab.modules.oti import ConceptBank, ConceptConfig, OTIConfig, oti_invert
from cirlab.modules.pseudo_word import prompt_query
from cirlab.placeholder import DEFAULT_PROMPT
from cirlab.types import ImageFeatures


@dataclass
class SearleOTIConfig:
    """Attributes:
    oti: OTI settings. concepts: concept vocabulary and phrases of the regulariser.
    prompt: query prompt (``{text}`` = modification). first_placeholder_only: splice the token at the first ``$``.
    fashioniq_join: FashionIQ caption order (``both``: the two orders' normalised queries averaged).
    """

    oti: OTIConfig = field(default_factory=OTIConfig)
    concepts: ConceptConfig = field(default_factory=ConceptConfig)
    prompt: str = DEFAULT_PROMPT
    first_placeholder_only: bool = True
    fashioniq_join: str = "both"


@register_method("searle-oti")
class SearleOTI(CIRMethod):
    """Per-query textual inversion of the reference image (SEARLE's OTI), then the query prompt."""

    config_class = SearleOTIConfig
    optimises_per_query = True

    def __init__(self, backbone: Any, config: SearleOTIConfig | None = None) -> None:
        super().__init__(backbone, config)
        self._bank: ConceptBank | None = None

    def concept_bank(self) -> ConceptBank:
        """The concepts embedded by the (frozen) backbone, built once."""
        if self._bank is None:
            self._bank = ConceptBank(self.backbone, self.config.concepts)
        return self._bank

    def invert(self, embeds: torch.Tensor) -> torch.Tensor:
        """OTI tokens (B, w_t) of raw image embeddings (B, d); equal rows are inverted once."""
        unique, inverse = torch.unique(embeds.float(), dim=0, return_inverse=True)
        c = self.config
        tokens = oti_invert(self.backbone, unique, self.concept_bank(), c.oti, c.first_placeholder_only)
        return tokens[inverse]

    def compose(self, reference: ImageFeatures, texts: list[str]) -> torch.Tensor:
        pseudo = self.invert(reference.embeds.to(self.backbone.device))  # (B, w_t)
        return prompt_query(self.backbone, self.config.prompt, texts, pseudo, self.config.first_placeholder_only)
