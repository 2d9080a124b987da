"""Gallery encoding for the index: image files become gallery embeddings in the method's retrieval space.

Raw image features come from the one image-feature path (``cirlab.features.images``): looked up in the shared
feature cache by content digest, so a file is encoded once per (image encoder, preprocessing) whichever index,
evaluation or training run asks for it, and decoded by a pool of threads running ahead of the model. The raw
embeddings then go through the method's ``encode_gallery``, which maps them into its retrieval space.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cirlab.features.cache import FeatureCache
from cirlab.features.images import FileImages, ImageEncoder, default_workers, image_features
from cirlab.types import ImageFeatures

Progress = Callable[[int, int], None]


@dataclass
class EncodedGallery:
    """Gallery embeddings of the files that could be encoded.

    Attributes:
        positions: indices into the requested files, ascending, of the rows of ``embeddings``.
        embeddings: (M, d) float32, L2-normalised, in the method's retrieval space.
        failed: request position -> why the file could not be read.
        n_encoded: files that went through the image encoder (the rest came from the feature cache).
    """

    positions: np.ndarray
    embeddings: np.ndarray
    failed: dict[int, str]
    n_encoded: int


@torch.no_grad()
def encode_gallery_files(
    method: Any,
    paths: Sequence[Path],
    digests: Sequence[str],
    cache: FeatureCache,
    *,
    weights_id: str = "",
    batch_size: int = 64,
    workers: int = 0,
    progress: Progress | None = None,
) -> EncodedGallery:
    """Gallery embeddings of image files: raw image features through the cache, then ``method.encode_gallery``.

    Args:
        method: a ``CIRMethod`` in eval mode.
        paths: image files.
        digests: their content digests (``FeatureCache.digests``), the cache keys.
        cache: the shared feature cache.
        weights_id: identity of the method's trained weights (used only when its image encoder is fine-tuned).
        batch_size: images per forward pass.
        workers: decoding threads (0: one per core).
        progress: called as ``progress(done, total)`` over the files that need encoding.

    Returns:
        The embeddings of the files that could be read; unreadable ones are listed in ``failed``.
    """
    device = method.backbone.device
    feats = image_features(
        ImageEncoder.of_method(method, weights_id),
        FileImages(paths, digests, decode_threads=workers or default_workers()),
        cache,
        batch_size=batch_size,
        on_error="skip",
        progress=progress,
    )
    positions = feats.positions
    out = []
    for start in range(0, len(positions), 4096):
        chunk = torch.from_numpy(feats.take("embeds", np.arange(start, min(start + 4096, len(positions)))))
        images = ImageFeatures(chunk.to(device), torch.empty(len(chunk), 0, 0, device=device))
        out.append(F.normalize(method.encode_gallery(images).float(), dim=-1).cpu().numpy())
    embeddings = np.concatenate(out) if out else np.empty((0, int(method.backbone.embed_dim)), np.float32)
    return EncodedGallery(positions, embeddings.astype(np.float32, copy=False), feats.failed, feats.n_encoded)
