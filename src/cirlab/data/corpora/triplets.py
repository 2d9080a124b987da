"""Synthetic triplets in JSONL (reference, modification text, target, optional pseudo-target) as a corpus."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cirlab.data.corpora.base import SkipCounter
from cirlab.data.corpora.tables import TEXT_KEYS, pick_field, read_records
from cirlab.registry import CORPORA


@dataclass(frozen=True)
class TripletRecord:
    """A synthetic triplet; images are file paths or names in an image corpus (see ``TripletCorpus``)."""

    reference: str
    text: str
    target: str
    pseudo_target: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@CORPORA.register("triplet-jsonl")
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
            text = pick_field(row, TEXT_KEYS, None)
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
