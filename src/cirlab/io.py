"""Small file helpers shared by every writer: atomic, durable writes, so nothing is ever left half-written.

A file is written under a temporary name beside its destination, flushed to disk (``fsync``), renamed onto its
destination, and the directory is flushed too, so that after a crash or a power cut a reader finds either the old
file or the whole new one. Files get the mode the process's umask gives a new file (``0o666 & ~umask``), like any
file ``open`` creates, so that an index or checkpoint written by one account can be read by another.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

FULL_DISK_BYTES = 1 << 20
"""Below this much free space a failed write is reported as a full disk, naming the file."""


class LockHeldError(RuntimeError):
    """Another process holds a lock that this one was told not to wait for; the message names it."""


def _unique_name(directory: Path, prefix: str, suffix: str) -> Path:
    return directory / f"{prefix}{uuid.uuid4().hex[:12]}{suffix}"


def create_temp_file(directory: Path, prefix: str, suffix: str = ".tmp") -> Path:
    """Creates an empty file with a fresh name in ``directory`` and returns its path.

    Unlike ``tempfile.mkstemp`` (always ``0o600``), the file gets the umask's mode for new files.
    """
    while True:
        path = _unique_name(directory, prefix, suffix)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue


def create_temp_dir(directory: Path, prefix: str, suffix: str = "") -> Path:
    """Creates an empty directory with a fresh name in ``directory`` (mode ``0o777 & ~umask``)."""
    while True:
        path = _unique_name(directory, prefix, suffix)
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue


def fsync_file(path: str | os.PathLike) -> None:
    """Flushes a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flushes a directory's entries (the renames into it) to disk; a no-op where the filesystem cannot do it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _disk_full(directory: Path) -> bool:
    """Whether the filesystem holding ``directory`` has (almost) no space left for this process."""
    try:
        return os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize < FULL_DISK_BYTES
    except OSError:
        return False


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` as an OSError naming ``path`` (the destination, not a temporary name nobody asked for)."""
    named = OSError(err.errno, err.strerror or str(err), str(path))
    named.__cause__ = err
    return named


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it is flushed and renamed onto ``path``, on error removed.

    The temporary file lives in the destination folder so the final ``os.replace`` is atomic on POSIX.

    Args:
        path: the destination.
        durable: ``fsync`` the file before the rename and the directory after it, so a power cut right after the
            block cannot leave an empty or missing file (the default; turn off only for scratch files).

    Raises:
        OSError: a failed write (a full disk, say) names ``path``; the temporary is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = create_temp_file(path.parent, f".{path.name}.")
    try:
        yield tmp_path
        if durable:
            fsync_file(tmp_path)
        os.replace(tmp_path, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException as err:
        tmp_path.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename in (None, str(tmp_path)):
            raise _naming(err, path) from err
        if isinstance(err, Exception) and not isinstance(err, OSError) and _disk_full(path.parent):
            # Writers such as torch.save and safetensors report a full disk in their own words, naming no file.
            raise OSError(errno.ENOSPC, f"No space left on device ({type(err).__name__}: {err})", str(path)) from err
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


class FileLock:
    """An exclusive ``fcntl.flock`` on a lock file (created if needed): one process at a time holds it.

    The lock is released by ``release``, or when the holder exits or is killed, so a crash never leaves it taken.
    The holder's pid is written into the file, for the message another process gets. Use ``file_lock`` for a
    block; hold a ``FileLock`` itself when the lock outlives a call (a claim on work, released once it is done).

    Args:
        path: the lock file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file: Any = None

    def acquire(self, wait: bool = True) -> bool:
        """Takes the lock, waiting for its holder when ``wait``; without waiting, returns False when it is held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 (held open while the lock is: closing it releases the flock)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            f.truncate(0)
            f.write(str(os.getpid()))
            f.flush()
        except BlockingIOError:
            f.close()
            return False
        except BaseException:
            f.close()
            raise
        self._file = f
        return True

    def holder(self) -> str:
        """Who holds the lock, as the message to a waiting process says it (``process 1234``)."""
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f"process {pid}" if pid.isdigit() else "another process"

    def release(self) -> None:
        """Lets go of the lock (a no-op when not held)."""
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, wait: bool = True, purpose: str = "") -> Iterator[None]:
    """Holds a ``FileLock`` on ``path`` for the block: one process at a time.

    Args:
        path: the lock file.
        wait: wait for the holder to finish (default); False raises ``LockHeldError`` at once instead.
        purpose: what the lock protects, for that message (e.g. ``"training into runs/p2w"``).

    Raises:
        LockHeldError: ``wait`` is False and another process holds the lock.
    """
    lock = FileLock(path)
    if not lock.acquire(wait):
        raise LockHeldError(
            f"{lock.path}: {lock.holder()} holds this lock{f' ({purpose})' if purpose else ''}; wait for it to finish"
        )
    try:
        yield
    finally:
        lock.release()


def regular_file_error(path: str | os.PathLike, st: os.stat_result) -> str | None:
    """Why ``path`` (with stat ``st``) is not something cirlab reads as a file, or None for a regular file."""
    if stat.S_ISREG(st.st_mode):
        return None
    kind = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a named pipe",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    what = next((name for test, name in kind.items() if test(st.st_mode)), "not a regular file")
    return f"{path}: {what}, not a regular file; refusing to read it"


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """Opens ``path`` for reading only when it is a regular file, never blocking on a pipe or a device.

    Raises:
        OSError: the file is missing, unreadable, or not a regular file (the message names it).
    """
    st = os.stat(path)
    why = regular_file_error(path, st)
    if why is None:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            why = regular_file_error(path, os.fstat(fd))  # it may have been swapped since the stat
        except BaseException:
            os.close(fd)
            raise
        if why is None:
            return os.fdopen(fd, "rb")
        os.close(fd)
    raise (IsADirectoryError if stat.S_ISDIR(st.st_mode) else OSError)(why)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def replace_dir(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Renames the finished directory ``src`` onto ``dest`` (same filesystem), replacing an existing ``dest``.

    Everything in ``src`` is flushed to disk first. The old ``dest`` is renamed aside before and deleted after, so
    at no moment is a half-written directory under the name ``dest``, and a crash in between leaves the old copy
    intact beside it (``.<name>.old.*``).
    """
    src, dest = Path(src), Path(dest)
    _fsync_tree(src)
    old = None
    if dest.exists():
        old = create_temp_dir(dest.parent, f".{dest.name}.old.")
        os.replace(dest, old / dest.name)
    os.replace(src, dest)
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically and durably."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically and durably."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Serialises ``obj`` as JSON into ``path`` atomically and durably."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice (the JSON spec leaves the meaning open; cirlab refuses such files)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(f"duplicate key {key!r} in one JSON object")
            seen.add(key)
    return obj


def read_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file, raising ``ValueError`` that names the file when it is missing or malformed.

    An object that names a key twice is malformed here: parsers disagree on which value wins (Python's keeps the
    last), so a file that means two things is refused instead of read one way.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except DuplicateKeyError as err:
        raise ValueError(f"{path}: malformed JSON: {err}") from None
