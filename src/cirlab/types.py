"""Shared vocabulary types: the backbone protocol and the feature containers that cross module boundaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    import numpy as np
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


@dataclass(eq=False)
class ReferenceImage:
    """A reference image as a method that reads pixels sees it: a content digest and a way to decode it.

    The digest identifies the image in caches (generated captions are keyed by it), so it is the digest of the
    file's bytes (``cirlab.features.hash_file``, as the feature cache uses) when the image came from a file or
    encoded bytes, and of the decoded RGB pixels when it came as a PIL image. Decoding is deferred until a model
    needs the pixels: a cache hit never opens the file.

    Attributes:
        digest: content digest (32 hex characters).
        path: the image file, when there is one.
        image: the decoded image, when there is no file.
    """

    digest: str
    path: Path | None = None
    image: Image.Image | None = field(default=None, repr=False)

    @classmethod
    def from_path(cls, path: str | Path, digest: str | None = None) -> ReferenceImage:
        """A file's image; ``digest`` (of the file's bytes) is computed when not given."""
        from cirlab.features.hashing import hash_file

        path = Path(path)
        return cls(digest or hash_file(path), path=path)

    @classmethod
    def from_image(cls, image: Image.Image, digest: str | None = None) -> ReferenceImage:
        """A decoded image; ``digest`` defaults to the digest of its RGB pixels."""
        import numpy as np

        from cirlab.features.hashing import hash_array

        rgb = image.convert("RGB")
        return cls(digest or hash_array(np.asarray(rgb)), image=rgb)

    def load(self) -> Image.Image:
        """The RGB image (``cirlab.data.images.ImageReadError`` naming the file when it cannot be read)."""
        if self.image is not None:
            return self.image
        if self.path is None:
            raise ValueError(f"reference image {self.digest} has neither a file nor pixels")
        from cirlab.data.images import load_image

        return load_image(self.path)


@dataclass
class QueryContext:
    """What a method may read beyond reference-image features and texts, when it declares that it does.

    ``CIRMethod.reads_reference_images`` asks for ``images`` (one per query, in order) and
    ``CIRMethod.reads_gallery`` for ``gallery``; the evaluation path and the index fill only what is declared.

    Attributes:
        images: the reference images of the queries.
        gallery: the gallery's embeddings in the method's retrieval space, (N, d) L2-normalised (a tensor or a
            possibly memory-mapped numpy array).
    """

    images: Sequence[ReferenceImage] | None = None
    gallery: torch.Tensor | np.ndarray | None = None
