"""Training corpora in public formats: image folders, webdataset tar shards, caption files and triplet JSONL.

Registered in ``DATASETS`` as ``imagefolder``, ``webdataset``, ``captions`` and ``triplet-jsonl``.

Sharding: a corpus is a list of *units* (webdataset shards; runs of files of an image folder). A pass is split
over ``world_size`` processes x ``num_workers`` DataLoader workers (``ShardContext``): whole units go round-robin to
the parts when there are at least as many units as parts, else every part reads every unit and keeps every
``parts``-th sample. Either way each sample is yielded by exactly one part, and every sample keeps its global
``order`` (unit, position), so results gathered from all parts can be put back in one order.

Webdataset shards are read with Python's ``tarfile`` in streaming mode rather than the ``webdataset`` package: the
format is plain tar with samples grouped by file-name key, the core stays free of another dependency, and owning
the reader lets the shard split be exact (a sample-level fallback when there are fewer shards than readers) and
lets each sample carry its byte offset, so later passes read single images back without re-streaming the shard.

Corrupt input never stops a pass: truncated shards, samples without an image, unreadable caption files and
malformed lines are skipped and counted in a ``SkipCounter`` (logged, and reported with the data). Images are
decoded later, by the encoder; samples whose image does not decode are counted there.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cirlab.data.images import IMAGE_SUFFIXES
from cirlab.registry import DATASETS

logger = logging.getLogger(__name__)

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("caption", "text", "captions", "txt")
IMAGE_KEYS = ("image", "path", "file", "filepath", "file_name", "filename", "url")
FOLDER_UNIT = 4096
"""Files per unit of an image folder: the granularity of the process/worker split and of the index cache."""


# ------------------------------------------------------------------------------------------------------- sharding
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


# ---------------------------------------------------------------------------------------------------- samples
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


# --------------------------------------------------------------------------------------------- tables and captions
def read_records(path: str | Path, skips: SkipCounter | None = None) -> list[dict[str, Any]]:
    """Rows of a CSV, TSV, JSONL or parquet file as dicts (parquet needs the ``parquet`` extra).

    Malformed JSONL lines are skipped and counted; a missing file or unknown format raises naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    skips = skips if skips is not None else SkipCounter()
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    skips.add("malformed line", f"{path}:{i}: {err.msg}")
                    continue
                if not isinstance(row, dict):
                    skips.add("malformed line", f"{path}:{i}: not a JSON object")
                    continue
                rows.append(row)
        return rows
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", errors="replace", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".parquet":
        from cirlab._optional import require

        pq = require("pyarrow.parquet", "parquet", "reading parquet files")
        try:
            return pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for damaged files
            raise ValueError(f"{path}: cannot read parquet ({err})") from None
    raise ValueError(f"{path}: unknown table format {suffix!r} (expected .csv, .tsv, .jsonl or .parquet)")


def _pick(row: dict[str, Any], keys: Sequence[str], preferred: str | None) -> Any:
    if preferred:
        return row.get(preferred)
    for key in keys:
        if row.get(key) not in (None, ""):
            return row[key]
    return None


def _as_captions(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if isinstance(v, str) and v.strip()]
    return []


# --------------------------------------------------------------------------------------------------- image folder
@DATASETS.register("imagefolder")
class ImageFolderCorpus(ImageCorpus):
    """Images under ``root`` (recursive), with optional captions.

    Captions come from a manifest (CSV/TSV/JSONL/parquet with an image column, e.g. ``image`` or ``path``, relative
    to ``root``, and a caption column, e.g. ``caption`` or ``text``; several rows per image give several captions)
    or, without one, from sidecar files: ``a/b.txt`` beside ``a/b.jpg``, one caption per line.

    Args:
        root: the image folder.
        manifest: optional manifest file; when given only the images it lists are in the corpus.
        image_key / caption_key: manifest column names (default: the first of the usual names present).
        limit: keep only the first ``limit`` images (0: all), e.g. for dry runs.
    """

    kind = "imagefolder"

    def __init__(
        self,
        root: str | Path,
        manifest: str | Path | None = None,
        image_key: str | None = None,
        caption_key: str | None = None,
        limit: int = 0,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: image folder not found")
        self.manifest = Path(manifest) if manifest else None
        self.skips = SkipCounter()
        self._captions: dict[str, list[str]] | None = None
        if self.manifest is not None:
            grouped: dict[str, list[str]] = {}
            for i, row in enumerate(read_records(self.manifest, self.skips)):
                image = _pick(row, IMAGE_KEYS, image_key)
                if not isinstance(image, str) or not image:
                    self.skips.add("manifest row without image", f"{self.manifest} row {i}")
                    continue
                grouped.setdefault(image, []).extend(_as_captions(_pick(row, CAPTION_KEYS, caption_key)))
            self.files = list(grouped)
            self._captions = grouped
        else:
            self.files = sorted(
                p.relative_to(self.root).as_posix()
                for p in self.root.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
        if limit:
            self.files = self.files[:limit]

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> str:
        source = f"manifest {self.manifest}" if self.manifest else "sidecar .txt captions"
        return f"image folder {self.root} ({len(self)} images, {source})"

    def num_units(self) -> int:
        return (len(self.files) + FOLDER_UNIT - 1) // FOLDER_UNIT

    def _unit_files(self, unit: int) -> list[str]:
        return self.files[unit * FOLDER_UNIT : (unit + 1) * FOLDER_UNIT]

    def unit_signature(self, unit: int) -> str:
        h = hashlib.sha1(f"imagefolder\0{self.root.resolve()}".encode())
        if self.manifest is not None:
            st = self.manifest.stat()
            h.update(f"\0{self.manifest.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        for rel in self._unit_files(unit):
            for p in (self.root / rel, (self.root / rel).with_suffix(".txt")):
                try:
                    st = p.stat()
                    h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
                except OSError:
                    h.update(f"\0{rel}\0-".encode())
        return h.hexdigest()

    def captions_of(self, rel: str) -> list[str]:
        """Captions of one image (manifest rows or its sidecar file); unreadable sidecars count as none."""
        if self._captions is not None:
            return self._captions.get(rel, [])
        sidecar = (self.root / rel).with_suffix(".txt")
        if not sidecar.is_file():
            return []
        try:
            return [line.strip() for line in sidecar.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            self.skips.add("unreadable caption file", f"{sidecar}: {err}")
            return []

    def read_unit(self, unit: int) -> Iterator[Sample | Skipped]:
        for i, rel in enumerate(self._unit_files(unit)):
            path = self.root / rel
            if not path.is_file():
                yield Skipped("missing image file", str(path))
                continue
            yield Sample((unit, i), rel, self.captions_of(rel), path=path)


# ------------------------------------------------------------------------------------------------------ webdataset
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expands ``{000..009}`` ranges (zero padding kept) and ``{a,b}`` lists, as webdataset shard lists use them."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    ranged = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if ranged:
        lo, hi = ranged.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        if int(hi) < int(lo):
            raise ValueError(f"shard pattern {pattern!r}: empty range {{{body}}}")
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard paths from a pattern, several patterns joined by ``::``, or a list of them."""
    patterns = urls.split("::") if isinstance(urls, str) else list(urls)
    return [u for p in patterns if p for u in expand_braces(p)]


def _split_key(member: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the file name; the rest is the extension."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _json_captions(data: bytes) -> list[str]:
    obj = json.loads(data.decode("utf-8"))
    if not isinstance(obj, dict):
        return []
    for key in CAPTION_KEYS:
        found = _as_captions(obj.get(key))
        if found:
            return found
    return []


@DATASETS.register("webdataset")
class WebDatasetCorpus(ImageCorpus):
    """Webdataset tar shards: samples are runs of files sharing a key (``000123.jpg``, ``000123.txt``,
    ``000123.json``); the image is the ``jpg``/``jpeg``/``png``/``webp`` member, captions come from ``txt`` and from
    the ``caption``/``text`` field of ``json``.

    Args:
        urls: shard paths: a brace pattern (``/data/cc3m/{00000..00331}.tar``), several joined by ``::``, or a list.
        limit: keep only the first ``limit`` samples of each pass over all shards (0: all), e.g. for dry runs.

    Raises:
        FileNotFoundError: naming the first missing shard (a wrong pattern is a configuration error, not corruption).
    """

    kind = "webdataset"

    def __init__(self, urls: str | Sequence[str], limit: int = 0) -> None:
        self.shards = [Path(u) for u in expand_urls(urls)]
        if not self.shards:
            raise ValueError(f"no shards in {urls!r}")
        missing = [s for s in self.shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: shard not found ({len(missing)} of {len(self.shards)} missing)")
        self.limit = limit

    def describe(self) -> str:
        return f"webdataset {len(self.shards)} shards ({self.shards[0]} ...)"

    def num_units(self) -> int:
        return len(self.shards)

    def owned_units(self, ctx: ShardContext) -> list[int] | None:
        # A sample limit is a global prefix, which only the sample-level split can take exactly.
        return None if self.limit else super().owned_units(ctx)

    def samples(self, ctx: ShardContext | None = None, skips: SkipCounter | None = None) -> Iterator[Sample]:
        if not self.limit:
            yield from super().samples(ctx, skips)
            return
        ctx = ctx or shard_context()
        # Every part reads the same prefix; only part 0 counts its skips, so each is counted once.
        counter = skips if skips is not None and ctx.part == 0 else SkipCounter(log_first=0)
        for kept, sample in enumerate(super().samples(ShardContext(), counter)):
            if kept >= self.limit:
                return
            if kept % ctx.parts == ctx.part:
                yield sample

    def unit_signature(self, unit: int) -> str:
        path = self.shards[unit]
        st = path.stat()
        return hashlib.sha1(f"webdataset\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()

    def read_unit(self, unit: int) -> Iterator[Sample | Skipped]:
        path = self.shards[unit]
        position = 0
        key: str | None = None
        parts: dict[str, tuple[bytes, int, int]] = {}

        def emit() -> Sample | Skipped:
            where = f"{path}:{key}"
            image_ext = next((e for e in WDS_IMAGE_EXTS if e in parts), None)
            if image_ext is None:
                return Skipped("no image in sample", where)
            captions: list[str] = []
            try:
                if "txt" in parts:
                    captions += _as_captions(parts["txt"][0].decode("utf-8"))
                if "json" in parts:
                    captions += [c for c in _json_captions(parts["json"][0]) if c not in captions]
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                return Skipped("unreadable caption", f"{where}: {err}")
            data, offset, size = parts[image_ext]
            # Uncompressed shards can be read back by offset; compressed ones keep the bytes.
            return Sample((unit, position), key, captions, path=path, offset=offset, size=size,
                          data=None if offset >= 0 else data)  # fmt: skip

        compressed = _is_compressed(path)
        pending = False  # the sample ``key`` has members not emitted yet
        try:
            with tarfile.open(path, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, ext = _split_key(member.name)
                    if member_key != key and key is not None:
                        yield emit()
                        position += 1
                        parts, pending = {}, False
                    key, pending = member_key, True
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    parts[ext] = (data, -1 if compressed else member.offset_data, member.size)
        except (tarfile.TarError, OSError, EOFError) as err:
            # A truncated or damaged shard: keep what was read before the damage, count the rest as one skip.
            if pending:
                yield Skipped("truncated sample", f"{path}:{key}")
                position += 1
            yield Skipped("damaged shard", f"{path}: {err}")
            return
        if key is not None:
            yield emit()


def _is_compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        magic = f.read(6)
    return magic.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ"))


def open_image_corpus(spec: str | Path, manifest: str | Path | None = None, limit: int = 0) -> ImageCorpus:
    """An image folder (``spec`` is a directory) or webdataset shards (a path or brace pattern of ``.tar`` files)."""
    if Path(spec).is_dir():
        return ImageFolderCorpus(spec, manifest or None, limit=limit)
    if manifest:
        raise ValueError(f"a manifest lists an image folder's images, but {str(spec)!r} is not a directory")
    return WebDatasetCorpus(str(spec), limit=limit)


# ----------------------------------------------------------------------------------------------- caption corpus
@DATASETS.register("captions")
class CaptionCorpus:
    """Captions for language-only training: a text file (one caption per line), JSONL, CSV/TSV or parquet (a
    ``caption``/``text`` field, or ``caption_key``). Empty and malformed entries are skipped and counted.

    Args:
        path: the caption file.
        caption_key: field name in structured files (default: the first of the usual names present).
        limit: keep only the first ``limit`` captions (0: all).
    """

    kind = "captions"

    def __init__(self, path: str | Path, caption_key: str | None = None, limit: int = 0) -> None:
        self.path = Path(path)
        self.skips = SkipCounter()
        if self.path.suffix.lower() in (".txt", ".text"):
            if not self.path.is_file():
                raise FileNotFoundError(f"{self.path}: file not found")
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
            self.captions = [line.strip() for line in lines if line.strip()]
            blank = len(lines) - len(self.captions)
            if blank:
                self.skips.add("empty caption", str(self.path), blank)
        else:
            self.captions = []
            for i, row in enumerate(read_records(self.path, self.skips)):
                found = _as_captions(_pick(row, CAPTION_KEYS, caption_key))
                if not found:
                    self.skips.add("empty caption", f"{self.path} row {i}")
                self.captions.extend(found)
        if limit:
            self.captions = self.captions[:limit]
        if not self.captions:
            raise ValueError(f"{self.path}: no captions found")

    def __len__(self) -> int:
        return len(self.captions)

    def describe(self) -> str:
        return f"caption corpus {self.path} ({len(self)} captions)"

    def shard(self, ctx: ShardContext | None = None) -> list[str]:
        """This part's captions (every caption in exactly one part)."""
        ctx = ctx or shard_context()
        return self.captions[ctx.part :: ctx.parts]


# --------------------------------------------------------------------------------------------------- triplet JSONL
@dataclass(frozen=True)
class TripletRecord:
    """A synthetic triplet; images are file paths or names in an image corpus (see ``TripletCorpus``)."""

    reference: str
    text: str
    target: str
    pseudo_target: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


TEXT_KEYS = ("text", "modification", "caption", "instruction", "edit")


@DATASETS.register("triplet-jsonl")
class TripletCorpus:
    """Synthetic triplets, one JSON object per line: ``reference``, ``text`` (or ``modification``/``caption``/
    ``instruction``), ``target`` and an optional ``pseudo_target``; other fields are kept as ``meta``.

    Image fields are paths relative to ``image_root`` (default: the JSONL's folder) unless ``by_name`` is set, in
    which case they are names in an image corpus (e.g. webdataset keys, as ``cirlab mine-triplets`` writes them for
    a shard corpus). Malformed lines and records missing a field are skipped and counted.
    """

    kind = "triplet-jsonl"

    def __init__(
        self, path: str | Path, image_root: str | Path | None = None, by_name: bool = False, limit: int = 0
    ) -> None:
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root else self.path.parent
        self.by_name = by_name
        self.skips = SkipCounter()
        self.records: list[TripletRecord] = []
        for i, row in enumerate(read_records(self.path, self.skips)):
            text = _pick(row, TEXT_KEYS, None)
            ref, target = row.get("reference"), row.get("target")
            if not all(isinstance(v, str) and v for v in (ref, target, text)):
                self.skips.add("incomplete triplet", f"{self.path} record {i}")
                continue
            pseudo = row.get("pseudo_target")
            meta = {k: v for k, v in row.items() if k not in ("reference", "target", "pseudo_target", *TEXT_KEYS)}
            self.records.append(
                TripletRecord(
                    self.resolve(ref),
                    text.strip(),
                    self.resolve(target),
                    self.resolve(pseudo) if pseudo else None,
                    meta,
                )
            )
            if limit and len(self.records) >= limit:
                break
        if not self.records:
            raise ValueError(f"{self.path}: no usable triplets")

    def resolve(self, image: str) -> str:
        """An image field as the training data names it: a path (relative to ``image_root``) or a corpus name."""
        if self.by_name:
            return image
        return str(self.image_root / image) if not os.path.isabs(image) else image

    def __len__(self) -> int:
        return len(self.records)

    def describe(self) -> str:
        return f"triplets {self.path} ({len(self)} records)"


def decode_image_bytes(data: bytes, where: str = "") -> Any:
    """Decodes image bytes into an RGB PIL image (fully loaded); raises ``ValueError`` naming ``where``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{where}: cannot decode image ({err})") from None
