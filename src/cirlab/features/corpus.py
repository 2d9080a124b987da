"""Image corpora through the feature cache (STYLE.md rule 10), split across processes and DataLoader workers.

Two passes. The *index* pass streams the corpus through a ``DataLoader`` whose workers each read their part of it
(``cirlab.data.corpora``: every sample by exactly one process x worker) and hash every image's bytes; the per-unit
result (names, captions, content keys, byte offsets) is kept under ``<cache>/corpus-index/``, so a second run over
an unchanged shard reads a small JSON file instead of the shard. The *encoding* pass asks the feature cache for
this process's content keys, so only images it lacks are read back (by offset), decoded and encoded; images that do
not decode are skipped and counted. Under torch.distributed the index entries of all processes are then gathered,
put back in corpus order, and every process reads the whole corpus's features from the (shared) cache.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cirlab.data.corpora import (
    ImageCorpus,
    Sample,
    ShardContext,
    SkipCounter,
    Skipped,
    read_image_bytes,
    shard_context,
)
from cirlab.data.images import decode_image
from cirlab.distributed import all_gather_objects, current_world
from cirlab.features.cache import FeatureCache
from cirlab.features.hashing import hash_bytes
from cirlab.features.images import ImageEncoder, KeyedImages, image_features
from cirlab.features.table import FeatureTable
from cirlab.io import atomic_write_json, read_json

logger = logging.getLogger(__name__)

INDEX_DIR = "corpus-index"


@dataclass
class IndexEntry:
    """One indexed image: where it is, what it is called, its captions and its content key."""

    order: tuple[int, int]
    name: str
    key: str
    captions: list[str]
    path: str
    offset: int = -1
    size: int = -1
    data: bytes | None = field(default=None, repr=False)

    def read(self) -> bytes:
        return self.data if self.data is not None else read_image_bytes(self.path, self.offset, self.size)


def _entry(sample: Sample, skips: SkipCounter) -> IndexEntry | None:
    try:
        data = sample.read()
    except OSError as err:
        skips.add("unreadable image", f"{sample.path}:{sample.name}: {err}")
        return None
    if not data:
        skips.add("empty image", f"{sample.path}:{sample.name}")
        return None
    return IndexEntry(
        sample.order, sample.name, hash_bytes(data), sample.captions, str(sample.path), sample.offset, sample.size,
        data=sample.data,
    )  # fmt: skip


def _unit_entries(corpus: ImageCorpus, unit: int, index_dir: Path | None) -> tuple[list[IndexEntry], dict[str, int]]:
    """A whole unit's entries and skips, from the index cache when its signature matches."""
    path = index_dir / f"{corpus.unit_signature(unit)}.json" if index_dir is not None else None
    if path is not None and path.is_file():
        try:
            saved = read_json(path)
            entries = [IndexEntry(**{**e, "order": tuple(e["order"])}) for e in saved["entries"]]
            return entries, saved["skips"]
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring a damaged corpus index file %s", path)
    skips = SkipCounter(log_first=0)
    entries = []
    for item in corpus.read_unit(unit):
        if isinstance(item, Skipped):
            skips.add(item.reason, item.where)
        elif (entry := _entry(item, skips)) is not None:
            entries.append(entry)
    # Entries holding bytes (compressed shards) cannot be read back by offset, so they are not cached.
    if path is not None and all(e.data is None for e in entries):
        atomic_write_json(path, {"entries": [asdict(e) for e in entries], "skips": skips.as_dict()}, indent=None)
    return entries, skips.as_dict()


def index_entries(
    corpus: ImageCorpus, ctx: ShardContext, skips: SkipCounter, index_dir: Path | None = None
) -> Iterator[IndexEntry]:
    """The entries of this reader's part of ``corpus`` (see ``ImageCorpus.samples`` for the split)."""
    units = corpus.owned_units(ctx)
    if units is None:
        for sample in corpus.samples(ctx, skips):
            if (entry := _entry(sample, skips)) is not None:
                yield entry
        return
    for unit in units:
        entries, counts = _unit_entries(corpus, unit, index_dir)
        for reason, n in counts.items():
            skips.add(reason, f"{corpus.describe()} unit {unit}", n)
        yield from entries


class CorpusIndexStream(torch.utils.data.IterableDataset):
    """A DataLoader dataset yielding ``("entries", [...])`` chunks of this process's part of a corpus, then one
    ``("skips", {reason: count})`` per worker; each worker reads only its own part."""

    def __init__(
        self,
        corpus: ImageCorpus,
        rank: int | None = None,
        world_size: int | None = None,
        index_dir: Path | None = None,
        chunk: int = 256,
    ) -> None:
        super().__init__()
        self.corpus, self.rank, self.world_size, self.index_dir, self.chunk = corpus, rank, world_size, index_dir, chunk

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        ctx = shard_context(self.rank, self.world_size)
        skips = SkipCounter()
        chunk: list[IndexEntry] = []
        for entry in index_entries(self.corpus, ctx, skips, self.index_dir):
            chunk.append(entry)
            if len(chunk) >= self.chunk:
                yield "entries", chunk
                chunk = []
        yield "entries", chunk
        yield "skips", skips.as_dict()


def index_corpus(
    corpus: ImageCorpus,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    index_dir: Path | None = None,
) -> tuple[list[IndexEntry], dict[str, int]]:
    """This process's entries (in corpus order) and skip counts, read by ``num_workers`` DataLoader workers."""
    # The process's place is fixed here, in the main process: workers only add their own worker index.
    ctx = shard_context(rank, world_size)
    stream = CorpusIndexStream(corpus, ctx.rank, ctx.world_size, index_dir)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    entries: list[IndexEntry] = []
    skips = SkipCounter(log_first=0)
    for kind, payload in loader:
        if kind == "entries":
            entries.extend(payload)
        else:
            skips.merge(payload)
    entries.sort(key=lambda e: e.order)
    return entries, skips.as_dict()


@dataclass
class CorpusFeatures:
    """An encoded image corpus: features by name, captions per row, where each image is, and what was skipped."""

    table: FeatureTable
    captions: list[list[str]]
    entries: list[IndexEntry]
    skipped: dict[str, int]

    def info(self) -> dict[str, Any]:
        return {"images": len(self.entries), "skipped": sum(self.skipped.values()), "skipped_by_reason": self.skipped}


def _decode_all(entries: Sequence[IndexEntry], threads: int) -> list[Any]:
    def decode(e: IndexEntry) -> Any:
        return decode_image(e.read(), f"{e.path}:{e.name}")

    if threads <= 1 or len(entries) <= 1:
        return [decode(e) for e in entries]
    # PIL releases the GIL while decoding, so threads decode in parallel.
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(decode, entries))


def entry_pixels(backbone: Any, entries: Sequence[IndexEntry], threads: int = 0):
    """``rows -> pixels (B, 3, S, S)``: corpus images read back, decoded and preprocessed for ``backbone``."""

    def pixels(rows: torch.Tensor) -> torch.Tensor:
        return backbone.preprocess(_decode_all([entries[i] for i in rows.tolist()], threads))

    return pixels


def encode_corpus(
    corpus: ImageCorpus,
    backbone: Any,
    cache: FeatureCache,
    with_tokens: bool = False,
    batch_size: int = 256,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> CorpusFeatures:
    """Features of every image of ``corpus`` (the whole corpus, in corpus order, on every process).

    Args:
        corpus: an image corpus (``ImageFolderCorpus``, ``WebDatasetCorpus``).
        backbone: the frozen image encoder.
        cache: the feature cache; under torch.distributed every process must see the same directory.
        with_tokens: also cache patch tokens (float16).
        batch_size: images per encoder call.
        num_workers: DataLoader workers of the index pass (and decoding threads of the encoding pass).
        rank / world_size: this process's share when not taken from torch.distributed. Without torch.distributed
            only this share is returned (for tests of the split).

    Returns:
        ``CorpusFeatures``; images that could not be read or decoded are left out and counted in ``skipped``.
    """
    index_dir = cache.root / INDEX_DIR
    entries, skipped = index_corpus(corpus, num_workers, rank, world_size, index_dir)
    skips = SkipCounter()
    skips.merge(skipped)
    encoder = ImageEncoder.of_backbone(backbone)
    mine = image_features(
        encoder,
        KeyedImages([e.key for e in entries], lambda rows: _decode_all([entries[i] for i in rows], num_workers)),
        cache,
        tokens=with_tokens,
        batch_size=batch_size,
        on_error="skip",
    )
    for i in sorted(mine.failed):
        skips.add("undecodable image", f"{entries[i].path}:{entries[i].name}")
    failed = {entries[i].key for i in mine.failed}
    unique, skipped = _merge(corpus, [e for e in entries if e.key not in failed], skips)

    def missing(rows: Sequence[int]) -> Any:
        raise RuntimeError(
            f"{len(rows)} corpus images have no cached features after encoding; every process must use "
            f"the same feature cache directory ({cache.root})"
        )

    # Every process's images, encoded by whichever process read them: here they are only looked up.
    table = image_features(
        encoder, KeyedImages([e.key for e in unique], missing), cache, tokens=with_tokens, batch_size=batch_size
    ).table([e.name for e in unique])
    return CorpusFeatures(table, [e.captions for e in unique], unique, skipped)


def gather_index(
    corpus: ImageCorpus,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    index_dir: Path | None = None,
) -> tuple[list[IndexEntry], dict[str, int]]:
    """The index of the whole corpus (gathered from every process, in corpus order) without encoding anything:
    for captions of an image corpus and for methods that encode pixels with their own trainable encoder."""
    entries, skipped = index_corpus(corpus, num_workers, rank, world_size, index_dir)
    skips = SkipCounter(log_first=0)
    skips.merge(skipped)
    return _merge(corpus, entries, skips)


def _merge(corpus: ImageCorpus, local: list[IndexEntry], skips: SkipCounter) -> tuple[list[IndexEntry], dict[str, int]]:
    """Every process's entries in corpus order, the first of each name kept; skip counts summed."""
    gathered = all_gather_objects((local, skips.as_dict()), current_world())
    every = sorted((e for part_entries, _ in gathered for e in part_entries), key=lambda e: e.order)
    total = SkipCounter(log_first=0)
    for _, counts in gathered:
        total.merge(counts)
    seen: set[str] = set()
    unique = []
    for e in every:
        if e.name in seen:
            total.add("duplicate name", e.name)
            continue
        seen.add(e.name)
        unique.append(e)
    if total.total:
        logger.warning("%s: skipped %d samples %s", corpus.describe(), total.total, total.as_dict())
    if not unique:
        raise ValueError(f"{corpus.describe()}: no usable images (skipped: {total.as_dict()})")
    return unique, total.as_dict()
