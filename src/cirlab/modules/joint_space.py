"""Joint vision-language spaces: one L2-normalised vector ``z`` for an image, a text, or an (image, text) pair.

``JointSpace`` is the protocol ``embed(image=None, text=None) -> z`` (B, dim). Two implementations:

- ``CLIPJointSpace``: a dual encoder's space, ``z(I) = v``, ``z(T) = t``, ``z(I, T) = norm(v + t)`` (unit ``v``,
  ``t``). It reads cached image features (``ImageFeatures`` or raw embeddings), so training never re-encodes
  images, and keeps the (frozen) text tower's embeddings in memory per distinct string.
- ``MLLMJointSpace`` (defined in ``cirlab.backbones.mllm_space``, re-exported here): a multimodal LLM through
  transformers. Image, text and pair are each wrapped in a prompt inside the model's chat format; ``z`` is the
  final hidden state of the last token, L2-normalised (Qwen2-VL, Qwen2.5-VL). The ``mllm`` backbone serves this
  space's ``z(I)`` and ``z(T)`` as backbone features, so ``CLIPJointSpace`` over it is the multimodal-LLM space
  with the fused feature taken as the normalised sum; the pair prompt's ``z(I, T)`` comes from the backbone's
  ``encode_pair`` (through the feature cache, see ``cirlab.features.images.cached_pair_table``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from cirlab.backbones.mllm_space import SUPPORTED_MLLMS, MLLMJointSpace, MLLMJointSpaceConfig
from cirlab.types import ImageFeatures

__all__ = ["SUPPORTED_MLLMS", "CLIPJointSpace", "JointSpace", "MLLMJointSpace", "MLLMJointSpaceConfig"]


@runtime_checkable
class JointSpace(Protocol):
    """A space where images, texts and (image, text) pairs share one L2-normalised embedding of size ``dim``."""

    dim: int

    def embed(self, image: Any = None, text: Any = None) -> torch.Tensor:
        """``z(image)``, ``z(text)`` or ``z(image, text)``, (B, dim), L2-normalised."""
        ...


class CLIPJointSpace:
    """The joint space of a CLIP-like dual encoder: ``z(I) = v``, ``z(T) = t``, ``z(I, T) = norm(v + t)``.

    Text embeddings can be served from an in-memory cache (``cached=True``; for training, where the same captions
    and modification texts come back every epoch). Not an ``nn.Module``: it only borrows the backbone (which its
    owner registers), so the backbone's tensors are never saved twice.

    Args:
        backbone: a frozen backbone with ``encode_text``/``tokenize`` and ``embed_dim``.
        cache_size: how many distinct strings' text embeddings are kept in memory (0 disables the cache); the text
            tower is frozen, so a cached embedding stays valid.
    """

    def __init__(self, backbone: Any, cache_size: int = 100_000) -> None:
        self.backbone = backbone
        self.dim = int(backbone.embed_dim)
        self.cache_size = cache_size
        self._cache: dict[str, torch.Tensor] = {}

    def image_embeds(self, image: ImageFeatures | torch.Tensor) -> torch.Tensor:
        """``z(I) = norm(v)`` (B, dim) from image features or raw image embeddings (B, dim)."""
        embeds = image.embeds if isinstance(image, ImageFeatures) else image
        return F.normalize(embeds.float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str] | torch.Tensor, cached: bool = False) -> torch.Tensor:
        """``z(T) = norm(t)`` (B, dim) from strings or raw text embeddings.

        Args:
            texts: strings, or text embeddings (B, dim).
            cached: serve strings from (and add them to) the cache, encoding each distinct string once.
        """
        if isinstance(texts, torch.Tensor):
            return F.normalize(texts.float(), dim=-1)
        texts = list(texts)
        if not cached:
            return F.normalize(self.backbone.encode_text(self.backbone.tokenize(texts)).embeds.float(), dim=-1)
        missing = [s for s in dict.fromkeys(texts) if s not in self._cache]
        if missing:
            tokens = self.backbone.tokenize(missing)
            fresh = F.normalize(self.backbone.encode_text(tokens).embeds.float(), dim=-1)  # (M, dim)
            if len(self._cache) + len(missing) > self.cache_size:
                # Not room for all: encode this batch without caching it (no eviction bookkeeping needed).
                lookup = dict(zip(missing, fresh, strict=True))
                return torch.stack([self._cache[s] if s in self._cache else lookup[s] for s in texts])
            self._cache.update(zip(missing, fresh, strict=True))
        return torch.stack([self._cache[s] for s in texts])

    def embed(
        self,
        image: ImageFeatures | torch.Tensor | None = None,
        text: Sequence[str] | torch.Tensor | None = None,
        cached: bool = False,
    ) -> torch.Tensor:
        """``z(I)``, ``z(T)`` or ``z(I, T) = norm(z(I) + z(T))``, (B, dim), L2-normalised.

        Args:
            image: image features or image embeddings (B, dim).
            text: strings or text embeddings (B, dim).
            cached: serve strings' embeddings from the in-memory cache (see ``text_embeds``).
        """
        if image is None and text is None:
            raise ValueError("embed needs an image, a text or both")
        if text is None:
            return self.image_embeds(image)
        if image is None:
            return self.text_embeds(text, cached)
        return F.normalize(self.image_embeds(image) + self.text_embeds(text, cached), dim=-1)
