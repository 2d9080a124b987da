"""The generated-text cache: every caption and rewrite a method asked for, keyed by everything that determines it.

A record is one request's answer: the model's identity (a weights digest or a pinned hub revision, and the dtype),
the prompt (system and user messages), the image's content digest, the effective sampling settings (the seed when
sampling) and the raw texts the model returned (parsing happens after the cache, so a changed parser needs no new
generation). The key digests all of that, so a changed model, prompt or setting is a new key and never a silently
reused answer.

On disk a cache is one JSON Lines file, one record per line, readable and shippable with a submission::

    {"key": "3f0c...", "model": "hub:Qwen/Qwen2.5-7B-Instruct@a09a35...|bfloat16", "kind": "rewrite",
     "messages": [{"role": "user", "content": "...Image Content: a dog on a beach\\nInstruction: ..."}],
     "image": null, "image_position": null, "sampling": {"num_beams": 1, "do_sample": false, ...},
     "outputs": ["Edited Description: two dogs on a beach"]}

Writes merge with what other processes wrote meanwhile (under a file lock) and replace the file atomically, so a
killed writer never leaves a half-written line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cirlab.io import atomic_path, file_lock

RECORD_FIELDS = ("key", "model", "kind", "messages", "image", "image_position", "sampling", "outputs")


def default_generation_cache() -> Path:
    """Where generated texts are cached unless the caller says otherwise: ``generations.jsonl`` in the cirlab
    cache root (``$CIRLAB_CACHE``, else ``$XDG_CACHE_HOME/cirlab``, else ``~/.cache/cirlab``); read on each call."""
    if os.environ.get("CIRLAB_CACHE"):
        return Path(os.environ["CIRLAB_CACHE"]).expanduser() / "generations.jsonl"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "cirlab" / "generations.jsonl"


def _check(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [f for f in RECORD_FIELDS if f not in record]
    if missing:
        raise ValueError(f"{where}: a generated-text record without {missing}")
    outputs = record["outputs"]
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise ValueError(f"{where}: 'outputs' must be a list of strings")
    return record


def read_records(path: str | Path) -> dict[str, dict[str, Any]]:
    """The records of a JSONL cache file by key (later lines win).

    Raises:
        ValueError: naming the file and line of a malformed record.
    """
    path = Path(path)
    records: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON record ({err.msg})") from None
            record = _check(record, f"{path}:{number}")
            records[record["key"]] = record
    return records


def write_records(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Writes records as JSON Lines, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps({f: record[f] for f in RECORD_FIELDS}, ensure_ascii=False) + "\n")


class TextCache:
    """Generated texts by key, in memory and (with a ``path``) in a JSONL file.

    Args:
        path: the JSONL file to read and extend; None keeps the cache in memory only.

    Attributes:
        used: keys looked up or added through this object, in first-use order (what ``export`` writes).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._loaded: dict[str, dict[str, Any]] | None = None
        self._pending: dict[str, dict[str, Any]] = {}
        self.used: dict[str, None] = {}

    @property
    def _records(self) -> dict[str, dict[str, Any]]:
        # The file is read on first use: a cache handed to a method that never generates costs nothing.
        if self._loaded is None:
            self._loaded = read_records(self.path) if self.path is not None and self.path.is_file() else {}
        return self._loaded

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def get(self, key: str) -> dict[str, Any] | None:
        """The record of ``key``, or None."""
        record = self._records.get(key)
        if record is not None:
            self.used[key] = None
        return record

    def put(self, record: dict[str, Any]) -> None:
        """Adds a record (written by the next ``flush``)."""
        record = _check(record, "generated-text record")
        self._records[record["key"]] = record
        self._pending[record["key"]] = record
        self.used[record["key"]] = None

    def flush(self) -> None:
        """Writes pending records: under a lock, re-reads the file (other writers), merges and replaces it."""
        if self.path is None or not self._pending:
            self._pending.clear()
            return
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            on_disk = read_records(self.path) if self.path.is_file() else {}
            on_disk.update(self._pending)
            write_records(self.path, on_disk.values())
        for key, record in on_disk.items():
            self._records.setdefault(key, record)
        self._pending.clear()

    def export(self, path: str | Path, keys: Iterable[str] | None = None) -> int:
        """Writes the records of ``keys`` (default: every key used through this object) to ``path``; returns how
        many. This is the file to ship with a submission: it holds every text the result was computed from."""
        chosen = list(self.used if keys is None else keys)
        missing = [k for k in chosen if k not in self._records]
        if missing:
            raise KeyError(f"no generated text under keys {missing[:3]}")
        write_records(path, (self._records[k] for k in chosen))
        return len(chosen)
