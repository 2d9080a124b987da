"""Content hashes: the identity under which an image's features are cached.

A file is identified by a BLAKE2b-128 digest of its bytes, so a renamed or copied image reuses its features and
an edited one is recomputed. Hashing CIRCO's 123,403 images on every run would cost minutes of I/O, so
:class:`StatMemo` remembers ``path -> digest`` together with the file's stat signature (device, inode, size,
mtime and ctime in nanoseconds); any change to the signature means the file is hashed again. ctime cannot be
set from user space, so even a tool that restores mtime after rewriting a file invalidates the memo entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import stat
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cirlab.io import open_regular_file, regular_file_error

DIGEST_SIZE = 16
"""Bytes of BLAKE2b output: 128 bits, 32 hex characters; collisions are not a practical concern."""

READ_CHUNK = 1 << 20
"""Bytes read per step while hashing, so a large file never sits in memory whole."""


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    """Hex digest of raw bytes; equals :func:`hash_file` of a file holding exactly those bytes."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).hexdigest()


def hash_array(array: np.ndarray) -> str:
    """Hex digest of an in-memory image (e.g. a rendered Shapes image), covering its dtype and shape too."""
    array = np.ascontiguousarray(array)
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    h.update(f"ndarray:{array.dtype.str}:{array.shape}:".encode())
    h.update(memoryview(array).cast("B"))
    return h.hexdigest()


def hash_file(path: str | os.PathLike) -> str:
    """Hex digest of a regular file's bytes, read in chunks.

    Raises:
        OSError: the file is missing, unreadable or not a regular file (a named pipe or a device is never opened:
            reading one could block forever or never end); the message names the path.
    """
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    with open_regular_file(path) as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def stat_signature(st: os.stat_result) -> str:
    """Everything about a file's stat that changes when its content may have changed."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class StatMemo:
    """A persistent ``absolute path -> (stat signature, digest)`` table in SQLite.

    SQLite gives concurrent processes safe, incremental updates of a table with 100K+ rows, which a JSON file
    rewritten on every run would not. The memo is only a shortcut: a lookup counts only when the signature
    matches the file's current stat.
    """

    LOOKUP_BATCH = 500  # SQLite caps the number of bound parameters per statement

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A connection per operation: nothing open survives a fork, and a writer waits up to 60 s for another.
        conn = sqlite3.connect(self.path, timeout=60)
        try:
            with conn:
                conn.execute("CREATE TABLE IF NOT EXISTS memo (path TEXT PRIMARY KEY, sig TEXT, digest TEXT)")
                yield conn
        finally:
            conn.close()

    def lookup(self, paths: Sequence[str]) -> dict[str, tuple[str, str]]:
        """``path -> (signature, digest)`` for the given absolute paths that the memo knows."""
        found: dict[str, tuple[str, str]] = {}
        with self._connect() as conn:
            for start in range(0, len(paths), self.LOOKUP_BATCH):
                batch = list(paths[start : start + self.LOOKUP_BATCH])
                marks = ",".join("?" * len(batch))
                for path, sig, digest in conn.execute(
                    f"SELECT path, sig, digest FROM memo WHERE path IN ({marks})", batch
                ):
                    found[path] = (sig, digest)
        return found

    def store(self, entries: Sequence[tuple[str, str, str]]) -> None:
        """Records ``(path, signature, digest)`` triples, replacing older entries for the same paths."""
        if entries:
            with self._connect() as conn:
                conn.executemany("INSERT OR REPLACE INTO memo (path, sig, digest) VALUES (?, ?, ?)", entries)


def _hash_with_signature(path: str) -> tuple[str, str | None]:
    """(digest, signature) of a file; signature None when the file changed while being hashed."""
    before = stat_signature(os.stat(path))
    digest = hash_file(path)
    after = stat_signature(os.stat(path))
    return digest, (before if before == after else None)


def hash_files(
    paths: Sequence[str | os.PathLike], memo: StatMemo | None = None, workers: int = 4
) -> list[str | OSError]:
    """Content digest of every file, or the ``OSError`` that reading it raised, in the order of ``paths``.

    Args:
        paths: image files.
        memo: stat memo to consult and update; None hashes every file.
        workers: threads reading files concurrently (hashlib releases the GIL, reads are I/O-bound).

    Returns:
        Per path, its hex digest or the OSError (with ``filename`` set) that prevented reading it.
    """
    absolute = [os.path.abspath(p) for p in paths]
    unique = list(dict.fromkeys(absolute))
    known = memo.lookup(unique) if memo is not None else {}
    results: dict[str, str | OSError] = {}
    todo: list[str] = []
    for path in unique:
        try:
            st = os.stat(path)
            why = regular_file_error(path, st)
            if why is not None:
                raise (IsADirectoryError if stat.S_ISDIR(st.st_mode) else OSError)(why)
            sig = stat_signature(st)
        except OSError as err:
            results[path] = err
            continue
        if path in known and known[path][0] == sig:
            results[path] = known[path][1]
        else:
            todo.append(path)

    def attempt(path: str) -> tuple[str, str | None] | OSError:
        try:
            return _hash_with_signature(path)
        except OSError as err:
            return err

    fresh: list[tuple[str, str, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for path, outcome in zip(todo, pool.map(attempt, todo), strict=True):
            if isinstance(outcome, OSError):
                results[path] = outcome
            else:
                results[path] = outcome[0]
                if outcome[1] is not None:
                    fresh.append((path, outcome[1], outcome[0]))
    if memo is not None:
        memo.store(fresh)
    return [results[p] for p in absolute]
