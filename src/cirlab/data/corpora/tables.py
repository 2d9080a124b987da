"""Rows of the table files corpora are described by (CSV, TSV, JSONL, parquet), and the field names they use."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cirlab.data.corpora.base import SkipCounter

CAPTION_KEYS = ("caption", "text", "captions", "txt")
IMAGE_KEYS = ("image", "path", "file", "filepath", "file_name", "filename", "url")
TEXT_KEYS = ("text", "modification", "caption", "instruction", "edit")
"""Field names of a triplet's modification text."""


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


def pick_field(row: dict[str, Any], keys: Sequence[str], preferred: str | None) -> Any:
    if preferred:
        return row.get(preferred)
    for key in keys:
        if row.get(key) not in (None, ""):
            return row[key]
    return None


def as_captions(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if isinstance(v, str) and v.strip()]
    return []
