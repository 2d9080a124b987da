"""Content-hashed feature store: image features cached by (encoder identity, image bytes) (STYLE.md rule 10).

Every method, the evaluator and the gallery index read image features through one :class:`FeatureCache`, so a
gallery is encoded once per (backbone, weights, preprocessing) and frozen-backbone training reads cached features
instead of re-encoding. The cache is generic over the encoder: the caller names it with :func:`encoder_key` and
supplies the function that encodes a batch; nothing here imports torch.

Layout under ``root``::

    hash_memo.sqlite                        path -> content digest, keyed by stat (hashing.StatMemo)
    <encoder_key>/manifest.json             storage dtype, array shapes, committed shards in commit order
    <encoder_key>/.lock                     flock'ed around manifest updates and shard renames
    <encoder_key>/shards/<id>.keys.npy      the content key of every row of shard <id>
    <encoder_key>/shards/<id>.<name>.npy    one array per output name, (rows, *shape), memory-mapped on read
    <encoder_key>/claims/<chunk>.lock       flock'ed by the process encoding that chunk of items (work sharing)

Writes are append-only, crash-safe and durable: a shard's files are written with plain writes under temporary
names (each ``flock``-ed by its writer), flushed to disk, renamed into place and added to the manifest (replaced
atomically) in one step under the lock. A crash leaves at most temporaries or unreferenced files, which the next
writer of that encoder key deletes (a temporary whose lock it can take has no live writer), never a manifest that
points at partial data; shards committed before it stay usable. A full disk fails a write with an ``OSError``
naming the shard file, and its temporaries are deleted.

Progress is committed when a shard fills (``shard_bytes``) and every ``commit_seconds`` (10 s by default), so an
interrupted run of any size resumes where it stopped. When ``encode_fn`` raises, and on an interrupt
(``KeyboardInterrupt``, Ctrl-C), the complete rows of the shard in progress are committed before it propagates.

Processes may fill one cache concurrently: shard names are unique and a manifest update re-reads the manifest
under the lock. Processes asking for the same items share the work: each claims a chunk of items before encoding
it, skips chunks another process has claimed, and at the end waits for those and encodes only what is still
missing (``_EncodeRun``). When two of them computed the same image anyway, the shard committed first wins.
Locking uses ``fcntl.flock`` (POSIX). One ``FeatureCache`` object is not thread-safe. Caches written by earlier
cirlab versions read as before, but processes writing one cache at the same time must all run this version (an
earlier writer renamed its files outside the lock, so they could be taken for a killed writer's leftovers).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cirlab.features.hashing import StatMemo, hash_bytes, hash_files
from cirlab.io import FileLock, atomic_write_json, create_temp_file, file_lock, fsync_dir, read_json

if TYPE_CHECKING:
    from cirlab.distributed import World

OnError = Literal["raise", "skip"]
EncodeOutput = Any  # an (B, ...) array / tensor, or a mapping name -> (B, ...) array / tensor
Progress = Callable[[int, int], None]

MANIFEST_VERSION = 1
SHARD_BYTES = 256 << 20
"""Largest shard (about 87K rows of 768 float32); a shard is committed when it is this full."""

COMMIT_SECONDS = 10.0
"""A shard is also committed once it has been open this long, so a crash loses at most this much encoding."""

CLAIM_ITEMS = 256
"""Average items per claimed chunk when processes share the encoding (see ``claim_chunks``)."""

OPEN_MAPS = 256
"""Shard arrays one encoder key keeps memory-mapped at once. Each map holds a file descriptor, and commits every
``COMMIT_SECONDS`` make many small shards, so the least recently used maps are let go beyond this."""

READ_BLOCK_BYTES = 64 << 20
"""Bytes gathered from a shard per step when assembling features, bounding temporary memory."""

STORAGE_DTYPES = ("float32", "float16")
_ARRAY_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_ENCODER_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def default_cache_dir() -> Path:
    """Where features are cached unless the caller says otherwise.

    ``$CIRLAB_CACHE/features`` when ``CIRLAB_CACHE`` is set (the root of every cirlab cache), else
    ``$XDG_CACHE_HOME/cirlab/features``, else ``~/.cache/cirlab/features``. Read on each call; nothing is kept.
    """
    if os.environ.get("CIRLAB_CACHE"):
        return Path(os.environ["CIRLAB_CACHE"]).expanduser() / "features"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "cirlab" / "features"


def encoder_key(backbone_id: str, weights_id: str, transform_id: str) -> str:
    """A directory-safe name for everything that determines an image's features.

    Args:
        backbone_id: the architecture (e.g. ``"hf-clip:openai/clip-vit-large-patch14"``).
        weights_id: the exact weights (a checkpoint hash or revision), so fine-tuned weights never share entries.
        transform_id: the preprocessing (resolution, crop, normalisation) and anything else that changes what
            ``encode_fn`` returns, e.g. whether patch tokens are included.

    Returns:
        ``"<readable backbone prefix>-<20 hex digits>"``; equal inputs give equal keys.
    """
    identity = json.dumps([backbone_id, weights_id, transform_id]).encode()
    prefix = re.sub(r"[^A-Za-z0-9]+", "-", backbone_id).strip("-")[:40] or "encoder"
    return f"{prefix}-{hash_bytes(identity)[:20]}"


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; duck-typed so that this module never imports torch
        x = x.detach().cpu()
        if x.is_floating_point() and x.element_size() < 4:
            x = x.float()  # numpy has no bfloat16
        x = x.numpy()
    return np.asarray(x)


def _as_arrays(raw: EncodeOutput, n_items: int) -> dict[str, np.ndarray]:
    """Validates what ``encode_fn`` returned for ``n_items`` items: name -> (n_items, ...) float array."""
    named = raw.items() if isinstance(raw, Mapping) else [("embeds", raw)]
    arrays = {}
    for name, value in named:
        if not isinstance(name, str) or not _ARRAY_NAME.match(name):
            raise ValueError(f"encode_fn output name {name!r} must match [A-Za-z0-9_]+")
        arr = _to_numpy(value)
        if arr.ndim < 1 or arr.shape[0] != n_items:
            raise ValueError(f"encode_fn returned {name!r} of shape {arr.shape} for {n_items} items")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"encode_fn returned {name!r} of dtype {arr.dtype}; features must be floating point")
        arrays[name] = arr
    if not arrays:
        raise ValueError("encode_fn returned no arrays")
    return arrays


def _schema(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Name -> per-item shape, names sorted."""
    return {name: tuple(int(s) for s in arrays[name].shape[1:]) for name in sorted(arrays)}


def _new_shard_id() -> str:
    # Time-ordered for humans, unique across processes and machines sharing a filesystem.
    return f"{time.time_ns():x}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class _Namespace:
    """One encoder key's directory: its manifest, the key -> (shard, row) index and the open memory maps.

    Shards are only ever appended to the manifest, so refreshing reads just the shards committed since.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.shard_dir = directory / "shards"
        self.claim_dir = directory / "claims"
        self.dtype: str | None = None
        self.arrays: dict[str, tuple[int, ...]] = {}
        self.shards: list[dict[str, Any]] = []
        self.index: dict[str, tuple[int, int]] = {}
        self._maps: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()  # at most OPEN_MAPS, LRU
        self._cleaned = False

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def _read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.is_file():
            return None
        manifest = read_json(self.manifest_path)
        if manifest.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{self.manifest_path}: unsupported feature cache version {manifest.get('version')}")
        return manifest

    def refresh(self) -> None:
        """Loads shards committed (by any process) since the last refresh."""
        manifest = self._read_manifest()
        if manifest is None:
            return
        self.dtype = manifest["dtype"]
        self.arrays = {name: tuple(shape) for name, shape in manifest["arrays"].items()}
        for pos in range(len(self.shards), len(manifest["shards"])):
            entry = manifest["shards"][pos]
            keys = np.load(self.shard_dir / f"{entry['id']}.keys.npy")  # (rows,) unicode
            for row, key in enumerate(keys.tolist()):
                self.index.setdefault(key, (pos, row))  # the first committed copy wins
            self.shards.append(entry)

    def check_schema(self, dtype: str, arrays: Mapping[str, tuple[int, ...]]) -> None:
        """Raises ``ValueError`` when this namespace already stores a different dtype or set of arrays."""
        if self.dtype is not None and self.dtype != dtype:
            raise ValueError(f"{self.dir}: features are stored as {self.dtype}, not {dtype}")
        if self.arrays and self.arrays != dict(arrays):
            raise ValueError(
                f"{self.dir}: this encoder key stores arrays {self.arrays} but encode_fn returned {dict(arrays)};"
                " outputs that differ need their own encoder key (see encoder_key's transform_id)"
            )

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive inter-process lock on this namespace (``fcntl.flock`` on ``.lock``)."""
        with file_lock(self.dir / ".lock"):
            yield

    def remove_stale(self) -> list[Path]:
        """Deletes what killed writers left behind; call under :meth:`lock`. Returns the removed paths.

        A writer creates its temporaries under the lock and holds an ``flock`` on each until it commits or gives
        up, so a temporary whose lock can be taken belongs to a dead process. Shard files are renamed to their
        final names only under the lock, together with the manifest update, so a final-named file that the
        manifest does not list was left by a writer killed in between. Manifest temporaries are written only
        under the lock, so any found while holding it are stale.
        """
        removed = []
        self.refresh()
        committed = {entry["id"] for entry in self.shards}
        if self.shard_dir.is_dir():
            for path in self.shard_dir.iterdir():
                if path.name.endswith(".tmp"):
                    if not _held_by_a_live_writer(path):
                        path.unlink(missing_ok=True)
                        removed.append(path)
                elif path.name.endswith(".npy") and path.name.split(".", 1)[0] not in committed:
                    path.unlink(missing_ok=True)
                    removed.append(path)
        for path in self.dir.glob(".manifest.json.*.tmp"):
            path.unlink(missing_ok=True)
            removed.append(path)
        return removed

    def commit(self, writer: _ShardWriter) -> None:
        """Renames a finished shard's files into place and appends it to the manifest (one locked step)."""
        with self.lock():
            manifest = self._read_manifest() or {
                "version": MANIFEST_VERSION,
                "dtype": writer.dtype,
                "arrays": {name: list(shape) for name, shape in writer.shapes.items()},
                "shards": [],
            }
            self.dtype = manifest["dtype"]
            self.arrays = {name: tuple(shape) for name, shape in manifest["arrays"].items()}
            self.check_schema(writer.dtype, writer.shapes)  # another process may have created the namespace
            writer.rename_into_place()
            manifest["shards"].append({"id": writer.shard_id, "rows": writer.rows})
            atomic_write_json(self.manifest_path, manifest)
        self.refresh()

    def memmap(self, pos: int, name: str) -> np.ndarray:
        """Read-only memory map of array ``name`` of the shard at manifest position ``pos``, (rows, *shape)."""
        mm = self._maps.get((pos, name))
        if mm is not None:
            self._maps.move_to_end((pos, name))
            return mm
        entry = self.shards[pos]
        full = np.load(self.shard_dir / f"{entry['id']}.{name}.npy", mmap_mode="r")
        mm = self._maps[pos, name] = full[: entry["rows"]]
        while len(self._maps) > OPEN_MAPS:
            self._maps.popitem(last=False)  # its descriptor closes once no caller holds a view of it
        return mm


def _held_by_a_live_writer(path: Path) -> bool:
    """Whether some process holds an ``flock`` on ``path`` (a writer still filling it)."""
    try:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
    except FileNotFoundError:
        return True  # gone already


class _ShardWriter:
    """Fills one new shard with plain sequential writes under temporary names, each held under an ``flock``.

    No memory map is written to: a full disk then fails a ``write`` with an ``OSError`` naming the file (a memory
    map over a sparse file gets SIGBUS instead, killing the process without a word). Each ``.npy`` temporary
    starts with a header for 0 rows; :meth:`finish` rewrites it for the rows written (numpy pads headers so that
    the row count can grow in place), cuts off anything past them, and flushes everything to disk.
    """

    def __init__(self, ns: _Namespace, dtype: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.shard_id = _new_shard_id()
        self.dtype = dtype
        self.shapes = dict(shapes)
        self.rows = 0
        self._shard_dir = ns.shard_dir
        self._keys: list[str] = []
        self._files: dict[str, tuple[Path, Any]] = {}  # name -> (temporary, open file holding its flock)
        self._header: dict[str, int] = {}  # name -> header bytes
        with ns.lock():  # created under the namespace lock, so a cleaner never sees them unlocked
            if not ns._cleaned:
                ns.remove_stale()
                ns._cleaned = True
            self._shard_dir.mkdir(parents=True, exist_ok=True)
            try:
                for name in (*self.shapes, "keys"):
                    tmp = create_temp_file(self._shard_dir, f".{self.shard_id}.{name}.npy.")
                    f = open(tmp, "r+b")  # noqa: SIM115 (kept open, and locked, until the shard is committed)
                    self._files[name] = (tmp, f)
                    fcntl.flock(f, fcntl.LOCK_EX)
                for name, shape in self.shapes.items():
                    self._write_header(name, (0, *shape))
            except BaseException:
                self.discard()
                raise

    def final_path(self, name: str) -> Path:
        return self._shard_dir / f"{self.shard_id}.{name}.npy"

    def _write_header(self, name: str, shape: tuple[int, ...]) -> None:
        _tmp, f = self._files[name]
        header = {"descr": np.dtype(self.dtype).str, "fortran_order": False, "shape": shape}
        try:
            f.seek(0)
            np.lib.format.write_array_header_1_0(f, header)
            self._header[name] = f.tell()
        except OSError as err:
            raise _full_disk_error(err, self.final_path(name)) from err

    def append(self, keys: Sequence[str], arrays: Mapping[str, np.ndarray]) -> None:
        """Writes the rows of ``keys`` (cast to the storage dtype); they count only once every array has them."""
        for name in self.shapes:
            _tmp, f = self._files[name]
            data = np.ascontiguousarray(arrays[name], dtype=self.dtype)
            try:
                f.seek(self._header[name] + self.rows * _row_bytes(self.shapes[name], self.dtype))
                f.write(memoryview(data).cast("B"))
            except OSError as err:
                raise _full_disk_error(err, self.final_path(name)) from err
        self._keys.extend(keys)
        self.rows += len(keys)

    def finish(self) -> None:
        """Fixes the headers and lengths for the rows written, writes the keys, and flushes all files to disk."""
        for name, shape in self.shapes.items():
            self._write_header(name, (self.rows, *shape))
            _tmp, f = self._files[name]
            try:
                f.truncate(self._header[name] + self.rows * _row_bytes(shape, self.dtype))
            except OSError as err:
                raise _full_disk_error(err, self.final_path(name)) from err
        _tmp, f = self._files["keys"]
        try:
            f.seek(0)
            np.save(f, np.array(self._keys, dtype=str))  # (rows,) fixed-width unicode, no pickle
        except OSError as err:
            raise _full_disk_error(err, self.final_path("keys")) from err
        for name, (_tmp, f) in self._files.items():
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as err:
                raise _full_disk_error(err, self.final_path(name)) from err

    def rename_into_place(self) -> None:
        """Renames the finished temporaries onto their final names (under the namespace lock) and closes them."""
        for name, (tmp, _f) in self._files.items():
            os.replace(tmp, self.final_path(name))
        fsync_dir(self._shard_dir)
        self._close()

    def _close(self) -> None:
        for _tmp, f in self._files.values():
            with contextlib.suppress(OSError):  # flushing what is buffered fails again on a full disk
                f.close()  # releases its flock
        self._files.clear()

    def discard(self) -> None:
        """Deletes the temporaries of a shard that will not be committed."""
        for tmp, _f in self._files.values():
            tmp.unlink(missing_ok=True)  # before closing: a file still locked is never taken for a dead writer's
        self._close()


def _row_bytes(shape: tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _full_disk_error(err: OSError, path: Path) -> OSError:
    """A write error that names the shard file being written (``write`` itself names none)."""
    return OSError(err.errno, f"{err.strerror or err} while writing the feature cache", str(path))


class CachedFeatures:
    """Cached features of the requested items that succeeded, in request order.

    Arrays are assembled lazily from the memory-mapped shards: ``embeds`` (or :meth:`array`) builds one
    contiguous array a block at a time, or returns a read-only memory map when the items already sit in one
    shard in request order; :meth:`take` gathers a few rows (e.g. a training batch of patch tokens).

    Attributes:
        items: the requested paths (or keys) that have features, in request order (duplicates kept).
        keys: their content keys.
        positions: (N,) int64 index of each item in the original request.
        failed: item -> reason, for requests that have no features (only with ``on_error="skip"``).
        n_encoded: how many distinct items this call encoded (the rest came from the cache).
    """

    def __init__(
        self,
        namespace: _Namespace,
        items: list[Any],
        keys: list[str],
        positions: np.ndarray,
        failed: dict[Any, str],
        n_encoded: int,
    ) -> None:
        self.items = items
        self.keys = keys
        self.positions = positions
        self.failed = failed
        self.n_encoded = n_encoded
        self._ns = namespace
        located = [namespace.index[key] for key in keys]
        self._shard = np.array([s for s, _ in located], dtype=np.int64).reshape(-1)  # (N,)
        self._row = np.array([r for _, r in located], dtype=np.int64).reshape(-1)  # (N,)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def names(self) -> tuple[str, ...]:
        """The stored array names, e.g. ``("embeds",)`` or ``("embeds", "tokens")``."""
        return tuple(self._ns.arrays)

    @property
    def storage_dtype(self) -> str | None:
        return self._ns.dtype

    def _shape(self, name: str) -> tuple[int, ...]:
        if name not in self._ns.arrays:
            raise KeyError(f"no cached array {name!r}; stored: {', '.join(self._ns.arrays) or 'none'}")
        return self._ns.arrays[name]

    @cached_property
    def embeds(self) -> np.ndarray:
        """``array("embeds")`` as float32, (N, d), assembled once per object."""
        return self.array("embeds")

    def array(self, name: str = "embeds", dtype: Any = np.float32) -> np.ndarray:
        """Features of every item, (N, *shape).

        A memory map is returned (no copy) when all items are consecutive rows of one shard in request order
        and ``dtype`` is the storage dtype; otherwise a new contiguous array is filled a block at a time, so the
        shards are never loaded whole alongside it.
        """
        self._shape(name)
        n = len(self)
        if n and (self._shard == self._shard[0]).all() and (self._row == self._row[0] + np.arange(n)).all():
            mm = self._ns.memmap(int(self._shard[0]), name)
            if mm.dtype == np.dtype(dtype):
                return mm[self._row[0] : self._row[0] + n]
        return self.take(name, np.arange(n), dtype)

    def take(self, name: str, which: Sequence[int] | np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """Features of the items at positions ``which`` (indices into ``items``), (len(which), *shape)."""
        shape = self._shape(name)
        which = np.asarray(which, dtype=np.int64).reshape(-1)
        out = np.empty((len(which), *shape), dtype=dtype)  # (M, *shape)
        shards, rows = self._shard[which], self._row[which]
        if not len(which):
            return out
        order = np.lexsort((rows, shards))  # grouped by shard, rows ascending: sequential reads
        row_bytes = max(1, int(np.prod(shape, dtype=np.int64)) * np.dtype(self._ns.dtype).itemsize)
        block = max(1, READ_BLOCK_BYTES // row_bytes)
        for group in np.split(order, np.flatnonzero(np.diff(shards[order])) + 1):
            source = self._ns.memmap(int(shards[group[0]]), name)
            for start in range(0, len(group), block):
                sel = group[start : start + block]
                self._copy_rows(out, sel, source, rows[sel])
        return out

    @staticmethod
    def _copy_rows(out: np.ndarray, dest: np.ndarray, source: np.ndarray, rows: np.ndarray) -> None:
        """``out[dest] = source[rows]``, using slices (no temporary) when both index runs are consecutive."""
        src = source[rows[0] : rows[-1] + 1] if (np.diff(rows) == 1).all() else source[rows]
        if (np.diff(dest) == 1).all():
            out[dest[0] : dest[-1] + 1] = src
        else:
            out[dest] = src


class FeatureCache:
    """A directory of cached image features, shared by every encoder (see the module docstring).

    Example:
        >>> cache = FeatureCache(default_cache_dir())
        >>> key = encoder_key("hf-clip:openai/clip-vit-large-patch14", "main", "224-bicubic-center")
        >>> feats = cache.get_or_compute(paths, key, lambda batch: encode(batch), batch_size=128)
        >>> feats.embeds.shape
        (len(paths), 768)
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        shard_bytes: int = SHARD_BYTES,
        commit_seconds: float = COMMIT_SECONDS,
        hash_workers: int = 4,
        stat_memo: bool = True,
    ) -> None:
        """Opens (without creating anything yet) the cache at ``root``.

        Args:
            root: cache directory (see :func:`default_cache_dir`).
            shard_bytes: largest shard; a shard is committed when full.
            commit_seconds: a shard is also committed once open this long (what an interrupted run can lose).
            hash_workers: threads hashing image files.
            stat_memo: remember file digests by stat signature to skip re-hashing unchanged files.
        """
        if commit_seconds < 0 or shard_bytes < 1:
            raise ValueError(f"need shard_bytes >= 1 and commit_seconds >= 0, got {shard_bytes}, {commit_seconds}")
        self.root = Path(root)
        self.shard_bytes = shard_bytes
        self.commit_seconds = commit_seconds
        self.hash_workers = hash_workers
        self._memo = StatMemo(self.root / "hash_memo.sqlite") if stat_memo else None
        self._namespaces: dict[str, _Namespace] = {}

    def list_encoder_keys(self) -> list[str]:
        """Encoder keys that have committed features under this root."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/manifest.json"))

    def _namespace(self, key: str) -> _Namespace:
        if not isinstance(key, str) or not _ENCODER_KEY.match(key):
            raise ValueError(f"invalid encoder key {key!r}: use encoder_key(...) or [A-Za-z0-9._-] characters")
        if key not in self._namespaces:
            self._namespaces[key] = _Namespace(self.root / key)
        return self._namespaces[key]

    def digests(self, paths: Sequence[str | os.PathLike]) -> list[str | OSError]:
        """The content key of every file (its bytes' digest), or the ``OSError`` naming why it cannot be read.

        Files are hashed once: digests are remembered by stat signature in the cache's memo (unless the cache was
        opened with ``stat_memo=False``), which is what makes an unchanged gallery's rebuild cheap.
        """
        return hash_files([Path(p) for p in paths], self._memo, self.hash_workers)

    def get_or_compute(
        self,
        paths: Sequence[str | os.PathLike],
        encoder_key: str,
        encode_fn: Callable[[list[Path]], EncodeOutput],
        *,
        batch_size: int = 64,
        storage_dtype: str | None = None,
        on_error: OnError = "raise",
        progress: Progress | None = None,
        world: World | None = None,
        chunk: int | None = None,
    ) -> CachedFeatures:
        """Features of image files, encoding only the files whose content is not cached yet.

        Args:
            paths: image files; the result follows this order. Files are identified by their bytes, so a copy
                under another name reuses features and an edited file is encoded again.
            encoder_key: the encoder identity, from :func:`encoder_key`.
            encode_fn: maps a batch of paths (at most ``batch_size``) to a (B, d) array or tensor, or to a dict
                of them (e.g. ``{"embeds": (B, d), "tokens": (B, n, w)}``); always the same names and shapes.
            batch_size: paths per ``encode_fn`` call.
            storage_dtype: ``"float32"`` or ``"float16"`` for a new encoder key; None keeps what is stored
                (float32 when new). A value different from what is stored raises.
            on_error: ``"raise"``: an unreadable file raises its ``OSError`` (naming the file) before anything
                is encoded, and an ``encode_fn`` error propagates. ``"skip"``: such items are left out and
                listed in ``failed`` (a failing batch is retried one item at a time to find the culprits).
            progress: called as ``progress(done, total)`` after each encoded batch.
            world: the processes of a ``torchrun`` job splitting the encoding (each calls this with the same
                items and gets all the features; ``cirlab.features.distributed``); None: this process alone.
            chunk: with or without ``world``, commit a shard every ``chunk`` items (what a crash loses at most).

        Returns:
            The features of the items that succeeded.
        """
        if world is not None or chunk is not None:
            from cirlab.features.distributed import sharded_get_or_compute

            return sharded_get_or_compute(
                self, paths, encoder_key, encode_fn, world=world, chunk=chunk,
                batch_size=batch_size, storage_dtype=storage_dtype, on_error=on_error, progress=progress,
            )  # fmt: skip
        paths = [Path(p) for p in paths]
        _check_on_error(on_error)
        digests = self.digests(paths)
        keys, positions, failures = [], [], {}
        for i, digest in enumerate(digests):
            if isinstance(digest, OSError):
                if on_error == "raise":
                    raise digest
                failures[i] = f"{type(digest).__name__}: {digest}"
            else:
                keys.append(digest)
                positions.append(i)

        def encode_positions(which: list[int]) -> EncodeOutput:
            return encode_fn([paths[i] for i in which])

        return self._get_or_compute(
            encoder_key, paths, keys, positions, failures, encode_positions,
            batch_size=batch_size, storage_dtype=storage_dtype, on_error=on_error, progress=progress,
        )  # fmt: skip

    def lookup(
        self,
        items: Sequence[Any],
        encoder_key: str,
        keys: Sequence[str | None] | None = None,
        failed: Mapping[Any, str] | None = None,
        n_encoded: int = 0,
    ) -> CachedFeatures:
        """Cached features of ``items`` without encoding anything (e.g. what several processes committed).

        Args:
            items: image files (hashed, through the digest memo) or, with ``keys``, any items.
            encoder_key: the encoder identity.
            keys: the content key of each item (None: the item has none, e.g. an unreadable file).
            failed: item -> why it has no features, for messages (items absent from the cache get "not computed").
            n_encoded: reported as ``n_encoded`` of the result.
        """
        if keys is None:
            paths = [Path(p) for p in items]
            digests = self.digests(paths)
            keys = [None if isinstance(d, OSError) else d for d in digests]
            unreadable = {
                p: f"{type(d).__name__}: {d}" for p, d in zip(paths, digests, strict=True) if isinstance(d, OSError)
            }
            failed = {**unreadable, **(failed or {})}
            items = paths
        ns = self._namespace(encoder_key)
        ns.refresh()
        ok = [i for i, k in enumerate(keys) if k is not None and k in ns.index]
        present = set(ok)
        reasons = {
            items[i]: (failed or {}).get(items[i], "not computed") for i in range(len(items)) if i not in present
        }
        return CachedFeatures(
            ns,
            items=[items[i] for i in ok],
            keys=[keys[i] for i in ok],
            positions=np.array(ok, dtype=np.int64),
            failed=reasons,
            n_encoded=n_encoded,
        )

    def get_or_compute_keys(
        self,
        keys: Sequence[str],
        encoder_key: str,
        encode_fn: Callable[[list[int]], EncodeOutput],
        *,
        batch_size: int = 64,
        storage_dtype: str | None = None,
        on_error: OnError = "raise",
        progress: Progress | None = None,
        world: World | None = None,
        chunk: int | None = None,
    ) -> CachedFeatures:
        """Features of inputs that are not files, identified by caller-provided content keys.

        For in-memory images (e.g. a Shapes corpus held in one array) use :func:`cirlab.features.hash_array`
        of each image as its key; the key must change whenever the image does.

        Args:
            keys: one content key per item (non-empty strings); the result follows this order.
            encoder_key: the encoder identity, from :func:`encoder_key`.
            encode_fn: maps a list of positions into ``keys`` (at most ``batch_size``) to features, as in
                :meth:`get_or_compute`.
            batch_size, storage_dtype, on_error, progress, world, chunk: as in :meth:`get_or_compute`.

        Returns:
            The features of the items that succeeded; ``items`` holds their keys.
        """
        if world is not None or chunk is not None:
            from cirlab.features.distributed import sharded_get_or_compute_keys

            return sharded_get_or_compute_keys(
                self, keys, encoder_key, encode_fn, world=world, chunk=chunk,
                batch_size=batch_size, storage_dtype=storage_dtype, on_error=on_error, progress=progress,
            )  # fmt: skip
        _check_on_error(on_error)
        keys = list(keys)
        for key in keys:
            if not isinstance(key, str) or not key or "\0" in key:
                raise ValueError(f"content keys must be non-empty strings without NUL, got {key!r}")
        return self._get_or_compute(
            encoder_key, keys, keys, list(range(len(keys))), {}, encode_fn,
            batch_size=batch_size, storage_dtype=storage_dtype, on_error=on_error, progress=progress,
        )  # fmt: skip

    def _get_or_compute(
        self,
        key: str,
        items: list[Any],
        keys: list[str],
        positions: list[int],
        failures: dict[int, str],
        encode: Callable[[list[int]], EncodeOutput],
        *,
        batch_size: int,
        storage_dtype: str | None,
        on_error: OnError,
        progress: Progress | None,
    ) -> CachedFeatures:
        """Shared by both entry points.

        ``keys[i]`` is the content key of ``items[positions[i]]``; ``failures`` maps request positions that already
        failed (unreadable files) to reasons; ``encode`` takes positions into ``items``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        ns = self._namespace(key)
        ns.refresh()
        dtype = _storage_dtype(storage_dtype, ns)
        todo: dict[str, int] = {}  # missing content key -> first request position holding it
        for pos, content in zip(positions, keys, strict=True):
            if content not in ns.index:
                todo.setdefault(content, pos)
        encode_errors: dict[str, str] = {}
        n_encoded = 0
        if todo:
            run = _EncodeRun(self, ns, dtype, encode, batch_size, on_error, encode_errors, progress)
            n_encoded = run.run(list(todo.items()))
        ok = [i for i, content in enumerate(keys) if content in ns.index]
        for i, content in enumerate(keys):
            if content not in ns.index:
                failures[positions[i]] = encode_errors.get(content, "not computed")
        return CachedFeatures(
            ns,
            items=[items[positions[i]] for i in ok],
            keys=[keys[i] for i in ok],
            positions=np.array([positions[i] for i in ok], dtype=np.int64),
            failed={items[pos]: failures[pos] for pos in sorted(failures)},
            n_encoded=n_encoded,
        )


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _storage_dtype(requested: str | None, ns: _Namespace) -> str:
    if requested is not None:
        requested = np.dtype(requested).name
        if requested not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {requested!r}")
        if ns.dtype is not None and ns.dtype != requested:
            raise ValueError(f"{ns.dir}: features are stored as {ns.dtype}, not {requested}")
        return requested
    return ns.dtype or "float32"


def claim_chunks(todo: Sequence[tuple[str, int]]) -> list[tuple[str, list[tuple[str, int]]]]:
    """Splits ``(content key, position)`` items into claimable chunks with content-defined boundaries.

    A chunk ends after an item whose key hashes to 0 modulo ``CLAIM_ITEMS`` (or at ``4 * CLAIM_ITEMS`` items), and
    is named by its last key; so two processes asked for the same items in the same order cut them into the same
    chunks under the same names, even when one of them starts part-way (some items were cached already).
    """
    chunks: list[tuple[str, list[tuple[str, int]]]] = []
    current: list[tuple[str, int]] = []
    for item in todo:
        current.append(item)
        boundary = int(hash_bytes(item[0].encode())[:8], 16) % CLAIM_ITEMS == 0
        if boundary or len(current) >= 4 * CLAIM_ITEMS:
            chunks.append((hash_bytes(current[-1][0].encode())[:24], current))
            current = []
    if current:
        chunks.append((hash_bytes(current[-1][0].encode())[:24], current))
    return chunks


class _Claim:
    """An ``flock`` on ``claims/<name>.lock``: this process encodes that chunk; others wait for its commit."""

    def __init__(self, lock: FileLock) -> None:
        self.path = lock.path
        self._lock = lock

    @classmethod
    def take(cls, directory: Path, name: str, wait: bool) -> _Claim | None:
        lock = FileLock(directory / f"{name}.lock")  # held until the chunk is committed
        return cls(lock) if lock.acquire(wait) else None

    def release(self) -> None:
        """Lets go of the claim and removes its file (a process waiting on it re-checks what is committed)."""
        self.path.unlink(missing_ok=True)
        self._lock.release()


class _EncodeRun:
    """One call's encoding: claims chunks, encodes batches, and commits shards by size and by time.

    Work is shared with other processes asking for the same items: each chunk of items is claimed before it is
    encoded; a chunk another process has claimed is skipped and, at the end, waited for and re-checked, so
    concurrent builds or trainings over one gallery split the encoding instead of each doing all of it. A claim is
    held until the shard holding its rows is committed. Before waiting for another process's claim, everything
    pending is committed and every claim released, so no two processes ever wait for each other.

    Rows are committed when a shard reaches ``shard_bytes`` and whenever ``commit_seconds`` have passed since the
    shard was opened, so an interrupted encoding of any size loses at most that much work. When ``encode_fn``
    raises, or on an interrupt (``KeyboardInterrupt``), the rows written so far are committed before the error
    propagates.
    """

    def __init__(
        self,
        cache: FeatureCache,
        ns: _Namespace,
        dtype: str,
        encode: Callable[[list[int]], EncodeOutput],
        batch_size: int,
        on_error: OnError,
        errors: dict[str, str],
        progress: Progress | None,
    ) -> None:
        self.cache = cache
        self.ns = ns
        self.dtype = dtype
        self.encode = encode
        self.batch_size = batch_size
        self.on_error = on_error
        self.errors = errors
        self.progress = progress
        self.writer: _ShardWriter | None = None
        self.shapes: dict[str, tuple[int, ...]] | None = None
        self.rows_per_shard = 0
        self.finished: list[_Claim] = []  # chunks fully handed out: released at the next commit
        self.current: _Claim | None = None  # the chunk being handed out
        self.done = 0
        self.total = 0
        self.encoded = 0
        self.last_commit = time.monotonic()

    def run(self, todo: list[tuple[str, int]]) -> int:
        """Encodes the missing items ``todo`` (content key, request position); returns how many it encoded."""
        self.total = len(todo)
        try:
            batch: list[tuple[str, int]] = []
            for item in self._items(claim_chunks(todo)):
                if item is _FLUSH:
                    self._encode(batch)
                    batch = []
                    self._commit()
                    continue
                batch.append(item)
                if len(batch) == self.batch_size:
                    self._encode(batch)
                    batch = []
            self._encode(batch)
            self._commit()
        except BaseException:
            # Keep the complete rows written so far (hours of encoding, maybe), then re-raise; a failing commit
            # (the disk is full) discards them instead.
            try:
                self._commit()
            except BaseException:
                self._discard()
            finally:
                self._release_all()
            raise
        return self.encoded

    def _items(self, chunks: list[tuple[str, list[tuple[str, int]]]]) -> Iterator[Any]:
        """The items to encode, claiming each chunk first; ``_FLUSH`` asks for a commit before a wait."""
        deferred = []
        for name, chunk in chunks:
            claim = _Claim.take(self.ns.claim_dir, name, wait=False)
            if claim is None:
                deferred.append((name, chunk))
                continue
            yield from self._hand_out(claim, chunk)
        for name, chunk in deferred:
            yield _FLUSH  # commit and release everything before waiting for another process
            yield from self._hand_out(_Claim.take(self.ns.claim_dir, name, wait=True), chunk)

    def _hand_out(self, claim: _Claim, chunk: list[tuple[str, int]]) -> Iterator[tuple[str, int]]:
        self.current = claim
        self.ns.refresh()  # another process may have committed some of these meanwhile
        for key, pos in chunk:
            if key in self.ns.index:
                self.done += 1
            else:
                yield key, pos
        self.finished.append(claim)
        self.current = None

    def _encode(self, batch: list[tuple[str, int]]) -> None:
        if not batch:
            return
        for keys, arrays in _encode_batch(batch, self.encode, self.on_error, self.errors):
            self._write(keys, arrays)
        self.done += len(batch)
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)

    def _write(self, keys: list[str], arrays: dict[str, np.ndarray]) -> None:
        shapes = _schema(arrays)
        if self.shapes is None:
            self.ns.check_schema(self.dtype, shapes)  # fail before writing anything when outputs do not match
            self.shapes = shapes
            row_bytes = sum(_row_bytes(s, self.dtype) for s in shapes.values())
            self.rows_per_shard = max(1, self.cache.shard_bytes // max(1, row_bytes))
        elif shapes != self.shapes:
            raise ValueError(f"encode_fn changed its outputs from {self.shapes} to {shapes}")
        while keys:
            if self.writer is None:
                self.writer = _ShardWriter(self.ns, self.dtype, self.shapes)
            n = min(len(keys), self.rows_per_shard - self.writer.rows)
            self.writer.append(keys[:n], {name: a[:n] for name, a in arrays.items()})
            self.encoded += n
            keys, arrays = keys[n:], {name: a[n:] for name, a in arrays.items()}
            if self.writer.rows >= self.rows_per_shard:
                self._commit()
        if self.writer is not None and time.monotonic() - self.last_commit >= self.cache.commit_seconds:
            self._commit()

    def _commit(self) -> None:
        """Commits the open shard (if it has rows) and releases the claims of chunks fully handed out."""
        writer, self.writer = self.writer, None
        self.last_commit = time.monotonic()
        if writer is not None:
            if writer.rows:
                try:
                    writer.finish()
                    self.ns.commit(writer)
                except BaseException:
                    writer.discard()
                    raise
            else:
                writer.discard()
        for claim in self.finished:
            claim.release()
        self.finished = []

    def _discard(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.discard()

    def _release_all(self) -> None:
        for claim in [*self.finished, *([self.current] if self.current else [])]:
            claim.release()
        self.finished, self.current = [], None


_FLUSH = object()
"""Marker in the item stream of ``_EncodeRun``: encode the partial batch and commit before going on."""


def _encode_batch(
    batch: list[tuple[str, int]],
    encode: Callable[[list[int]], EncodeOutput],
    on_error: OnError,
    errors: dict[str, str],
) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
    """Yields ``(keys, arrays)`` for the items that encoded; with ``on_error="skip"`` records failures in ``errors``.

    Only exceptions raised by ``encode`` count as item failures; malformed outputs always raise ``ValueError``.
    """
    keys, positions = [k for k, _ in batch], [p for _, p in batch]
    try:
        raw = encode(positions)
    except Exception:
        if on_error == "raise":
            raise
        # One item of the batch may be the culprit (a corrupt image): retry one at a time to keep the rest.
        for key, pos in batch:
            try:
                raw = encode([pos])
            except Exception as err:
                errors[key] = f"{type(err).__name__}: {err}"
            else:
                yield [key], _as_arrays(raw, 1)
    else:
        yield keys, _as_arrays(raw, len(batch))
