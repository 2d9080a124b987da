"""Gallery encoding for the index: the one place where image files become gallery embeddings.

Images go through the shared feature cache (``cirlab.features``), keyed by their content digest, so a file is
encoded once per (image encoder, preprocessing) whichever index, evaluation or training run asks for it. Files are
decoded and preprocessed by a pool of threads running ahead of the model (PIL and numpy release the GIL while
decoding, resizing and normalising), so the model is not left waiting for data. The cache then hands the raw image
embeddings to the method's ``encode_gallery``, which maps them into its retrieval space.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cirlab.data.images import load_image
from cirlab.features.backbone import backbone_cache_key
from cirlab.features.cache import FeatureCache, encoder_key
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


def default_workers() -> int:
    """Decoding threads: one per CPU core the process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def image_cache_key(method: Any, weights_id: str) -> str:
    """Feature-cache namespace of the raw image embeddings a method's gallery is built from.

    A frozen image encoder shares the backbone's namespace with evaluation and training; a fine-tuned one gets
    its own, named by the method and its trained weights (``weights_id``).
    """
    backbone = method.backbone
    if method.image_encoder_frozen:
        return backbone_cache_key(backbone, "embeds")
    return encoder_key(f"{method.name}:{backbone.name}", weights_id, f"{backbone.image_transform.identity()}/embeds")


class _Prefetcher:
    """Decodes and preprocesses files on a thread pool, running ``lookahead`` items ahead of the last request.

    The cache asks for batches of positions in ascending order; positions skipped because their features are
    cached cost at most one wasted decode each.
    """

    def __init__(self, load: Callable[[int], np.ndarray], n: int, workers: int, lookahead: int) -> None:
        self._load = load
        self._n = n
        self._lookahead = lookahead
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cirlab-decode")
        self._futures: dict[int, Future] = {}
        self._scheduled = 0  # every position below this has been submitted once

    def _submit(self, pos: int) -> None:
        if pos not in self._futures:
            self._futures[pos] = self._pool.submit(self._load, pos)

    def get(self, positions: Sequence[int]) -> list[np.ndarray]:
        """Preprocessed arrays of ``positions``; raises the first failing file's error (the cache retries singly)."""
        first, last = min(positions), max(positions)
        for pos in [p for p in self._futures if p < first and p not in positions]:
            self._futures.pop(pos).cancel()  # skipped (cached) positions: drop their decodes
        for pos in positions:
            self._submit(pos)
        for pos in range(max(self._scheduled, last + 1), min(self._n, last + 1 + self._lookahead)):
            self._submit(pos)
        self._scheduled = max(self._scheduled, last + 1 + self._lookahead)
        out = []
        for pos in positions:
            try:
                out.append(self._futures.pop(pos).result())
            except BaseException:
                for p in positions:
                    self._futures.pop(p, None)
                raise
        return out

    def close(self) -> None:
        for future in self._futures.values():
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _load_preprocessed(path: Path, transform: Any) -> np.ndarray:
    """One file as the model's input array (3, S, S); ``load_image`` turns every decoding problem (decompression
    bombs included) into an ``ImageReadError`` naming the file."""
    return transform.to_array(load_image(path))


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
        digests: their content digests (``cirlab.features.hash_files``), the cache keys.
        cache: the shared feature cache.
        weights_id: identity of the method's trained weights (used only when its image encoder is fine-tuned).
        batch_size: images per forward pass.
        workers: decoding threads (0: one per core).
        progress: called as ``progress(done, total)`` over the files that need encoding.

    Returns:
        The embeddings of the files that could be read; unreadable ones are listed in ``failed``.
    """
    transform = method.backbone.image_transform
    device = method.backbone.device
    prefetch = _Prefetcher(
        lambda pos: _load_preprocessed(paths[pos], transform), len(paths), workers or default_workers(), 2 * batch_size
    )

    def encode(positions: list[int]) -> dict[str, torch.Tensor]:
        pixels = torch.from_numpy(np.stack(prefetch.get(positions)))  # (B, 3, S, S)
        return {"embeds": method.encode_images(pixels.to(device)).embeds.float()}

    try:
        feats = cache.get_or_compute_keys(
            list(digests),
            image_cache_key(method, weights_id),
            encode,
            batch_size=batch_size,
            storage_dtype="float32",
            on_error="skip",
            progress=progress,
        )
    finally:
        prefetch.close()
    positions = np.asarray(feats.positions, dtype=np.int64)
    raw = feats.embeds if len(positions) else np.empty((0, 0), np.float32)  # (M, d_image)
    out = []
    for start in range(0, len(positions), 4096):
        chunk = torch.from_numpy(np.array(raw[start : start + 4096], dtype=np.float32))
        images = ImageFeatures(chunk.to(device), torch.empty(len(chunk), 0, 0, device=device))
        out.append(F.normalize(method.encode_gallery(images).float(), dim=-1).cpu().numpy())
    embeddings = np.concatenate(out) if out else np.empty((0, int(method.backbone.embed_dim)), np.float32)
    failed = {}
    for pos, digest in enumerate(digests):
        if digest in feats.failed:
            failed[pos] = feats.failed[digest]
    return EncodedGallery(positions, embeddings.astype(np.float32, copy=False), failed, feats.n_encoded)
