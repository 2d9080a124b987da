"""Image features: encoded once per (image encoder, preprocessing, image content), kept in the feature cache and
looked up by content (STYLE.md rule 10).

Every path that turns images into features calls :func:`image_features`: the evaluator and the training sources
(:func:`split_features`), the training sources' corpus, triplet and pseudo-target images, the corpus encoder
(``cirlab.features.corpus``), the (image, caption) pair tables (:func:`cached_pair_table`) and the gallery index
(``cirlab.index.encode``). What differs between them is named here once:

* the encoder (:class:`ImageEncoder`): what turns pixels into ``ImageFeatures`` and the feature-cache namespace of
  each part it stores (``embeds`` in float32, patch ``tokens`` in float16, each in its own namespace so that methods
  that need only embeddings never pay for tokens). A frozen backbone's namespaces are shared by everything built on
  it; a fine-tuned image encoder gets namespaces named by its weights, or none (encoded afresh at every call);
* the images (:class:`ImageSet`): their content keys (file digests through the cache's stat memo, hashes of
  in-memory pixels, or keys an index pass computed) and how a batch of them becomes preprocessed pixels.

A pair-encoding backbone's (image, text) embeddings have a namespace of their own, keyed by the image's and the
text's content.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cirlab.data.benchmark import CIRSplit
from cirlab.data.images import load_image
from cirlab.distributed import World
from cirlab.features.cache import CachedFeatures, FeatureCache, OnError, Progress, encoder_key
from cirlab.features.hashing import hash_array, hash_bytes
from cirlab.features.table import FeatureTable, PairTable
from cirlab.progress import progress_bar
from cirlab.types import ImageFeatures, PairEncoder

STORAGE_DTYPES = {"embeds": "float32", "tokens": "float16"}
"""How each part is stored: global embeddings exactly, patch tokens (large, read by few methods) at half size."""


def backbone_cache_key(backbone: Any, part: str) -> str:
    """Cache namespace of ``part`` ("embeds", "tokens" or "pairs") of a backbone's image encoder and preprocessing."""
    return encoder_key(backbone.identity(), part, backbone.image_transform.identity())


@dataclass(frozen=True)
class ImageEncoder:
    """What turns preprocessed pixels into image features, and where they are cached.

    Attributes:
        backbone: the backbone whose preprocessing (``image_transform``) and ``device`` the encoder uses.
        encode: pixels (B, 3, S, S) on the backbone's device -> ``ImageFeatures``.
        namespace: part -> feature-cache encoder key; None: features are not cached (a trainable image encoder
            whose weights have no identity).
    """

    backbone: Any
    encode: Callable[[torch.Tensor], ImageFeatures]
    namespace: Callable[[str], str] | None

    @classmethod
    def of_backbone(cls, backbone: Any) -> ImageEncoder:
        """A frozen backbone's image encoder, in the namespaces every method, evaluation and index share."""
        return cls(backbone, backbone.encode_image, lambda part: backbone_cache_key(backbone, part))

    @classmethod
    def of_method(cls, method: Any, weights_id: str | None = None) -> ImageEncoder:
        """A method's image encoder (``method.encode_images``).

        While the method's image encoder is frozen it shares the backbone's namespaces. A fine-tuned one gets its
        own, named by the method and its trained weights (``weights_id``), or, without ``weights_id``, none.
        """
        backbone = method.backbone
        if method.image_encoder_frozen:
            return cls(backbone, method.encode_images, lambda part: backbone_cache_key(backbone, part))
        if weights_id is None:
            return cls(backbone, method.encode_images, None)

        def namespace(part: str) -> str:
            transform = backbone.image_transform.identity()
            return encoder_key(f"{method.name}:{backbone.name}", weights_id, f"{transform}/{part}")

        return cls(backbone, method.encode_images, namespace)

    @classmethod
    def of(cls, model: Any) -> ImageEncoder:
        """:meth:`of_method` for a ``CIRMethod`` (anything with ``image_encoder_frozen``), else :meth:`of_backbone`."""
        return cls.of_method(model) if hasattr(model, "image_encoder_frozen") else cls.of_backbone(model)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor, parts: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored form of ``parts`` of a batch: embeds (B, d) float32, tokens (B, 1 + n, w) float16."""
        feats = self.encode(pixels.to(self.backbone.device))
        out = {}
        for part in parts:
            value = feats.embeds.float() if part == "embeds" else feats.tokens.half()
            out[part] = value.cpu().numpy()
        return out


class ImageSet(ABC):
    """Which images: their content keys, and how a batch of them becomes the model's input."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def content_keys(self, cache: FeatureCache) -> list[str | OSError]:
        """One content key per image, or the ``OSError`` (naming the file) that kept it from being read."""

    @abstractmethod
    def pixels(self, positions: Sequence[int], transform: Any) -> torch.Tensor:
        """The images at ``positions`` preprocessed by ``transform``, (B, 3, S, S); raises for an unreadable one."""

    def close(self) -> None:  # noqa: B027 (most image sets hold nothing)
        """Lets go of anything held while encoding (decoding threads)."""


DECODED_CROPS_MAX_BYTES = 1 << 30
"""The most memory one :class:`DecodedCrops` keeps (1 GiB: every image of the Shapes world's train split, about a
twelfth of CIRR's at 224 pixels)."""


class DecodedCrops:
    """Image files' preprocessed crops, kept as uint8 pixels after their first decoding (up to ``max_bytes``; later
    files are decoded at every read), for images that a fine-tuned encoder reads again and again.

    The pixels are exactly what ``transform`` makes of the files (:meth:`ImageTransform.to_uint8`, then
    :meth:`ImageTransform.from_uint8`).
    """

    def __init__(self, paths: Sequence[str | Path], transform: Any, max_bytes: int = DECODED_CROPS_MAX_BYTES):
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self._capacity = max_bytes // (transform.size * transform.size * 3)
        self._crops: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def _crop(self, position: int) -> np.ndarray:
        crop = self._crops.get(position)
        if crop is None:
            crop = self.transform.to_uint8(load_image(self.paths[position]))
            if len(self._crops) < self._capacity:
                self._crops[position] = crop
        return crop

    def pixels(self, positions: Sequence[int]) -> torch.Tensor:
        """The images at ``positions``, preprocessed (B, 3, S, S) float32."""
        return self.transform.from_uint8(np.stack([self._crop(i) for i in positions]))


class FileImages(ImageSet):
    """Image files, identified by their bytes (digests through the cache's stat memo, or given).

    Args:
        paths: image files.
        digests: their content digests when the caller has them already (``FeatureCache.digests``).
        decode_threads: threads decoding and preprocessing files ahead of the model (PIL and numpy release the GIL);
            0 decodes each batch when it is asked for.
        crops: the same files' decoded crops, kept across calls (read when the transform is theirs).
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        digests: Sequence[str] | None = None,
        decode_threads: int = 0,
        crops: DecodedCrops | None = None,
    ):
        self.paths = [Path(p) for p in paths]
        self.digests = list(digests) if digests is not None else None
        self.decode_threads = decode_threads
        self.crops = crops
        if crops is not None and crops.paths != self.paths:
            raise ValueError("the decoded crops are of other files")
        self._prefetch: _Prefetcher | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def content_keys(self, cache: FeatureCache) -> list[str | OSError]:
        return list(self.digests) if self.digests is not None else cache.digests(self.paths)

    def pixels(self, positions: Sequence[int], transform: Any) -> torch.Tensor:
        if self.crops is not None and self.crops.transform == transform:
            return self.crops.pixels(positions)
        if self.decode_threads < 1:
            return transform([load_image(self.paths[i]) for i in positions])
        if self._prefetch is None:
            self._prefetch = _Prefetcher(
                lambda pos: transform.to_array(load_image(self.paths[pos])), len(self.paths), self.decode_threads
            )
        return torch.from_numpy(np.stack(self._prefetch.get(list(positions))))  # (B, 3, S, S)

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None


class ArrayImages(ImageSet):
    """In-memory uint8 images (N, H, W, 3) (a Shapes corpus held in one array), keyed by the hash of each image."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def content_keys(self, cache: FeatureCache) -> list[str | OSError]:
        return [hash_array(np.asarray(im)) for im in self.images]

    def pixels(self, positions: Sequence[int], transform: Any) -> torch.Tensor:
        return transform.from_uint8(np.asarray(self.images[np.asarray(positions)]))


class KeyedImages(ImageSet):
    """Images whose content keys are known (a corpus index pass computed them) and that are decoded by ``decode``.

    Args:
        keys: one content key per image.
        decode: positions -> the images as PIL images, decoded on demand.
    """

    def __init__(self, keys: Sequence[str], decode: Callable[[Sequence[int]], list[Any]]) -> None:
        self.keys = list(keys)
        self.decode = decode

    def __len__(self) -> int:
        return len(self.keys)

    def content_keys(self, cache: FeatureCache) -> list[str | OSError]:
        return list(self.keys)

    def pixels(self, positions: Sequence[int], transform: Any) -> torch.Tensor:
        return transform(self.decode(positions))


@dataclass
class ImageFeatureSet:
    """Features of the requested images that could be read and encoded, in request order.

    Attributes:
        positions: (M,) int64, ascending: the request positions that have features (every part).
        failed: request position -> why that image has none.
        n_encoded: images that went through the image encoder (the rest came from the cache).
    """

    positions: np.ndarray
    failed: dict[int, str]
    n_encoded: int
    _take: dict[str, Callable[[np.ndarray], np.ndarray]] = field(repr=False)

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self._take)

    def take(self, part: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """A new array of ``part`` for ``rows`` (indices into ``positions``): embeds float32, tokens float16."""
        if part not in self._take:
            raise KeyError(f"no image feature part {part!r}; this set holds {', '.join(self._take)}")
        return self._take[part](np.asarray(rows, dtype=np.int64).reshape(-1))

    def tensor(self, part: str = "embeds") -> torch.Tensor:
        """``part`` of every image that has features, as a tensor of its own (the cache's arrays are read-only)."""
        return torch.from_numpy(self.take(part, np.arange(len(self.positions))))

    def table(self, names: Sequence[str]) -> FeatureTable:
        """The features by name (``names`` follows the request; failed images are left out)."""
        kept = [names[i] for i in self.positions.tolist()]
        return FeatureTable(kept, self.tensor("embeds"), self.tensor("tokens") if "tokens" in self._take else None)


def image_features(
    encoder: ImageEncoder,
    images: ImageSet,
    cache: FeatureCache | None = None,
    *,
    tokens: bool = False,
    batch_size: int = 256,
    on_error: OnError = "raise",
    world: World | None = None,
    progress: Progress | None = None,
) -> ImageFeatureSet:
    """Features of ``images`` by ``encoder``: looked up in ``cache`` by content, only missing images encoded.

    Without a cache, or for an encoder without a namespace, every image is encoded now and nothing is stored.

    Args:
        encoder: the image encoder and its cache namespaces.
        images: the images.
        cache: the feature cache (None: encode without caching).
        tokens: also patch tokens (a part of their own in the cache).
        batch_size: images per encoder call.
        on_error: ``"raise"``: an unreadable image raises (an unreadable file before anything is encoded).
            ``"skip"``: such images are left out and listed in ``failed``.
        world: the processes splitting the encoding (every one calls this with the same images; each gets all
            the features); None: this process alone.
        progress: ``progress(done, total)`` over the images being encoded, part after part.

    Returns:
        The features of the images that could be read and encoded, in request order.
    """
    parts = ("embeds", "tokens") if tokens else ("embeds",)
    try:
        if cache is None or encoder.namespace is None:
            return _encode_all(encoder, images, parts, batch_size, on_error, progress)
        return _through_cache(encoder, images, cache, parts, batch_size, on_error, world, progress)
    finally:
        images.close()


def _encode_all(
    encoder: ImageEncoder,
    images: ImageSet,
    parts: Sequence[str],
    batch_size: int,
    on_error: OnError,
    progress: Progress | None,
) -> ImageFeatureSet:
    """Every image encoded now, nothing cached (an image encoder being trained)."""
    chunks: dict[str, list[np.ndarray]] = {part: [] for part in parts}
    kept: list[int] = []
    failed: dict[int, str] = {}
    transform = encoder.backbone.image_transform
    for start in range(0, len(images), batch_size):
        batch = list(range(start, min(start + batch_size, len(images))))
        try:
            out, ok = encoder.features(images.pixels(batch, transform), parts), batch
        except Exception:
            if on_error == "raise":
                raise
            out, ok = _one_by_one(encoder, images, batch, parts, transform, failed)
        for part in parts:
            chunks[part].append(out[part])
        kept += ok
        if progress is not None:
            progress(batch[-1] + 1, len(images))
    arrays = {
        part: np.concatenate(c) if c else np.empty((0, 0), dtype=STORAGE_DTYPES[part]) for part, c in chunks.items()
    }
    take = {part: (lambda rows, a=a: np.array(a[rows])) for part, a in arrays.items()}
    return ImageFeatureSet(np.asarray(kept, dtype=np.int64), failed, len(kept), take)


def _one_by_one(
    encoder: ImageEncoder,
    images: ImageSet,
    batch: list[int],
    parts: Sequence[str],
    transform: Any,
    failed: dict[int, str],
) -> tuple[dict[str, np.ndarray], list[int]]:
    """A failed batch retried an image at a time, so that one bad image does not take the rest with it."""
    outs, ok = [], []
    for pos in batch:
        try:
            outs.append(encoder.features(images.pixels([pos], transform), parts))
            ok.append(pos)
        except Exception as err:
            failed[pos] = f"{type(err).__name__}: {err}"
    if not outs:
        return {part: np.empty((0, 0), dtype=STORAGE_DTYPES[part]) for part in parts}, ok
    return {part: np.concatenate([o[part] for o in outs]) for part in parts}, ok


def _through_cache(
    encoder: ImageEncoder,
    images: ImageSet,
    cache: FeatureCache,
    parts: Sequence[str],
    batch_size: int,
    on_error: OnError,
    world: World | None,
    progress: Progress | None,
) -> ImageFeatureSet:
    keys = images.content_keys(cache)
    failed: dict[int, str] = {}
    readable: list[int] = []
    for i, key in enumerate(keys):
        if isinstance(key, OSError):
            if on_error == "raise":
                raise key
            failed[i] = f"{type(key).__name__}: {key}"
        else:
            readable.append(i)
    request = [keys[i] for i in readable]
    transform = encoder.backbone.image_transform
    found: dict[str, tuple[CachedFeatures, dict[int, int]]] = {}
    n_encoded = 0
    for part in parts:

        def encode(rows: list[int], part: str = part) -> dict[str, np.ndarray]:
            return encoder.features(images.pixels([readable[r] for r in rows], transform), [part])

        feats = cache.get_or_compute_keys(
            request, encoder.namespace(part), encode, batch_size=batch_size,
            storage_dtype=STORAGE_DTYPES[part], on_error=on_error, world=world, progress=progress,
        )  # fmt: skip
        if feats.failed:
            for r, key in enumerate(request):
                if key in feats.failed:
                    failed.setdefault(readable[r], feats.failed[key])
        if part == "embeds":
            n_encoded = feats.n_encoded
        # Request position -> row of ``feats``.
        found[part] = (feats, {readable[int(r)]: row for row, r in enumerate(feats.positions)})
    positions = np.asarray([i for i in readable if all(i in rows for _, rows in found.values())], dtype=np.int64)

    def taker(part: str) -> Callable[[np.ndarray], np.ndarray]:
        feats, rows = found[part]
        which = np.asarray([rows[i] for i in positions.tolist()], dtype=np.int64)
        return lambda sel: feats.take(part, which[sel], dtype=STORAGE_DTYPES[part])

    return ImageFeatureSet(positions, failed, n_encoded, {part: taker(part) for part in parts})


# -- evaluation splits ---------------------------------------------------------------------------------------------
def split_image_names(split: CIRSplit) -> list[str]:
    """Every image a split needs: its gallery, then any reference image that is not in the gallery."""
    names = dict.fromkeys(split.gallery)
    names.update(dict.fromkeys(q.reference for q in split.queries))
    return list(names)


def split_features(
    model: Any,
    split: CIRSplit,
    cache: FeatureCache | None = None,
    *,
    tokens: bool | None = None,
    batch_size: int = 256,
    progress: bool = False,
    crops: DecodedCrops | None = None,
) -> FeatureTable:
    """Image features of every image of a split (:func:`split_image_names`), the one computation of them that the
    evaluator and the training sources share.

    Args:
        model: a ``CIRMethod`` (its image encoder, :meth:`ImageEncoder.of_method`) or a frozen backbone.
        split: the split.
        cache: the feature cache; a method whose image encoder is being fine-tuned encodes afresh without it.
        tokens: also patch tokens (default: what the method reads, ``needs_image_tokens``; none for a backbone).
        batch_size: images per encoder call.
        progress: show a progress bar while encoding.
        crops: the split's images decoded once and kept (:func:`split_crops`), for a fine-tuned encoder that
            encodes the split at every evaluation.
    """
    names = split_image_names(split)
    if tokens is None:
        tokens = bool(getattr(model, "needs_image_tokens", False))
    with progress_callback(progress, "encoding images") as callback:
        feats = image_features(
            ImageEncoder.of(model),
            FileImages([split.image_path(n) for n in names], crops=crops),
            cache,
            tokens=tokens,
            batch_size=batch_size,
            progress=callback,
        )
    return feats.table(names)


def split_crops(split: CIRSplit, transform: Any) -> DecodedCrops:
    """The decoded crops of a split's images, in :func:`split_features`' order."""
    return DecodedCrops([split.image_path(n) for n in split_image_names(split)], transform)


@contextmanager
def progress_callback(enabled: bool, label: str) -> Iterator[Progress | None]:
    """The house progress bar (``cirlab.progress``) shown for the duration of the block, and its
    ``progress(done, total)`` callback (None when not ``enabled``)."""
    if not enabled:
        yield None
        return
    bar = progress_bar()
    task = bar.add_task(label, total=None)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total)


# -- image-caption pairs -------------------------------------------------------------------------------------------
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
    source = ArrayImages(images) if isinstance(images, np.ndarray) else FileImages(images)
    image_keys = source.content_keys(cache)
    unreadable = next((key for key in image_keys if isinstance(key, OSError)), None)
    if unreadable is not None:
        raise unreadable
    image_embeds = image_features(ImageEncoder.of_backbone(backbone), source, cache).tensor()  # (N, d)
    pairs = [(i, j, text) for i, texts in enumerate(captions) for j, text in enumerate(texts)]
    image_rows = torch.tensor([i for i, _, _ in pairs], dtype=torch.long)  # (P,)
    keys = [hash_bytes(f"{image_keys[i]}\n{text}".encode()) for i, _, text in pairs]

    def encode(rows: list[int]) -> dict[str, np.ndarray]:
        chosen = [pairs[r] for r in rows]
        pixels = source.pixels([i for i, _, _ in chosen], backbone.image_transform)
        with torch.no_grad():
            fused = backbone.encode_pair(pixels.to(backbone.device), [t for *_, t in chosen])
        return {"fused": fused.float().cpu().numpy()}

    fused = cache.get_or_compute_keys(
        keys, backbone_cache_key(backbone, "pairs"), encode, batch_size=batch_size, storage_dtype="float32"
    )
    fused_embeds = torch.from_numpy(np.array(fused.array("fused", dtype=np.float32)))  # (P, d), a private copy
    table = PairTable([f"{i}/{j}" for i, j, _ in pairs], image_embeds[image_rows], fused_embeds)
    return table, [[text] for _, _, text in pairs]


# -- decoding ahead of the model -----------------------------------------------------------------------------------
def default_workers() -> int:
    """Decoding threads: one per CPU core the process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class _Prefetcher:
    """Decodes and preprocesses files on a thread pool, running ``2 * len(batch)`` items ahead of the last request.

    The cache asks for batches of positions in ascending order; positions skipped because their features are
    cached cost at most one wasted decode each.
    """

    def __init__(self, load: Callable[[int], np.ndarray], n: int, workers: int) -> None:
        self._load = load
        self._n = n
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cirlab-decode")
        self._futures: dict[int, Future] = {}
        self._scheduled = 0  # every position below this has been submitted once

    def _submit(self, pos: int) -> None:
        if pos not in self._futures:
            self._futures[pos] = self._pool.submit(self._load, pos)

    def get(self, positions: list[int]) -> list[np.ndarray]:
        """Preprocessed arrays of ``positions``; raises the first failing file's error (the cache retries singly)."""
        first, last = min(positions), max(positions)
        lookahead = 2 * len(positions)
        for pos in [p for p in self._futures if p < first and p not in positions]:
            self._futures.pop(pos).cancel()  # skipped (cached) positions: drop their decodes
        for pos in positions:
            self._submit(pos)
        for pos in range(max(self._scheduled, last + 1), min(self._n, last + 1 + lookahead)):
            self._submit(pos)
        self._scheduled = max(self._scheduled, last + 1 + lookahead)
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
