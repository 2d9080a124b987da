"""Where a stage's training data and the validation/test splits come from, for a given dataset.

``ShapesSource`` serves the embedded Shapes world under the honest zero-shot protocol: ``images``/``pairs``/
``captions`` stages read the image-caption corpus, ``synthetic_triplets`` the world's own synthetic generator (its
own template family, never the benchmark's), and only supervised stages read the benchmark's train triplets
(``triplets``, and ``pseudo_triplets``: the train triplets with generated pseudo-targets in place of the real
targets). Checkpoints are selected on validation splits; test splits are only ever evaluated.

A stage's method states what the stage reads in a ``DataRequest`` (``CIRMethod.data_request``: kind, patch tokens,
pair embeddings, pseudo-targets, hard negatives, a trainable image encoder); ``SplitSource.stage_data`` hands it to
the server the source names for that kind (``servers``), so a source never looks inside a method.

Images reach a method as cached backbone features while its image encoder is frozen. A method that fine-tunes its
image encoder gets a ``PixelTable`` instead (files decoded and preprocessed per batch, encoded by the method's own
``encode_images``), and its validation and test features are encoded afresh by it (``features_for``).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cirlab.data.benchmark import CIRSplit
from cirlab.data.circo import load_circo
from cirlab.data.cirr import load_cirr
from cirlab.data.pseudo_targets import PseudoTargetOptions, shapes_pseudo_targets
from cirlab.data.shapes import ShapesWorld, read_triplets
from cirlab.features.cache import FeatureCache
from cirlab.features.images import (
    DECODED_CROPS_MAX_BYTES,
    ArrayImages,
    DecodedCrops,
    FileImages,
    ImageEncoder,
    cached_pair_table,
    image_features,
    split_crops,
    split_features,
    split_image_names,
)
from cirlab.features.table import FeatureTable, PairTable
from cirlab.methods.base import DataRequest
from cirlab.training.data import PixelTable, Triplet
from cirlab.training.run_config import SyntheticOptions

SHAPES_SPLITS = ("cirr/val", "cirr/test1", "circo/val", "circo/test")


@dataclass
class StageData:
    """The inputs of ``make_batch_fn`` for one stage."""

    images: FeatureTable | PairTable | PixelTable | None = None
    captions: list[list[str]] | None = None
    triplets: list[Triplet] | None = None
    info: dict[str, Any] = field(default_factory=dict)


Server = Callable[[DataRequest, SyntheticOptions], StageData]


class SplitSource(ABC):
    """Evaluation splits, their features and the stage data a method requests: the part every training data source
    shares.

    A subclass loads its splits in ``split``, names the data kinds it serves in ``servers`` (each with the function
    that serves a request of that kind) and sets ``cache`` (the feature cache) and ``_features`` (an empty dict) in
    its constructor, and ``_crops`` (an empty dict); split features are then computed once per (split, backbone,
    token need), and a fine-tuned encoder's splits are decoded once.
    """

    cache: FeatureCache
    _features: dict[tuple[str, str, bool], FeatureTable]
    _crops: dict[tuple[str, str], DecodedCrops]

    @abstractmethod
    def split(self, name: str) -> CIRSplit:
        """The evaluation split called ``name`` (each source names its own)."""

    @abstractmethod
    def servers(self) -> dict[str, Server]:
        """Data kind -> the function serving a request of it, for every kind this source offers."""

    def stage_data(self, request: DataRequest, synthetic: SyntheticOptions | None = None) -> StageData:
        """Inputs of one stage as ``request`` (``CIRMethod.data_request``) asks for them: cached features while the
        image encoder is frozen, else pixels encoded by ``request.encode`` at every access.

        Args:
            request: the stage's data request.
            synthetic: which synthetic triplets a ``synthetic_triplets`` stage reads (the run config's
                ``synthetic`` section; default: all of the source's own).

        Raises:
            ValueError: this source does not serve the request's kind (naming the kinds it serves).
        """
        servers = self.servers()
        if request.kind not in servers:
            raise ValueError(f"{type(self).__name__} serves no {request.kind!r} data; it serves {', '.join(servers)}")
        return servers[request.kind](request, synthetic or SyntheticOptions())

    def features(self, name: str, backbone: Any, with_tokens: bool = False) -> FeatureTable:
        """Backbone features of every image of a split (cached on disk and in memory)."""
        key = (name, backbone.identity(), with_tokens)
        if key not in self._features:
            self._features[key] = split_features(backbone, self.split(name), self.cache, tokens=with_tokens)
        return self._features[key]

    def features_for(self, method: Any, name: str) -> FeatureTable:
        """Features of a split as ``method`` sees them: the shared cached features while its image encoder is
        frozen, else fresh encodings by its own (fine-tuned) image encoder, in eval mode."""
        if method.image_encoder_frozen:
            return self.features(name, method.backbone, method.needs_image_tokens)
        # Encoded at every evaluation while the encoder trains: the split's files are decoded once and kept.
        key = (name, method.backbone.image_transform.identity())
        if key not in self._crops:
            self._crops[key] = split_crops(self.split(name), method.backbone.image_transform)
        was_training = method.training
        method.eval()
        try:
            return split_features(method, self.split(name), crops=self._crops[key])
        finally:
            method.train(was_training)


class ShapesSource(SplitSource):
    """Training data and evaluation splits of a built Shapes world, with features from the cache.

    Args:
        world: the built world.
        cache: the feature cache shared by every method.
        captions_per_image: phrasings drawn per corpus image for caption-reading stages.
    """

    def __init__(self, world: ShapesWorld, cache: FeatureCache, captions_per_image: int = 4) -> None:
        self.world = world
        self.cache = cache
        self.captions_per_image = captions_per_image
        self._splits: dict[str, CIRSplit] = {}
        self._features: dict[tuple[str, str, bool], FeatureTable] = {}
        self._crops: dict[tuple[str, str], DecodedCrops] = {}
        self._corpus = None

    # -- evaluation splits -----------------------------------------------------------------------------------------
    def split(self, name: str) -> CIRSplit:
        """One of ``cirr/val``, ``cirr/test1``, ``cirr/train``, ``circo/val``, ``circo/test``."""
        if name not in self._splits:
            family, _, split = name.partition("/")
            if family == "cirr":
                self._splits[name] = load_cirr(self.world.cirr_root, self.world.cirr_image_root, split)
            elif family == "circo":
                images = self.world.circo_root / "COCO2017_unlabeled" / "unlabeled2017"
                self._splits[name] = load_circo(self.world.circo_root, images, split)
            else:
                raise KeyError(f"unknown Shapes split {name!r}; known: {', '.join(SHAPES_SPLITS)}")
        return self._splits[name]

    def subsets(self, name: str) -> dict[str, list[int]]:
        """Query indices of the split's held-out and seen parts (test splits hold the held-out queries)."""
        family, _, split = name.partition("/")
        meta = self.world.cirr_meta(split) if family == "cirr" else self.world.circo_meta(split)
        out: dict[str, list[int]] = {"seen": [], "heldout": [], "heldout_template": [], "heldout_combo": []}
        for i, q in enumerate(self.split(name).queries):
            m = meta[q.qid]
            template, combo = bool(m.get("heldout_template")), bool(m.get("heldout_combo"))
            out["heldout" if template or combo else "seen"].append(i)
            if template:
                out["heldout_template"].append(i)
            if combo:
                out["heldout_combo"].append(i)
        return out

    # -- training data -----------------------------------------------------------------------------------------------
    def corpus(self):
        """The image-caption corpus (memory-mapped images)."""
        if self._corpus is None:
            self._corpus = self.world.corpus()
        return self._corpus

    def corpus_captions(self, seed: int = 0) -> list[list[str]]:
        """A few phrasings per corpus image, drawn reproducibly."""
        corpus = self.corpus()
        rng = random.Random(f"corpus-captions/{seed}")
        return [[corpus.caption(i, rng) for _ in range(self.captions_per_image)] for i in range(len(corpus))]

    def servers(self) -> dict[str, Server]:
        """``images``, ``pairs`` and ``captions`` from the image-caption corpus; ``triplets`` (CIRR-format train
        triplets), ``pseudo_triplets`` (the same with generated pseudo-targets) and ``synthetic_triplets`` (the
        world's own synthetic generator)."""
        return {
            "images": self._images,
            "pairs": self._pairs,
            "captions": self._captions,
            "triplets": self._triplets,
            "pseudo_triplets": self._pseudo,
            "synthetic_triplets": self._synthetic,
        }

    def _corpus_table(self, request: DataRequest) -> FeatureTable | PixelTable:
        """The corpus images: cached features, or (with ``request.encode``) pixels encoded at every access."""
        corpus = self.corpus()
        names = [str(i) for i in range(len(corpus))]
        if request.encode is not None:
            return PixelTable(names, _array_pixels(request.backbone, corpus.images), request.encode)
        encoder = ImageEncoder.of_backbone(request.backbone)
        return image_features(encoder, ArrayImages(corpus.images), self.cache, tokens=request.tokens).table(names)

    def _images(self, request: DataRequest, synthetic: SyntheticOptions) -> StageData:
        return StageData(images=self._corpus_table(request))

    def _pairs(self, request: DataRequest, synthetic: SyntheticOptions) -> StageData:
        """Corpus images with their phrasings or, with ``request.pair_embeddings``, every (image, caption) pair as
        a row with the backbone's joint embedding (``PairTable``; see ``CIRMethod.pair_embeddings``)."""
        if request.pair_embeddings:
            table, captions = cached_pair_table(
                request.backbone, self.corpus().images, self.corpus_captions(), self.cache
            )
            return StageData(images=table, captions=captions, info={"pairs": len(table)})
        return StageData(images=self._corpus_table(request), captions=self.corpus_captions())

    def _captions(self, request: DataRequest, synthetic: SyntheticOptions) -> StageData:
        return StageData(captions=self.corpus_captions())

    def _triplets(self, request: DataRequest, synthetic: SyntheticOptions) -> StageData:
        split = self.split("cirr/train")
        triplets = [Triplet(q.reference, q.text, q.targets[0]) for q in split.queries]
        names = split_image_names(split)
        table = self._image_table(request, names, [split.image_path(n) for n in names])
        return StageData(images=table, triplets=triplets, info={"triplets": len(triplets)})

    def _image_table(self, request: DataRequest, names: list[str], paths: list[Path]) -> FeatureTable | PixelTable:
        """Cached features of image files, or (with ``request.encode``) the files themselves, encoded at every
        access."""
        if request.encode is not None:
            return PixelTable(names, file_pixels(request.backbone, paths), request.encode)
        encoder = ImageEncoder.of_backbone(request.backbone)
        return image_features(encoder, FileImages(paths), self.cache, tokens=request.tokens).table(names)

    def _pseudo(self, request: DataRequest, synthetic: SyntheticOptions) -> StageData:
        """The CIRR-format train triplets with their pseudo-targets (generated once beside the world, then reused;
        default: rendered with the default noise)."""
        records = shapes_pseudo_targets(self.world, request.pseudo_targets or PseudoTargetOptions())
        split = self.split("cirr/train")
        triplets = [Triplet(r["source"]["reference"], r["source"]["text"], r["path"]) for r in records]
        references = list(dict.fromkeys(t.reference for t in triplets))
        names = references + [t.target for t in triplets]
        paths = [split.image_path(n) for n in references] + [Path(t.target) for t in triplets]
        info = {
            "triplets": len(triplets),
            # Reports must say where pseudo-targets came from: in the Shapes world, rendered edits with noise.
            "pseudo_generator": records[0]["generator"] if records else None,
            "pseudo_noisy": sum(r.get("noise") is not None for r in records),
        }
        return StageData(images=self._image_table(request, names, paths), triplets=triplets, info=info)

    def _synthetic(self, request: DataRequest, synthetic: SyntheticOptions) -> StageData:
        records = read_triplets(self.world.synthetic_triplets(synthetic.corrupt_fraction))
        if not 0 < synthetic.fraction <= 1:
            raise ValueError(f"synthetic fraction must be in (0, 1], got {synthetic.fraction}")
        keep = max(1, round(synthetic.fraction * len(records)))
        # A fixed prefix: the records are already in random order, and smaller sets are subsets of larger ones.
        records = records[:keep]
        triplets = [Triplet(r["reference"], r["text"], r["target"]) for r in records]
        names = list(dict.fromkeys(n for t in triplets for n in (t.reference, t.target)))
        table = self._image_table(request, names, [Path(n) for n in names])
        corrupted = int(np.sum([bool(r.get("corrupted")) for r in records]))
        return StageData(images=table, triplets=triplets, info={"triplets": keep, "corrupted": corrupted})


def file_pixels(
    backbone: Any, paths: Sequence[str | Path], max_bytes: int = DECODED_CROPS_MAX_BYTES
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``rows -> pixels (B, 3, S, S)``: the image files at ``rows``, decoded and preprocessed on the backbone device
    (the pixel source of a ``PixelTable`` whose images are files).

    A fine-tuning stage reads each image many times, and decoding it was a sixth of such a step on the Shapes
    world, so each image is decoded once and its crop kept (``DecodedCrops``, up to ``max_bytes``).
    """
    crops = DecodedCrops(paths, backbone.image_transform, max_bytes)
    return lambda rows: crops.pixels(rows.tolist()).to(backbone.device)


def _array_pixels(backbone: Any, images: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
    """``rows -> pixels (B, 3, S, S)``: rows of a uint8 image array (N, H, W, 3), preprocessed for the backbone."""

    def pixels(rows: torch.Tensor) -> torch.Tensor:
        batch = np.asarray(images[rows.numpy()])  # (B, H, W, 3)
        return backbone.image_transform.from_uint8(batch).to(backbone.device)

    return pixels
