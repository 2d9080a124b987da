"""Training data from real corpora: ``CorpusSource`` serves every stage data kind from the corpora a run config's
``data`` section names, with the same interface as ``ShapesSource`` so that ``fit`` and the one training loop run
unchanged.

| stage data kind | read from |
|---|---|
| ``images`` | ``data.images``: an image folder or webdataset shards (Pic2Word on CC3M, SEARLE on ImageNet) |
| ``pairs`` | the same corpus, images that have captions (Map-to-Compose stage 1, Fusion-Diff prior) |
| ``captions`` | ``data.captions`` (text/JSONL/CSV/parquet), else the image corpus's captions (LinCIR) |
| ``synthetic_triplets`` | ``data.triplets``: triplet JSONL, images as files or as names in the image corpus |
| ``triplets`` | the benchmark's train split (``data.benchmark`` = cirr or fashioniq), else ``data.triplets`` |
| ``pseudo_triplets`` | the train split with ``method.pseudo_targets.manifest``, else the JSONL's ``pseudo_target`` |

Images reach a frozen image encoder as cached features (``cirlab.features.corpus``: corpus passes split across
processes and DataLoader workers, only missing images encoded); a method that fine-tunes its image encoder gets a
``PixelTable`` that reads and decodes the images it needs per batch. Unreadable images and malformed records are
skipped and counted; the counts go into the stage's report.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from cirlab.data.benchmark import CIRSplit, load_splits
from cirlab.data.corpora import CaptionCorpus, ImageCorpus, TripletCorpus, open_image_corpus
from cirlab.data.fashioniq import training_captions
from cirlab.data.pseudo_targets import PseudoTargetOptions, records_for, split_requests
from cirlab.features.cache import FeatureCache
from cirlab.features.corpus import CorpusFeatures, IndexEntry, encode_corpus, entry_pixels, gather_index
from cirlab.features.images import DecodedCrops, FileImages, ImageEncoder, cached_pair_table, image_features
from cirlab.features.table import FeatureTable
from cirlab.methods.base import DataRequest
from cirlab.training.data import PixelTable, Triplet
from cirlab.training.run_config import TRAINING_BENCHMARKS, DataOptions, SyntheticOptions
from cirlab.training.sources import Server, SplitSource, StageData, file_pixels

logger = logging.getLogger(__name__)


def _subset(table: FeatureTable, keep: list[int]) -> FeatureTable:
    rows = torch.tensor(keep, dtype=torch.long)
    tokens = table.tokens[rows] if table.tokens is not None else None
    return FeatureTable([table.names[i] for i in keep], table.embeds[rows], tokens)


class CorpusSource(SplitSource):
    """Training data and validation splits from the corpora of ``options`` (see the module docstring).

    Args:
        options: the run config's ``data`` section.
        cache: the feature cache (shared by every process of a distributed run).
        rank / world_size: this process's share of corpus passes (default: torch.distributed's, else one process).
    """

    def __init__(
        self, options: DataOptions, cache: FeatureCache, rank: int | None = None, world_size: int | None = None
    ) -> None:
        if options.benchmark and options.benchmark not in TRAINING_BENCHMARKS:
            raise ValueError(
                f"data.benchmark must be one of {', '.join(TRAINING_BENCHMARKS)}, got {options.benchmark!r}"
            )
        self.options = options
        self.cache = cache
        self.rank, self.world_size = rank, world_size
        self._image_corpus: ImageCorpus | None = None
        self._encoded: dict[tuple[str, bool], CorpusFeatures] = {}
        self._splits: dict[str, CIRSplit] = {}
        self._features: dict[tuple[str, str, bool], FeatureTable] = {}
        self._crops: dict[tuple[str, str], DecodedCrops] = {}

    def describe(self) -> str:
        o = self.options
        parts = [
            f"images: {o.images}" if o.images else "",
            f"captions: {o.captions}" if o.captions else "",
            f"triplets: {o.triplets}" if o.triplets else "",
            f"benchmark: {o.benchmark} ({o.annotations})" if o.benchmark else "",
            f"validation: {o.val or 'none (last step kept)'}",
        ]
        return "; ".join(p for p in parts if p)

    # -- evaluation splits -----------------------------------------------------------------------------------------
    def split(self, name: str) -> CIRSplit:
        """``<benchmark>/<split>`` or ``fashioniq/<split>/<category>`` from ``data.annotations``."""
        if name not in self._splits:
            family, _, rest = name.partition("/")
            split, _, category = rest.partition("/")
            if family not in TRAINING_BENCHMARKS or not split:
                raise KeyError(f"unknown split {name!r}; use cirr/<split> or fashioniq/<split>/<category>")
            if not self.options.annotations:
                raise ValueError(f"split {name!r} needs data.annotations (the {family} annotation root)")
            if family == "fashioniq" and not category:
                raise ValueError(
                    f"{name!r}: a FashionIQ split names its category, e.g. fashioniq/{split}/dress (as data.val, "
                    f"fashioniq/{split} validates on all three categories)"
                )
            options = {"category": category} if family == "fashioniq" else {}
            images = self.options.benchmark_images or None
            (self._splits[name],) = load_splits(family, self.options.annotations, images, split, **options)
        return self._splits[name]

    # -- training data -----------------------------------------------------------------------------------------------
    def servers(self) -> dict[str, Server]:
        """Every data kind, from the corpora of ``data`` (see the module docstring)."""
        return {
            "images": self._images,
            "pairs": self._pairs,
            "captions": self._captions,
            "triplets": self._triplets,
            "synthetic_triplets": self._synthetic,
            "pseudo_triplets": self._pseudo,
        }

    def _triplets(self, request: DataRequest, synthetic: SyntheticOptions) -> StageData:
        if self.options.benchmark:
            return self._benchmark_triplets(request, None)
        return self._jsonl_triplets(request, SyntheticOptions(), pseudo=False)

    def _synthetic(self, request: DataRequest, synthetic: SyntheticOptions) -> StageData:
        return self._jsonl_triplets(request, synthetic, pseudo=False)

    def _pseudo(self, request: DataRequest, synthetic: SyntheticOptions) -> StageData:
        options = request.pseudo_targets or PseudoTargetOptions()
        if self.options.benchmark and options.manifest:
            return self._benchmark_triplets(request, Path(options.manifest))
        if self.options.triplets:
            return self._jsonl_triplets(request, SyntheticOptions(), pseudo=True)
        raise ValueError(
            "a pseudo_triplets stage needs pseudo-targets: set method.pseudo_targets.manifest to a folder written "
            "by `cirlab generate-pseudo-targets` (with data.benchmark), or data.triplets to a JSONL whose records "
            "have a pseudo_target"
        )

    # -- image corpora -------------------------------------------------------------------------------------------------
    def image_corpus(self) -> ImageCorpus:
        if not self.options.images:
            raise ValueError("this stage reads images: set data.images to an image folder or webdataset shards")
        if self._image_corpus is None:
            self._image_corpus = open_image_corpus(self.options.images, self.options.manifest, self.options.limit)
            logger.info("image corpus: %s", self._image_corpus.describe())
        return self._image_corpus

    def _index(self) -> tuple[list[IndexEntry], dict[str, int]]:
        """The whole image corpus's index entries (captions, where each image lives) and skip counts; no encoding."""
        return gather_index(
            self.image_corpus(), self.options.num_workers, self.rank, self.world_size, self.cache.root / "corpus-index"
        )

    def encoded_corpus(self, backbone: Any, with_tokens: bool) -> CorpusFeatures:
        """The image corpus through the feature cache (once per backbone and token need)."""
        key = (backbone.identity(), with_tokens)
        if key not in self._encoded:
            self._encoded[key] = encode_corpus(
                self.image_corpus(),
                backbone,
                self.cache,
                with_tokens=with_tokens,
                batch_size=self.options.encode_batch_size,
                num_workers=self.options.num_workers,
                rank=self.rank,
                world_size=self.world_size,
            )
        return self._encoded[key]

    def _corpus_images(self, request: DataRequest):
        """(image table, captions per row, skip counts) of the image corpus."""
        if request.encode is None:
            encoded = self.encoded_corpus(request.backbone, request.tokens)
            return encoded.table, encoded.captions, encoded.skipped
        entries, skipped = self._index()
        pixels = entry_pixels(request.backbone, entries, self.options.num_workers)
        return PixelTable([e.name for e in entries], pixels, request.encode), [e.captions for e in entries], skipped

    def _images(self, request: DataRequest, synthetic: SyntheticOptions) -> StageData:
        table, _, skipped = self._corpus_images(request)
        info = {"images": len(table), "skipped": sum(skipped.values()), "skipped_by_reason": skipped}
        return StageData(images=table, info=info)

    def _pairs(self, request: DataRequest, synthetic: SyntheticOptions) -> StageData:
        """Corpus images that have captions or, with ``request.pair_embeddings``, every (image, caption) pair."""
        if request.pair_embeddings:
            return self._pair_rows(request.backbone)
        table, captions, skipped = self._corpus_images(request)
        info: dict[str, Any] = {"images": len(table), "skipped": sum(skipped.values()), "skipped_by_reason": skipped}
        keep = [i for i, c in enumerate(captions) if c]
        if not keep:
            raise ValueError(f"{self.image_corpus().describe()}: a pairs stage needs captions, and no image has one")
        if len(keep) < len(table):
            info["without_caption"] = len(table) - len(keep)
            if isinstance(table, FeatureTable):
                table = _subset(table, keep)
            else:
                table = PixelTable([table.names[i] for i in keep], _rows_of(table.pixels, keep), table.encode)
            captions = [captions[i] for i in keep]
            info["images"] = len(keep)
        return StageData(images=table, captions=captions, info=info)

    def _pair_rows(self, backbone: Any) -> StageData:
        """Every (image, caption) pair of the corpus with the backbone's joint embedding ``z(I, T)``, through the
        feature cache (``cached_pair_table``). The pair encoder reads image files, so shard corpora are refused."""
        entries, skipped = self._index()
        entries = [e for e in entries if e.captions]
        if not entries:
            raise ValueError(f"{self.image_corpus().describe()}: a pairs stage needs captions, and no image has one")
        inside = next((e for e in entries if e.offset >= 0 or e.data is not None), None)
        if inside is not None:
            raise ValueError(
                f"{self.image_corpus().describe()}: pair embeddings are computed from image files, but {inside.name} "
                "lives inside a shard; extract the shards to an image folder for a fused: pair run"
            )
        table, captions = cached_pair_table(
            backbone, [Path(e.path) for e in entries], [e.captions for e in entries], self.cache
        )
        info = {
            "images": len(entries),
            "pairs": len(table),
            "skipped": sum(skipped.values()),
            "skipped_by_reason": skipped,
        }
        return StageData(images=table, captions=captions, info=info)

    def _captions(self, request: DataRequest, synthetic: SyntheticOptions) -> StageData:
        if self.options.captions:
            corpus = CaptionCorpus(self.options.captions, limit=self.options.limit)
            skipped = corpus.skips.as_dict()
            captions: list[Any] = corpus.captions
        else:
            entries, skipped = self._index()
            # Each image's captions stay together: the batch draws one phrasing per image.
            captions = [e.captions for e in entries if e.captions]
            if not captions:
                raise ValueError(f"{self.image_corpus().describe()}: no captions (set data.captions)")
        info = {"captions": len(captions), "skipped": sum(skipped.values()), "skipped_by_reason": skipped}
        return StageData(captions=captions, info=info)

    # -- triplets ------------------------------------------------------------------------------------------------------
    def _file_table(self, request: DataRequest, paths: list[str]) -> tuple[FeatureTable | PixelTable, set[str]]:
        """Images named by their file paths: cached features (unreadable files left out) or pixels."""
        if request.encode is not None:
            missing = {p for p in paths if not Path(p).is_file()}
            kept = [p for p in paths if p not in missing]
            return PixelTable(kept, file_pixels(request.backbone, kept), request.encode), missing
        feats = image_features(
            ImageEncoder.of_backbone(request.backbone),
            FileImages(paths),
            self.cache,
            tokens=request.tokens,
            batch_size=self.options.encode_batch_size,
            on_error="skip",
        )
        return feats.table(paths), {paths[i] for i in feats.failed}

    def _triplet_table(
        self, triplets: list[Triplet], request: DataRequest, by_name: bool
    ) -> tuple[FeatureTable | PixelTable, list[Triplet], dict[str, int]]:
        """The images of ``triplets`` and the triplets whose images are all usable (the others counted)."""
        if by_name:
            table, _, skipped = self._corpus_images(request)
            unusable: set[str] = set()
        else:
            names = list(dict.fromkeys(n for t in triplets for n in (t.reference, t.target)))
            table, unusable = self._file_table(request, names)
            skipped = {"unreadable image": len(unusable)} if unusable else {}
        index = table.index
        kept = [t for t in triplets if t.reference in index and t.target in index]
        if len(kept) < len(triplets):
            skipped = {**skipped, "triplet with unusable image": len(triplets) - len(kept)}
            logger.warning("skipped %d triplets whose images are missing or unreadable", len(triplets) - len(kept))
        if not kept:
            raise ValueError("no triplet has both images available (check data.triplet_image_root / data.images)")
        return table, kept, skipped

    def _jsonl_triplets(self, request: DataRequest, options: SyntheticOptions, pseudo: bool) -> StageData:
        if not self.options.triplets:
            raise ValueError("this stage reads triplets: set data.triplets to a triplet JSONL")
        if options.corrupt_fraction is not None:
            raise ValueError("synthetic.corrupt_fraction selects a Shapes-world file; corrupt a JSONL before training")
        if not 0 < options.fraction <= 1:
            raise ValueError(f"synthetic fraction must be in (0, 1], got {options.fraction}")
        corpus = TripletCorpus(
            self.options.triplets,
            self.options.triplet_image_root or None,
            by_name=self.options.triplets_by_name,
            limit=self.options.limit,
        )
        records = corpus.records[: max(1, round(options.fraction * len(corpus.records)))]
        if pseudo:
            without = sum(r.pseudo_target is None for r in records)
            records = [r for r in records if r.pseudo_target is not None]
            if not records:
                raise ValueError(f"{corpus.path}: no record has a pseudo_target")
            if without:
                logger.warning("%s: %d records without pseudo_target left out", corpus.path, without)
        triplets = [Triplet(r.reference, r.text, r.pseudo_target if pseudo else r.target) for r in records]
        table, kept, skipped = self._triplet_table(triplets, request, by_name=self.options.triplets_by_name)
        skipped = {**corpus.skips.as_dict(), **skipped}
        info = {"triplets": len(kept), "skipped": sum(skipped.values()), "skipped_by_reason": skipped}
        return StageData(images=table, triplets=kept, info=info)

    def _train_splits(self) -> list[CIRSplit]:
        o = self.options
        if not o.annotations:
            raise ValueError(f"data.benchmark {o.benchmark!r} needs data.annotations (its annotation root)")
        images = o.benchmark_images or None
        if o.benchmark == "fashioniq":
            categories = o.categories or ["dress", "shirt", "toptee"]
            return [s for c in categories for s in load_splits("fashioniq", o.annotations, images, "train", category=c)]
        return load_splits(o.benchmark, o.annotations, images, "train")

    def _benchmark_triplets(self, request: DataRequest, pseudo_manifest: Path | None) -> StageData:
        """The benchmark's human-annotated train triplets (supervised stages only), optionally with pseudo-targets
        in place of the real targets."""
        splits = self._train_splits()
        paths: dict[str, str] = {}
        triplets: list[Triplet] = []
        info: dict[str, Any] = {}
        for split in splits:
            for q in split.queries:
                paths.setdefault(q.reference, str(split.image_path(q.reference)))
            if pseudo_manifest is None:
                for q in split.queries:
                    paths.setdefault(q.targets[0], str(split.image_path(q.targets[0])))
                    texts = tuple(training_captions(q.texts)) if split.dataset == "fashioniq" else ()
                    triplets.append(Triplet(paths[q.reference], q.text, paths[q.targets[0]], texts))
            else:
                # FashionIQ query ids restart in every category, so each category has its own generated folder.
                folder = pseudo_manifest / split.category if split.category else pseudo_manifest
                records = records_for(split_requests(split), folder)
                triplets += [Triplet(paths[r["source"]["reference"]], r["source"]["text"], r["path"]) for r in records]
                info["pseudo_generator"] = records[0]["generator"] if records else None
        if self.options.limit:
            triplets = triplets[: self.options.limit]
        table, kept, skipped = self._triplet_table(triplets, request, by_name=False)
        info.update({"triplets": len(kept), "skipped": sum(skipped.values()), "skipped_by_reason": skipped})
        return StageData(images=table, triplets=kept, info=info)


def _rows_of(pixels: Any, keep: list[int]):
    """``pixels`` re-indexed so that row i reads the original row ``keep[i]``."""
    mapping = torch.tensor(keep, dtype=torch.long)

    def subset(rows: torch.Tensor) -> torch.Tensor:
        return pixels(mapping[rows])

    return subset


def corpus_inputs(run_cfg: Any) -> tuple[Any, CorpusSource, str | None]:
    """The frozen backbone, the ``CorpusSource`` and the validation split (or None) of a corpus run.

    Raises:
        ValueError: the config names no backbone.
    """
    from cirlab.backbones import create_backbone
    from cirlab.features.cache import FeatureCache, default_cache_dir

    if not run_cfg.backbone:
        raise ValueError("a corpus run needs a backbone: set `backbone:` in the preset, --backbone or --set backbone=")
    backbone = create_backbone(run_cfg.backbone).freeze()
    cache = FeatureCache(run_cfg.data.cache_dir or default_cache_dir())
    return backbone, CorpusSource(run_cfg.data, cache), run_cfg.data.val or None
