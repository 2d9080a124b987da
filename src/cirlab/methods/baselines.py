"""Training-free baselines: image-only, text-only and sum of normalised embeddings.

- ``image-only``: ``q = norm(v_ref)``
- ``text-only``: ``q = norm(t(text))``
- ``sum``: ``q = norm(norm(v_ref) + norm(t(text)))``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cirlab.methods.base import CIRMethod, register_method
from cirlab.modules.pseudo_word import text_embeds
from cirlab.types import ImageFeatures


@register_method("image-only")
class ImageOnly(CIRMethod):
    """Retrieves with the reference image alone (ignores the text)."""

    def compose(self, reference: ImageFeatures, texts: list[str]) -> torch.Tensor:
        return F.normalize(reference.embeds.float(), dim=-1)


@dataclass
class TextOnlyConfig:
    """Attributes: template: wraps the modification text (``{text}``), e.g. ``"a photo that {text}"``."""

    template: str = "{text}"


@register_method("text-only")
class TextOnly(CIRMethod):
    """Retrieves with the modification text alone."""

    config_class = TextOnlyConfig

    def compose(self, reference: ImageFeatures, texts: list[str]) -> torch.Tensor:
        return text_embeds(self.backbone, [self.config.template.replace("{text}", t.strip()) for t in texts])


@dataclass
class SumConfig:
    """Attributes: text_weight: weight of the text embedding in the sum; template: wraps the text."""

    text_weight: float = 1.0
    template: str = "{text}"


@register_method("sum")
class Sum(CIRMethod):
    """Late fusion: the normalised sum of the image and text embeddings."""

    config_class = SumConfig

    def compose(self, reference: ImageFeatures, texts: list[str]) -> torch.Tensor:
        v = F.normalize(reference.embeds.float(), dim=-1)
        t = text_embeds(self.backbone, [self.config.template.replace("{text}", x.strip()) for x in texts])
        return F.normalize(v + self.config.text_weight * t, dim=-1)
