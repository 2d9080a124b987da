"""Shared vocabulary types: the backbone protocol and the feature containers that cross module boundaries."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    import torch
    from PIL import Image

    from cirlab.backbones.transforms import ImageTransform


@dataclass
class ImageFeatures:
    """What an image encoder returns.

    Attributes:
        embeds: projected global embeddings, not normalised, shape (B, embed_dim).
        tokens: final-layer token states before projection, CLS first, shape (B, 1 + n_patches, vision_width).
    """

    embeds: torch.Tensor
    tokens: torch.Tensor


@dataclass
class PairFeatures(ImageFeatures):
    """Image features of (image, caption) pairs, with the backbone's joint embedding of each pair.

    Attributes:
        fused: ``z(I, T)`` from a pair-encoding backbone (``PairEncoder``), shape (B, embed_dim).
    """

    fused: torch.Tensor


@dataclass
class TextFeatures:
    """What a text encoder returns.

    Attributes:
        embeds: projected pooled embeddings, not normalised, shape (B, embed_dim).
        tokens: final-layer token states before projection, shape (B, L, token_dim).
        attention_mask: 1 for real tokens, 0 for padding, shape (B, L).
    """

    embeds: torch.Tensor
    tokens: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class TokenBatch:
    """Tokenised texts: ``input_ids`` and ``attention_mask``, both (B, L) int64."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: Any) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device))


@runtime_checkable
class Backbone(Protocol):
    """A CLIP-like dual encoder as every method sees it (STYLE.md rule 4).

    Methods read ``embed_dim``, ``token_dim`` and ``vision_width`` from here; none is hard-coded. A backbone without
    per-patch image features (``has_image_tokens`` False) returns ``tokens`` of shape (B, 0, vision_width).
    """

    name: str
    embed_dim: int
    token_dim: int
    vision_width: int
    placeholder_token_id: int
    image_transform: ImageTransform
    has_image_tokens: bool

    @property
    def device(self) -> torch.device: ...

    def image_encoder_parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures: ...

    def encode_text(self, tokens: TokenBatch) -> TextFeatures: ...

    def encode_text_embeds(self, input_embeds: torch.Tensor, tokens: TokenBatch) -> TextFeatures: ...

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def tokenize(self, texts: list[str]) -> TokenBatch: ...

    def truncate(self, texts: list[str]) -> list[str]: ...

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor: ...

    def freeze(self) -> Backbone: ...

    def save_pretrained(self, path: str | Path) -> None: ...

    def identity(self) -> str: ...


@runtime_checkable
class PairEncoder(Protocol):
    """A backbone that also embeds an (image, text) pair jointly (the ``mllm`` backbone's pair prompt)."""

    def encode_pair(self, pixels: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """``z(I, T)`` (B, embed_dim), L2-normalised, from pixels (B, 3, S, S) and one text per image."""
        ...
