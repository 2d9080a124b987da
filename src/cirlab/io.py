"""Small file helpers shared by every writer: atomic writes so nothing is ever left half-written."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    The temporary file lives in the destination folder so the final ``os.replace`` is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Deletes the temporaries :func:`atomic_path` left beside ``path`` when a writer was killed; returns them.

    Only for files with a single writer (a run's own checkpoint and log): a concurrent writer's temporary would
    be deleted too.
    """
    path = Path(path)
    stale = list(path.parent.glob(f".{glob.escape(path.name)}.*.tmp")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Holds an exclusive ``fcntl.flock`` on ``path`` (created if needed) for the block: one process at a time.

    The lock is released when the holder exits or is killed, so a crash never leaves it taken.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def replace_dir(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Renames the finished directory ``src`` onto ``dest`` (same filesystem), replacing an existing ``dest``.

    The old ``dest`` is renamed aside before and deleted after, so at no moment is a half-written directory
    under the name ``dest``, and a crash in between leaves the old copy intact beside it (``.<name>.old.*``).
    """
    src, dest = Path(src), Path(dest)
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Serialises ``obj`` as JSON into ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file, raising ``ValueError`` that names the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
