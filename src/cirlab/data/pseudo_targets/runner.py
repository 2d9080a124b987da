"""Running a pseudo-target generator over requests into a folder, resumably.

``generate_pseudo_targets`` writes ``images/<key>.png``, ``manifest.jsonl`` (one record per image with its
provenance: generator, seed, source triplet, noise applied) and ``generator.json`` (the generator's settings and
the run seed). Every image is written atomically before its record is appended, an interrupted run resumes where
it stopped, and images that already have a record are never generated again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from cirlab.io import atomic_path, atomic_write_json, atomic_write_text, read_json

if TYPE_CHECKING:
    from PIL import Image

    from cirlab.data.benchmark import CIRSplit

MANIFEST_FILE = "manifest.jsonl"
GENERATOR_FILE = "generator.json"
IMAGES_DIR = "images"


@dataclass(frozen=True)
class PseudoRequest:
    """One source triplet to make a pseudo-target for.

    Attributes:
        key: unique id within a run (the benchmark's query id); names the output image.
        reference: the reference image's name.
        text: the modification text.
        reference_path: the reference image file (generators that read pixels need it).
        target: the real target's name, kept for provenance only (no generator sees it).
        meta: benchmark-specific facts; the Shapes world's ``shapes_meta`` entry (edit, reference scene).
    """

    key: str
    reference: str
    text: str
    reference_path: Path | None = None
    target: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def source(self) -> dict[str, Any]:
        """The source triplet as recorded in the manifest."""
        return {"key": self.key, "reference": self.reference, "text": self.text, "target": self.target}


@dataclass
class PseudoTarget:
    """A generated image and what the generator did to make it (recorded in the manifest).

    Attributes:
        image: the RGB image.
        info: JSON-serialisable facts, e.g. ``{"noise": {...}}`` or the prompt used.
    """

    image: Image.Image
    info: dict[str, Any] = field(default_factory=dict)


class PseudoTargetGenerator(ABC):
    """Makes pseudo-target images from requests; ``describe()`` names everything that determines the output."""

    name: ClassVar[str] = ""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-serialisable settings (recorded in ``generator.json``; a resumed run must have the same)."""

    @abstractmethod
    def generate(self, requests: Sequence[PseudoRequest], seeds: Sequence[int]) -> list[PseudoTarget]:
        """One pseudo-target per request; ``seeds[i]`` alone drives the randomness of request i."""


@dataclass
class PseudoTargetOptions:
    """Where a ``pseudo_triplets`` stage gets its pseudo-targets (a method config section).

    Attributes:
        manifest: a folder written by ``generate_pseudo_targets`` (e.g. with ``DiffusersGenerator``) to read; empty:
            the data source generates its own (Shapes: ``ShapesRendererGenerator``, cached beside the world).
        noise: Shapes renderer: probability of changing one attribute of the edited object.
        noise_attributes: Shapes renderer: the attributes noise may change (``colour``, ``shape``, ``size``,
            ``cell``).
        seed: run seed (each image's seed derives from it and the request key).
    """

    manifest: str = ""
    noise: float = 0.2
    noise_attributes: tuple[str, ...] = ("colour", "shape", "size")
    seed: int = 0


def item_seed(seed: int, key: str) -> int:
    """The seed of one request: a function of the run seed and the key only, so batching and resuming cannot
    change an image."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=4).digest(), "big") & 0x7FFFFFFF


def image_file(key: str) -> str:
    """``images/<key>.png``; keys with characters unsafe in file names get a hash suffix to stay unique."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
    if safe != key:
        safe = f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    return f"{IMAGES_DIR}/{safe}.png"


def split_requests(split: CIRSplit, meta: dict[str, dict[str, Any]] | None = None) -> list[PseudoRequest]:
    """One request per query of a benchmark split (with its ``meta`` entry, keyed by query id, when given)."""
    meta = meta or {}
    return [
        PseudoRequest(
            key=q.qid,
            reference=q.reference,
            text=q.text,
            reference_path=split.image_path(q.reference) if split.image_root is not None else None,
            target=q.targets[0] if q.targets else None,
            meta=meta.get(q.qid, {}),
        )
        for q in split.queries
    ]


def read_pseudo_targets(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a pseudo-target folder whose image exists, in generation order, the latest per key.

    A final line cut short by a crash is ignored (its image is generated again on resume).
    """
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        return []
    records: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("key"), str):
            continue  # not a record this module wrote (a hand-edited line): ignored like a torn one
        if isinstance(record.get("image"), str) and (Path(out_dir) / record["image"]).is_file():
            records[record["key"]] = record
    return list(records.values())


def records_for(requests: Sequence[PseudoRequest], out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The manifest records of ``requests`` (in their order) from a generated folder; raises naming missing keys."""
    by_key = {r["key"]: r for r in read_pseudo_targets(out_dir)}
    missing = [r.key for r in requests if r.key not in by_key]
    if missing:
        raise FileNotFoundError(f"{out_dir}: no pseudo-target for {len(missing)} requests, e.g. {missing[:3]}")
    return [_with_path(by_key[r.key], Path(out_dir)) for r in requests]


def _with_path(record: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    return record | {"path": str(out_dir / record["image"])}


def _check_generator(out_dir: Path, info: dict[str, Any]) -> None:
    """Writes ``generator.json``, or checks that an existing folder was made by the same generator and seed."""
    path = out_dir / GENERATOR_FILE
    if path.is_file():
        existing = read_json(path)
        if existing != info:
            raise ValueError(
                f"{out_dir} holds pseudo-targets of another generator or seed ({path}); use another folder"
            )
        return
    atomic_write_json(path, info)


def _append(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Appends whole lines in one write and syncs, so a crash can cut at most the last line."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def generate_pseudo_targets(
    generator: PseudoTargetGenerator,
    requests: Sequence[PseudoRequest],
    out_dir: str | os.PathLike,
    seed: int = 0,
    batch_size: int = 16,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Generates the pseudo-targets of ``requests`` that ``out_dir`` lacks; returns every request's record.

    Args:
        generator: the generator.
        requests: source triplets; keys must be unique.
        out_dir: the output folder (created; resumed when it already holds a run of the same generator and seed).
        seed: run seed; request ``key`` gets ``item_seed(seed, key)``.
        batch_size: requests per ``generator.generate`` call (images are written and recorded after each).
        log: progress messages.

    Returns:
        Manifest records in the order of ``requests``: ``key``, ``image`` (relative to ``out_dir``), ``path``,
        ``generator``, ``seed``, ``source`` (the triplet) and the generator's facts (e.g. ``noise``).

    Raises:
        ValueError: duplicate keys, or ``out_dir`` holds a run of another generator or seed.
    """
    out_dir = Path(out_dir)
    keys = [r.key for r in requests]
    if len(set(keys)) != len(keys):
        raise ValueError("pseudo-target request keys must be unique")
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_generator(out_dir, {"generator": generator.describe(), "seed": seed})
    done = {r["key"]: r for r in read_pseudo_targets(out_dir)}
    manifest = out_dir / MANIFEST_FILE
    compact = "".join(json.dumps(r, sort_keys=True) + "\n" for r in done.values())
    if not manifest.is_file() or manifest.read_text(encoding="utf-8") != compact:
        # Drop torn lines and records of deleted images before appending to the manifest.
        atomic_write_text(manifest, compact)
    todo = [r for r in requests if r.key not in done]
    if log is not None:
        log(f"pseudo-targets in {out_dir}: {len(requests) - len(todo)} present, {len(todo)} to generate")
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        seeds = [item_seed(seed, r.key) for r in chunk]
        made = generator.generate(chunk, seeds)
        records = []
        for request, item, s in zip(chunk, made, seeds, strict=True):
            rel = image_file(request.key)
            with atomic_path(out_dir / rel) as tmp:
                item.image.save(tmp, format="PNG")
            provenance = {"generator": generator.name, "seed": s, "source": request.source(), "noise": None}
            records.append({"key": request.key, "image": rel, **provenance} | item.info)
        _append(manifest, records)
        done.update((r["key"], r) for r in records)
        if log is not None:
            log(f"pseudo-targets: {start + len(chunk)}/{len(todo)}")
    return [_with_path(done[k], out_dir) for k in keys]
