"""Where a stage's training data and the validation/test splits come from, for a given dataset.

``ShapesSource`` serves the embedded Shapes world under the honest zero-shot protocol: ``images``/``pairs``/
``captions`` stages read the image-caption corpus, ``synthetic_triplets`` the world's own synthetic generator (its
own template family, never the benchmark's), and only supervised stages read the benchmark's train triplets
(``triplets``, and ``pseudo_triplets``: the train triplets with generated pseudo-targets in place of the real
targets). Checkpoints are selected on validation splits; test splits are only ever evaluated.

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
from cirlab.data.images import load_image
from cirlab.data.pseudo_targets import PseudoTargetOptions, shapes_pseudo_targets
from cirlab.data.shapes import ShapesWorld, read_triplets
from cirlab.features.cache import FeatureCache
from cirlab.features.images import (
    ArrayImages,
    FileImages,
    ImageEncoder,
    cached_pair_table,
    image_features,
    split_features,
)
from cirlab.features.table import FeatureTable, PairTable
from cirlab.training.data import PixelTable, Triplet
from cirlab.types import ImageFeatures

Encoder = Callable[[torch.Tensor], ImageFeatures]

SHAPES_SPLITS = ("cirr/val", "cirr/test1", "circo/val", "circo/test")


@dataclass
class StageData:
    """The inputs of ``make_batch_fn`` for one stage."""

    images: FeatureTable | PairTable | PixelTable | None = None
    captions: list[list[str]] | None = None
    triplets: list[Triplet] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class SyntheticOptions:
    """Attributes: corrupt_fraction: which synthetic file (None: the world's default); fraction: share used."""

    corrupt_fraction: float | None = None
    fraction: float = 1.0


class SplitSource(ABC):
    """Evaluation splits, their features and a method's stage data: the part every training data source shares.

    A subclass loads its splits in ``split``, serves each data kind in ``stage_data`` and sets ``cache`` (the
    feature cache) and ``_features`` (an empty dict) in its constructor; features are then computed once per (split,
    backbone, token need).
    """

    cache: FeatureCache
    _features: dict[tuple[str, str, bool], FeatureTable]

    @abstractmethod
    def split(self, name: str) -> CIRSplit:
        """The evaluation split called ``name`` (each source names its own)."""

    def stage_data_for(self, method: Any, stage: str, synthetic: SyntheticOptions | None = None) -> StageData:
        """Inputs of ``method``'s ``stage`` (call after ``method.prepare_stage(stage)``): cached features while its
        image encoder is frozen, else pixels encoded by its own ``encode_images`` at every access."""
        kind = method.stage(stage).data
        encode = None if method.image_encoder_frozen else method.encode_images
        pseudo = getattr(method.config, "pseudo_targets", None)
        return self.stage_data(
            kind,
            method.backbone,
            method.needs_image_tokens,
            synthetic,
            encode=encode,
            pseudo=pseudo,
            pair_embeddings=method.pair_embeddings(stage),
        )

    @abstractmethod
    def stage_data(
        self,
        kind: str,
        backbone: Any,
        with_tokens: bool = False,
        synthetic: SyntheticOptions | None = None,
        encode: Encoder | None = None,
        pseudo: PseudoTargetOptions | None = None,
        pair_embeddings: bool = False,
    ) -> StageData:
        """Inputs of one stage of a data kind (see ``ShapesSource.stage_data`` for the arguments)."""

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
        was_training = method.training
        method.eval()
        try:
            return split_features(method, self.split(name))
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

    def stage_data(
        self,
        kind: str,
        backbone: Any,
        with_tokens: bool = False,
        synthetic: SyntheticOptions | None = None,
        encode: Encoder | None = None,
        pseudo: PseudoTargetOptions | None = None,
        pair_embeddings: bool = False,
    ) -> StageData:
        """Inputs of one stage of kind ``images``, ``pairs``, ``captions``, ``triplets``, ``synthetic_triplets`` or
        ``pseudo_triplets``.

        Args:
            kind: the stage's data kind.
            backbone: whose cached features (or, with ``encode``, whose preprocessing) serve the images.
            with_tokens: include patch tokens in cached features.
            synthetic: which synthetic triplets ``synthetic_triplets`` reads.
            encode: a trainable image encoder: images become a ``PixelTable`` it encodes at every access.
            pseudo: where ``pseudo_triplets`` gets its pseudo-targets (default: rendered with the default noise).
            pair_embeddings: ``pairs`` rows are the (image, caption) pairs, with the backbone's joint embedding of
                each (``PairTable``; see ``CIRMethod.pair_embeddings``).
        """
        if kind == "pairs" and pair_embeddings:
            if encode is not None:
                raise ValueError("pair embeddings come from a frozen backbone; this stage trains the image encoder")
            table, captions = cached_pair_table(backbone, self.corpus().images, self.corpus_captions(), self.cache)
            return StageData(images=table, captions=captions, info={"pairs": len(table)})
        if kind in ("images", "pairs"):
            corpus = self.corpus()
            names = [str(i) for i in range(len(corpus))]
            if encode is None:
                feats = image_features(
                    ImageEncoder.of_backbone(backbone), ArrayImages(corpus.images), self.cache, tokens=with_tokens
                )
                table = feats.table(names)
            else:
                table = PixelTable(names, _array_pixels(backbone, corpus.images), encode)
            return StageData(images=table, captions=self.corpus_captions() if kind == "pairs" else None)
        if kind == "captions":
            return StageData(captions=self.corpus_captions())
        if kind == "triplets":
            split = self.split("cirr/train")
            triplets = [Triplet(q.reference, q.text, q.targets[0]) for q in split.queries]
            names = list(dict.fromkeys([*split.gallery, *(q.reference for q in split.queries)]))
            table = self._image_table(backbone, names, [split.image_path(n) for n in names], with_tokens, encode)
            return StageData(images=table, triplets=triplets, info={"triplets": len(triplets)})
        if kind == "pseudo_triplets":
            return self._pseudo(backbone, with_tokens, encode, pseudo or PseudoTargetOptions())
        if kind == "synthetic_triplets":
            return self._synthetic(backbone, with_tokens, synthetic or SyntheticOptions(), encode)
        raise ValueError(f"unknown data kind {kind!r}")

    def _image_table(
        self, backbone: Any, names: list[str], paths: list[Path], with_tokens: bool, encode: Encoder | None
    ) -> FeatureTable | PixelTable:
        """Cached features of image files, or (with ``encode``) the files themselves, encoded at every access."""
        if encode is None:
            encoder = ImageEncoder.of_backbone(backbone)
            return image_features(encoder, FileImages(paths), self.cache, tokens=with_tokens).table(names)
        return PixelTable(names, file_pixels(backbone, paths), encode)

    def _pseudo(
        self, backbone: Any, with_tokens: bool, encode: Encoder | None, options: PseudoTargetOptions
    ) -> StageData:
        """The CIRR-format train triplets with their pseudo-targets (generated once beside the world, then reused)."""
        records = shapes_pseudo_targets(self.world, options)
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
        return StageData(
            images=self._image_table(backbone, names, paths, with_tokens, encode), triplets=triplets, info=info
        )

    def _synthetic(
        self, backbone: Any, with_tokens: bool, options: SyntheticOptions, encode: Encoder | None = None
    ) -> StageData:
        records = read_triplets(self.world.synthetic_triplets(options.corrupt_fraction))
        if not 0 < options.fraction <= 1:
            raise ValueError(f"synthetic fraction must be in (0, 1], got {options.fraction}")
        keep = max(1, round(options.fraction * len(records)))
        # A fixed prefix: the records are already in random order, and smaller sets are subsets of larger ones.
        records = records[:keep]
        triplets = [Triplet(r["reference"], r["text"], r["target"]) for r in records]
        names = list(dict.fromkeys(n for t in triplets for n in (t.reference, t.target)))
        table = self._image_table(backbone, names, [Path(n) for n in names], with_tokens, encode)
        corrupted = int(np.sum([bool(r.get("corrupted")) for r in records]))
        return StageData(images=table, triplets=triplets, info={"triplets": keep, "corrupted": corrupted})


def file_pixels(backbone: Any, paths: Sequence[str | Path]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``rows -> pixels (B, 3, S, S)``: the image files at ``rows``, decoded and preprocessed on the backbone device
    (the pixel source of a ``PixelTable`` whose images are files)."""

    def pixels(rows: torch.Tensor) -> torch.Tensor:
        return backbone.preprocess([load_image(paths[i]) for i in rows.tolist()])

    return pixels


def _array_pixels(backbone: Any, images: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
    """``rows -> pixels (B, 3, S, S)``: rows of a uint8 image array (N, H, W, 3), preprocessed for the backbone."""

    def pixels(rows: torch.Tensor) -> torch.Tensor:
        batch = np.asarray(images[rows.numpy()])  # (B, H, W, 3)
        return backbone.image_transform.from_uint8(batch).to(backbone.device)

    return pixels
