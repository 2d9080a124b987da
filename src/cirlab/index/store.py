"""The on-disk format of a gallery index: one manifest that commits a generation of data files.

Layout of ``INDEX_DIR``::

    index.json                 the manifest: format version, model config, counts, data file names, build report
    embeddings-<gen>.npy       (N, d) float32, L2-normalised gallery embeddings in the method's retrieval space
    items-<gen>.json           {"paths": [...], "digests": [...]}: row i is the image at ``root / paths[i]``
    ann-<gen>.faiss            the approximate index, when one was built
    .lock                      flock'ed while a build writes and cleans up
    .cirlab-index              marks the directory as an index's from the first build on (see ``claim_directory``)

Every data file of a build carries that build's generation id and is written under a temporary name and renamed
into place; ``index.json`` is replaced last, atomically, and is the commit point. A build killed at any moment
leaves either the previous manifest (whose files are still there: old generations are deleted only after the new
manifest is in place) or the new one with all of its files, never a manifest that points at partial data. Stray
files of an interrupted build are removed by the next build.

A build writes only into a directory that is new, empty, or already an index (``claim_directory``), and removes
only files named exactly as it names its own (``<kind>-<generation id>`` and their temporaries), so files of the
user's are never overwritten or deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cirlab.io import atomic_path, atomic_write_json, atomic_write_text, read_json

INDEX_FILE = "index.json"
MARKER_FILE = ".cirlab-index"
FORMAT = "cirlab-gallery-index"
VERSION = 1
_GENERATION = r"[0-9a-f]{12,}-[0-9a-f]{8}"  # new_generation(): nanoseconds in hex, then 8 hex digits
_DATA_NAME = rf"(embeddings-{_GENERATION}\.npy|items-{_GENERATION}\.json|ann-{_GENERATION}\.faiss)"
_DATA_FILE = re.compile(rf"^{_DATA_NAME}$")
_TEMP_FILE = re.compile(rf"^\.({_DATA_NAME}|index\.json|\.cirlab-index)\.[A-Za-z0-9_]+\.tmp$")


class IndexFormatError(ValueError):
    """An index directory is missing, incomplete or not a cirlab index; the message names the file."""


@dataclass
class StoredIndex:
    """What a committed generation holds: the manifest, the embeddings (memory-mapped) and the item table."""

    manifest: dict[str, Any]
    embeddings: np.ndarray
    paths: list[str]
    digests: list[str]
    ann_path: Path | None


def new_generation() -> str:
    """A fresh generation id: time-ordered for humans, unique across processes."""
    return f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock on an index directory, so two builds never clean up each other's files."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def claim_directory(directory: Path) -> None:
    """Makes ``directory`` an index directory, refusing one that holds anything else.

    A directory qualifies when it is new, empty, marked by an earlier build (``.cirlab-index``, written first, so a
    build killed before its first commit still counts), or holds a cirlab ``index.json`` (indexes written before
    the marker existed). The marker is written when missing.

    Raises:
        IndexFormatError: ``directory`` is a file, or a non-empty directory that is not a cirlab index.
    """
    if directory.exists() and not directory.is_dir():
        raise IndexFormatError(f"{directory}: exists and is not a directory; choose another --out")
    if directory.is_dir() and not (directory / MARKER_FILE).is_file() and any(directory.iterdir()):
        try:
            read_manifest(directory)
        except IndexFormatError:
            raise IndexFormatError(
                f"{directory}: not empty and not a cirlab index (no {MARKER_FILE} or cirlab {INDEX_FILE}); refusing "
                "to write an index among other files (a build replaces and removes files in its directory); "
                "choose a new or empty directory"
            ) from None
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / MARKER_FILE).is_file():
        atomic_write_text(directory / MARKER_FILE, f"{FORMAT}: this directory is a cirlab gallery index\n")


def write_generation(
    directory: Path,
    manifest: dict[str, Any],
    embeddings: np.ndarray,
    paths: list[str],
    digests: list[str],
    write_ann: Any = None,
) -> None:
    """Writes a new generation's data files, then commits it by replacing ``index.json``; then removes old files.

    Args:
        directory: the index directory (created if needed).
        manifest: everything but ``format``, ``version``, ``generation``, ``count``, ``dim`` and ``files``, which
            are filled here.
        embeddings: (N, d) float32 gallery embeddings.
        paths: N image paths relative to the gallery root.
        digests: N content digests of those images.
        write_ann: None, or a function writing the approximate index to the path it is given.
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) != len(paths) or len(paths) != len(digests):
        raise ValueError(
            f"inconsistent index: embeddings {embeddings.shape}, {len(paths)} paths, {len(digests)} digests"
        )
    gen = new_generation()
    files = {"embeddings": f"embeddings-{gen}.npy", "items": f"items-{gen}.json", "ann": None}
    with build_lock(directory):
        with atomic_path(directory / files["embeddings"]) as tmp, open(tmp, "wb") as f:
            np.save(f, embeddings)
        atomic_write_json(directory / files["items"], {"paths": paths, "digests": digests}, indent=None)
        if write_ann is not None:
            files["ann"] = f"ann-{gen}.faiss"
            with atomic_path(directory / files["ann"]) as tmp:
                write_ann(tmp)
        full = {
            "format": FORMAT,
            "version": VERSION,
            "generation": gen,
            "count": len(paths),
            "dim": int(embeddings.shape[1]),
            "files": files,
            **manifest,
        }
        atomic_write_json(directory / INDEX_FILE, full)  # the commit point
        _remove_stale(directory, {name for name in files.values() if name})


def _remove_stale(directory: Path, keep: set[str]) -> None:
    """Deletes data files of other generations and temporary files left by interrupted builds."""
    for path in directory.iterdir():
        if (_DATA_FILE.match(path.name) and path.name not in keep) or _TEMP_FILE.match(path.name):
            path.unlink(missing_ok=True)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an index directory, checked for format and version.

    Raises:
        IndexFormatError: naming the directory or file and what is wrong.
    """
    directory = Path(directory)
    path = directory / INDEX_FILE
    if not directory.is_dir():
        raise IndexFormatError(f"{directory}: index directory not found (build one with `cirlab index build`)")
    if not path.is_file():
        raise IndexFormatError(f"{path}: not found; {directory} is not a cirlab index (run `cirlab index build`)")
    try:
        manifest = read_json(path)
    except ValueError as err:
        raise IndexFormatError(str(err)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{path}: not a cirlab gallery index manifest")
    if manifest.get("version") != VERSION:
        raise IndexFormatError(f"{path}: index format version {manifest.get('version')}, this cirlab reads {VERSION}")
    for key in ("generation", "count", "dim", "files", "root", "model"):
        if key not in manifest:
            raise IndexFormatError(f"{path}: missing key {key!r}")
    return manifest


def read_generation(directory: str | os.PathLike, attempts: int = 3) -> StoredIndex:
    """Loads the committed generation of an index directory.

    A build may commit a newer generation (and delete this one's files) between reading the manifest and opening
    its files; the read is then retried with the new manifest.

    Raises:
        IndexFormatError: naming the file that is missing or inconsistent.
    """
    directory = Path(directory)
    for attempt in range(attempts):
        manifest = read_manifest(directory)
        try:
            return _read_files(directory, manifest)
        except FileNotFoundError as err:
            if attempt == attempts - 1 or read_manifest(directory)["generation"] == manifest["generation"]:
                raise IndexFormatError(f"{err.filename}: data file of {directory / INDEX_FILE} is missing") from None
    raise AssertionError("unreachable")


def _read_files(directory: Path, manifest: dict[str, Any]) -> StoredIndex:
    files = manifest["files"]
    count, dim = int(manifest["count"]), int(manifest["dim"])
    emb_path = directory / files["embeddings"]
    try:
        embeddings = np.load(emb_path, mmap_mode="r")  # (N, d)
    except (ValueError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise IndexFormatError(f"{emb_path}: unreadable embeddings ({err})") from None
    if embeddings.dtype != np.float32 or embeddings.shape != (count, dim):
        raise IndexFormatError(
            f"{emb_path}: expected float32 ({count}, {dim}), found {embeddings.dtype} {embeddings.shape}"
        )
    items_path = directory / files["items"]
    if not items_path.is_file():
        raise FileNotFoundError(2, "not found", str(items_path))
    try:
        items = read_json(items_path)
    except ValueError as err:
        raise IndexFormatError(str(err)) from None
    paths, digests = items.get("paths"), items.get("digests")
    if not isinstance(paths, list) or not isinstance(digests, list) or not len(paths) == len(digests) == count:
        raise IndexFormatError(f"{items_path}: expected {count} paths and digests")
    ann_path = directory / files["ann"] if files.get("ann") else None
    if ann_path is not None and not ann_path.is_file():
        raise FileNotFoundError(2, "not found", str(ann_path))
    return StoredIndex(manifest, embeddings, paths, digests, ann_path)


def describe(manifest: dict[str, Any]) -> str:
    """One line about an index: size, model and search mode."""
    model = manifest["model"]
    ann = manifest.get("approximate")
    mode = "exact" if not ann else f"{ann['kind']} (recall@{ann['k']} {ann['recall']:.3f} vs exact)"
    method = model.get("checkpoint") or model["method"]
    return f"{manifest['count']} images, {manifest['dim']}-d, backbone {model['backbone']}, method {method}, {mode}"
