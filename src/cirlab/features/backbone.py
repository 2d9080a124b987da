"""Backbone image features through the feature cache: the one place that names a backbone's cache namespace.

Global embeddings are stored in float32; patch tokens (needed only by a few methods) in a separate float16
namespace, so methods that need only embeddings never pay for tokens. A pair-encoding backbone's (image, text)
embeddings have a namespace of their own, keyed by the image's and the text's content.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cirlab.data.images import load_image
from cirlab.distributed import World
from cirlab.features.cache import FeatureCache, encoder_key
from cirlab.features.distributed import sharded_get_or_compute
from cirlab.features.hashing import hash_array, hash_bytes, hash_files
from cirlab.features.table import FeatureTable, PairTable
from cirlab.progress import progress_bar
from cirlab.types import PairEncoder


def backbone_cache_key(backbone: Any, part: str) -> str:
    """Cache namespace of ``part`` ("embeds" or "tokens") of a backbone's image encoder and preprocessing."""
    return encoder_key(backbone.identity(), part, backbone.image_transform.identity())


def _encode(backbone: Any, pixels: torch.Tensor, part: str) -> dict[str, np.ndarray]:
    with torch.no_grad():
        feats = backbone.encode_image(pixels.to(backbone.device))
    if part == "embeds":
        return {part: feats.embeds.float().cpu().numpy()}
    return {part: feats.tokens.half().cpu().numpy()}


def _encode_files(backbone: Any, batch: list[Path], part: str) -> dict[str, np.ndarray]:
    return _encode(backbone, backbone.preprocess([load_image(p) for p in batch]), part)


def _to_tensor(feats: Any, part: str) -> torch.Tensor:
    # A private in-memory copy: the cache's arrays are read-only memory maps.
    return torch.from_numpy(np.array(feats.array(part, dtype=np.float32 if part == "embeds" else np.float16)))


def _progress_bar(enabled: bool, label: str):
    if not enabled:
        return None, None
    bar = progress_bar()
    task = bar.add_task(label, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


def cached_image_features(
    backbone: Any,
    names: Sequence[str],
    paths: Sequence[Path],
    cache: FeatureCache,
    batch_size: int = 256,
    with_tokens: bool = False,
    progress: bool = False,
    world: World | None = None,
) -> FeatureTable:
    """Features of image files, encoded only where the cache lacks them (files identified by their bytes).

    With ``world`` (every process of a ``torchrun`` job calls this with the same files), the processes split the
    encoding and commit it chunk by chunk (``cirlab.features.distributed``); each then returns all the features.
    """
    parts = ["embeds", "tokens"] if with_tokens else ["embeds"]
    arrays = {}
    for part in parts:
        bar, callback = _progress_bar(progress, f"encoding images ({part})")
        try:
            if bar is not None:
                bar.start()
            encode_fn = functools.partial(_encode_files, backbone, part=part)
            options = {"batch_size": batch_size, "storage_dtype": "float32" if part == "embeds" else "float16"}
            key = backbone_cache_key(backbone, part)
            if world is None:
                feats = cache.get_or_compute(list(paths), key, encode_fn, progress=callback, **options)
            else:
                feats = sharded_get_or_compute(cache, paths, key, encode_fn, world=world, progress=callback, **options)
        finally:
            if bar is not None:
                bar.stop()
        arrays[part] = _to_tensor(feats, part)
    return FeatureTable(list(names), arrays["embeds"], arrays.get("tokens"))


def cached_array_features(
    backbone: Any,
    images: np.ndarray,
    cache: FeatureCache,
    names: Sequence[str] | None = None,
    batch_size: int = 256,
    with_tokens: bool = False,
) -> FeatureTable:
    """Features of in-memory uint8 images (N, H, W, 3), cached by the hash of each image's pixels."""
    keys = [hash_array(np.asarray(im)) for im in images]
    names = list(names) if names is not None else [str(i) for i in range(len(images))]
    arrays = {}
    for part in ["embeds", "tokens"] if with_tokens else ["embeds"]:
        feats = cache.get_or_compute_keys(
            keys,
            backbone_cache_key(backbone, part),
            lambda rows, part=part: _encode(
                backbone, backbone.image_transform.from_uint8(np.asarray(images[np.asarray(rows)])), part
            ),
            batch_size=batch_size,
            storage_dtype="float32" if part == "embeds" else "float16",
        )
        arrays[part] = _to_tensor(feats, part)
    return FeatureTable(names, arrays["embeds"], arrays.get("tokens"))


def cached_pair_table(
    backbone: Any,
    images: np.ndarray | Sequence[Path],
    captions: Sequence[Sequence[str]],
    cache: FeatureCache,
    batch_size: int = 64,
) -> tuple[PairTable, list[list[str]]]:
    """Every (image, caption) pair with its image features and its joint embedding ``z(I, T)`` from the backbone's
    ``encode_pair``, both through the cache (pairs keyed by the image's content and the caption's text).

    Args:
        backbone: a ``PairEncoder`` backbone.
        images: in-memory uint8 images (N, H, W, 3), or N image files.
        captions: per image, its captions; each becomes one row.
        cache: the feature cache.
        batch_size: pairs per ``encode_pair`` call.

    Returns:
        The table (row ``"i/j"``: image ``i``, its ``j``-th caption) and, per row, its caption as a one-item list
        (the ``captions`` of a ``pairs`` stage over these rows).
    """
    if not isinstance(backbone, PairEncoder):
        raise TypeError(f"the backbone {backbone.name} does not embed (image, text) pairs (no encode_pair)")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but captions for {len(captions)}")
    if isinstance(images, np.ndarray):
        image_keys = [hash_array(np.asarray(im)) for im in images]
        image_embeds = cached_array_features(backbone, images, cache).embeds  # (N, d)

        def pixels(rows: list[int]) -> torch.Tensor:
            return backbone.image_transform.from_uint8(np.asarray(images[np.asarray(rows)]))

    else:
        paths = [Path(p) for p in images]
        image_keys = hash_files(paths)
        unreadable = next((key for key in image_keys if isinstance(key, OSError)), None)
        if unreadable is not None:
            raise unreadable
        image_embeds = cached_image_features(backbone, [str(i) for i in range(len(paths))], paths, cache).embeds

        def pixels(rows: list[int]) -> torch.Tensor:
            return backbone.preprocess([load_image(paths[i]) for i in rows])

    pairs = [(i, j, text) for i, texts in enumerate(captions) for j, text in enumerate(texts)]
    image_rows = torch.tensor([i for i, _, _ in pairs], dtype=torch.long)  # (P,)
    keys = [hash_bytes(f"{image_keys[i]}\n{text}".encode()) for i, _, text in pairs]

    def encode(rows: list[int]) -> dict[str, np.ndarray]:
        chosen = [pairs[r] for r in rows]
        with torch.no_grad():
            fused = backbone.encode_pair(pixels([i for i, _, _ in chosen]).to(backbone.device), [t for *_, t in chosen])
        return {"fused": fused.float().cpu().numpy()}

    fused = cache.get_or_compute_keys(
        keys, backbone_cache_key(backbone, "pairs"), encode, batch_size=batch_size, storage_dtype="float32"
    )
    fused_embeds = torch.from_numpy(np.array(fused.array("fused", dtype=np.float32)))  # (P, d), a private copy
    table = PairTable([f"{i}/{j}" for i, j, _ in pairs], image_embeds[image_rows], fused_embeds)
    return table, [[text] for _, _, text in pairs]
