"""The corpus contract: samples, skipped samples and the split of a pass over processes and DataLoader workers.

A corpus is a list of *units* (webdataset shards; runs of files of an image folder). A pass is split over
``world_size`` processes x ``num_workers`` DataLoader workers (``ShardContext``): whole units go round-robin to the
parts when there are at least as many units as parts, else every part reads every unit and keeps every
``parts``-th sample. Either way each sample is yielded by exactly one part, and every sample keeps its global
``order`` (unit, position), so results gathered from all parts can be put back in one order.

Corrupt input never stops a pass: unusable samples are skipped and counted in a ``SkipCounter`` (logged, and
reported with the data). Images are decoded later, by the encoder; samples whose image does not decode are counted
there.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardContext:
    """Which part of a pass this reader is: process ``rank`` of ``world_size``, worker ``worker`` of ``num_workers``."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.world_size and 0 <= self.worker < self.num_workers):
            raise ValueError(f"invalid shard context {self}")

    @property
    def parts(self) -> int:
        """Readers in the whole pass."""
        return self.world_size * self.num_workers

    @property
    def part(self) -> int:
        """This reader's index in ``0..parts-1``."""
        return self.rank * self.num_workers + self.worker


def shard_context(rank: int | None = None, world_size: int | None = None) -> ShardContext:
    """The current reader: explicit ``rank``/``world_size``, else torch.distributed's when initialised, else one
    process; the DataLoader worker (if any) from ``torch.utils.data.get_worker_info``."""
    import torch.distributed as dist
    import torch.utils.data

    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = 0, 1
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return ShardContext(rank, world_size, worker, workers)


@dataclass
class Sample:
    """One image (or caption) of a corpus.

    Attributes:
        order: ``(unit, position)``: the sample's place in the whole corpus, the same for every shard split.
        name: unique name (an image folder: the path relative to its root; webdataset: the sample key).
        captions: zero or more captions.
        path: the file holding the image (a shard for webdataset samples).
        offset / size: byte range of the image inside ``path`` (webdataset; -1 for whole files).
        data: the image bytes when already in memory.
    """

    order: tuple[int, int]
    name: str
    captions: list[str] = field(default_factory=list)
    path: Path | None = None
    offset: int = -1
    size: int = -1
    data: bytes | None = None

    def read(self) -> bytes:
        """The image bytes."""
        if self.data is not None:
            return self.data
        return read_image_bytes(self.path, self.offset, self.size)


def read_image_bytes(path: Path | str | None, offset: int = -1, size: int = -1) -> bytes:
    """A whole file, or ``size`` bytes at ``offset`` of a file (an image inside an uncompressed tar shard)."""
    if path is None:
        raise ValueError("sample has no image")
    with open(path, "rb") as f:
        if offset < 0:
            return f.read()
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path}: expected {size} bytes at offset {offset}, got {len(data)} (file changed?)")
    return data


@dataclass
class Skipped:
    """A sample (or the rest of a unit) that was not usable, and why."""

    reason: str
    where: str


class SkipCounter:
    """Counts skipped samples by reason; logs the first few of each reason with where they were."""

    def __init__(self, log_first: int = 3) -> None:
        self.counts: Counter[str] = Counter()
        self.log_first = log_first

    def add(self, reason: str, where: str = "", n: int = 1) -> None:
        self.counts[reason] += n
        if self.counts[reason] <= self.log_first:
            logger.warning("skipped (%s): %s", reason, where)

    def merge(self, counts: dict[str, int]) -> None:
        self.counts.update(counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


class ImageCorpus:
    """Base of image corpora: ``units`` and ``read_unit``; ``samples`` does the shard split."""

    kind = ""

    def num_units(self) -> int:
        raise NotImplementedError

    def read_unit(self, unit: int) -> Iterator[Sample | Skipped]:
        """Every sample of ``unit`` in order, or a ``Skipped`` in its place (raw positions are kept stable)."""
        raise NotImplementedError

    def unit_signature(self, unit: int) -> str:
        """Changes whenever the unit's content may have changed (keys the index cache)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def owned_units(self, ctx: ShardContext) -> list[int] | None:
        """Units this part reads whole, or None when parts outnumber units (sample-level split)."""
        n = self.num_units()
        return list(range(ctx.part, n, ctx.parts)) if n >= ctx.parts else None

    def samples(self, ctx: ShardContext | None = None, skips: SkipCounter | None = None) -> Iterator[Sample]:
        """This part's samples (every sample of the corpus belongs to exactly one part); skips are counted once."""
        ctx = ctx or shard_context()
        skips = skips if skips is not None else SkipCounter()
        units = self.owned_units(ctx)
        if units is not None:
            for unit in units:
                for item in self.read_unit(unit):
                    if isinstance(item, Skipped):
                        skips.add(item.reason, item.where)
                    else:
                        yield item
            return
        position = 0
        for unit in range(self.num_units()):
            for item in self.read_unit(unit):
                mine = position % ctx.parts == ctx.part
                position += 1
                if not mine:
                    continue
                if isinstance(item, Skipped):
                    skips.add(item.reason, item.where)
                else:
                    yield item
