"""Webdataset tar shards as a corpus, read with Python's ``tarfile`` in streaming mode.

The ``webdataset`` package is not used: the format is plain tar with samples grouped by file-name key, the core
stays free of another dependency, and owning the reader lets the shard split be exact (a sample-level fallback when
there are fewer shards than readers) and lets each sample carry its byte offset, so later passes read single images
back without re-streaming the shard. Truncated shards and samples without an image are skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from cirlab.data.corpora.base import ImageCorpus, Sample, ShardContext, SkipCounter, Skipped, shard_context
from cirlab.data.corpora.tables import CAPTION_KEYS, as_captions
from cirlab.registry import CORPORA

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


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
        found = as_captions(obj.get(key))
        if found:
            return found
    return []


@CORPORA.register("webdataset")
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
                    captions += as_captions(parts["txt"][0].decode("utf-8"))
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
