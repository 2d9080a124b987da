"""Content-hashed feature store: image features cached by (encoder identity, image bytes) (STYLE.md rule 10).

Every method, the evaluator and the gallery index read image features through one :class:`FeatureCache`, so a
gallery is encoded once per (backbone, weights, preprocessing) and frozen-backbone training reads cached features
instead of re-encoding. The cache is generic over the encoder: the caller names it with :func:`encoder_key` and
supplies the function that encodes a batch; nothing here imports torch.

Layout under ``root``::

    hash_memo.sqlite                        path -> content digest, keyed by stat (hashing.StatMemo)
    <encoder_key>/manifest.json             storage dtype, array shapes, committed shards in commit order
    <encoder_key>/.lock                     flock'ed around manifest updates
    <encoder_key>/shards/<id>.keys.npy      the content key of every row of shard <id>
    <encoder_key>/shards/<id>.<name>.npy    one array per output name, (rows, *shape), memory-mapped on read

Writes are append-only and crash-safe: a shard's files are filled under temporary names and renamed into place,
and only then is the shard added to the manifest (replaced atomically, under the lock). A crash leaves at most
unreferenced files, never a manifest that points at partial data; shards committed before it stay usable. When
``encode_fn`` raises, the rows of the shard in progress are committed before the error propagates, so the next
run encodes only what is still missing; an interrupt (``KeyboardInterrupt``) discards that shard instead.

Processes may fill one cache concurrently: shard names are unique and a manifest update re-reads the manifest
under the lock. When two of them computed the same image, the shard committed first wins. Locking uses
``fcntl.flock`` (POSIX). One ``FeatureCache`` object is not thread-safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cirlab.features.hashing import StatMemo, hash_bytes, hash_files
from cirlab.io import atomic_path, atomic_write_json, read_json

OnError = Literal["raise", "skip"]
EncodeOutput = Any  # an (B, ...) array / tensor, or a mapping name -> (B, ...) array / tensor
Progress = Callable[[int, int], None]

MANIFEST_VERSION = 1
SHARD_BYTES = 256 << 20
"""Target size of one shard: bounds the work a crash can lose (about 87K rows of 768 float32)."""

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
        self.dtype: str | None = None
        self.arrays: dict[str, tuple[int, ...]] = {}
        self.shards: list[dict[str, Any]] = []
        self.index: dict[str, tuple[int, int]] = {}
        self._maps: dict[tuple[int, str], np.ndarray] = {}

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
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def commit(self, shard_id: str, rows: int, dtype: str, arrays: Mapping[str, tuple[int, ...]]) -> None:
        """Appends a fully written shard to the manifest, then refreshes the index."""
        with self.lock():
            manifest = self._read_manifest() or {
                "version": MANIFEST_VERSION,
                "dtype": dtype,
                "arrays": {name: list(shape) for name, shape in arrays.items()},
                "shards": [],
            }
            self.dtype = manifest["dtype"]
            self.arrays = {name: tuple(shape) for name, shape in manifest["arrays"].items()}
            self.check_schema(dtype, arrays)  # another process may have created the namespace meanwhile
            manifest["shards"].append({"id": shard_id, "rows": rows})
            atomic_write_json(self.manifest_path, manifest)
        self.refresh()

    def discard(self, shard_id: str) -> None:
        """Removes the files of a shard that could not be committed."""
        for path in self.shard_dir.glob(f"{shard_id}.*.npy"):
            path.unlink(missing_ok=True)

    def memmap(self, pos: int, name: str) -> np.ndarray:
        """Read-only memory map of array ``name`` of the shard at manifest position ``pos``, (rows, *shape)."""
        if (pos, name) not in self._maps:
            entry = self.shards[pos]
            full = np.load(self.shard_dir / f"{entry['id']}.{name}.npy", mmap_mode="r")
            self._maps[pos, name] = full[: entry["rows"]]  # rows past a skipped item's slot are never written
        return self._maps[pos, name]


class _ShardWriter:
    """Fills one new shard's arrays through memory maps under temporary names; renamed into place on success.

    Used as a context manager: leaving the block normally renames the files onto their final names (the shard
    still has to be committed to the manifest); leaving it by an exception deletes them.
    """

    def __init__(self, shard_dir: Path, dtype: str, arrays: Mapping[str, tuple[int, ...]], capacity: int) -> None:
        self.shard_id = _new_shard_id()
        self.rows = 0
        self.capacity = capacity
        self._shard_dir = shard_dir
        self._dtype = dtype
        self._shapes = dict(arrays)
        self._keys: list[str] = []
        self._maps: dict[str, np.ndarray] = {}
        self._keys_tmp: Path | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _ShardWriter:
        self._shard_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:  # if opening fails half-way, the temporaries made so far are removed
            for name, shape in self._shapes.items():
                tmp = stack.enter_context(atomic_path(self._shard_dir / f"{self.shard_id}.{name}.npy"))
                # (capacity, *shape); sparse on disk until written, and the OS pages it out as it fills.
                self._maps[name] = np.lib.format.open_memmap(
                    tmp, mode="w+", dtype=self._dtype, shape=(self.capacity, *shape)
                )
            self._keys_tmp = stack.enter_context(atomic_path(self._shard_dir / f"{self.shard_id}.keys.npy"))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is None:
            try:
                for array in self._maps.values():
                    array.flush()
                with open(self._keys_tmp, "wb") as f:
                    np.save(f, np.array(self._keys, dtype=str))  # (rows,) fixed-width unicode, no pickle
            except BaseException as err:
                self._maps.clear()
                self._stack.__exit__(type(err), err, err.__traceback__)  # deletes the temporaries
                raise
        self._maps.clear()  # drop the memory maps before the files are renamed or deleted
        return bool(self._stack.__exit__(exc_type, exc, tb))

    @property
    def free(self) -> int:
        return self.capacity - self.rows

    def append(self, keys: Sequence[str], arrays: Mapping[str, np.ndarray]) -> int:
        """Writes as many leading items as fit; returns how many were taken."""
        n = min(len(keys), self.free)
        for name, target in self._maps.items():
            target[self.rows : self.rows + n] = arrays[name][:n]  # cast to the storage dtype here
        self._keys.extend(keys[:n])
        self.rows += n
        return n


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
        hash_workers: int = 4,
        stat_memo: bool = True,
    ) -> None:
        """Opens (without creating anything yet) the cache at ``root``.

        Args:
            root: cache directory (see :func:`default_cache_dir`).
            shard_bytes: target size of one shard; each shard is committed when full.
            hash_workers: threads hashing image files.
            stat_memo: remember file digests by stat signature to skip re-hashing unchanged files.
        """
        self.root = Path(root)
        self.shard_bytes = shard_bytes
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

        Returns:
            The features of the items that succeeded.
        """
        paths = [Path(p) for p in paths]
        _check_on_error(on_error)
        digests = hash_files(paths, self._memo, self.hash_workers)
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
            digests = hash_files(paths, self._memo, self.hash_workers)
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
    ) -> CachedFeatures:
        """Features of inputs that are not files, identified by caller-provided content keys.

        For in-memory images (e.g. a Shapes corpus held in one array) use :func:`cirlab.features.hash_array`
        of each image as its key; the key must change whenever the image does.

        Args:
            keys: one content key per item (non-empty strings); the result follows this order.
            encoder_key: the encoder identity, from :func:`encoder_key`.
            encode_fn: maps a list of positions into ``keys`` (at most ``batch_size``) to features, as in
                :meth:`get_or_compute`.
            batch_size, storage_dtype, on_error, progress: as in :meth:`get_or_compute`.

        Returns:
            The features of the items that succeeded; ``items`` holds their keys.
        """
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
        if todo:
            batches = _encode_batches(list(todo.items()), encode, batch_size, on_error, encode_errors, progress)
            self._write_shards(ns, batches, dtype, len(todo))
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
            n_encoded=len(todo) - len(encode_errors),
        )

    def _write_shards(
        self,
        ns: _Namespace,
        batches: Iterator[tuple[list[str], dict[str, np.ndarray]]],
        dtype: str,
        n_todo: int,
    ) -> None:
        """Streams encoded batches into shards of about ``shard_bytes``, committing each as it fills."""
        carry = next(batches, None)
        if carry is None:
            return
        shapes = _schema(carry[1])
        ns.check_schema(dtype, shapes)  # fail before writing anything when the outputs do not match the store
        row_bytes = sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values()) * np.dtype(dtype).itemsize
        rows_per_shard = max(1, self.shard_bytes // max(1, row_bytes))
        written = 0
        while carry is not None:
            failure: Exception | None = None
            with _ShardWriter(ns.shard_dir, dtype, shapes, min(rows_per_shard, n_todo - written)) as writer:
                try:
                    while writer.free:
                        # Encode the next batch only while this shard has room, so that a failing encode_fn never
                        # takes a full shard down with it.
                        carry = carry if carry is not None else next(batches, None)
                        if carry is None:
                            break
                        if _schema(carry[1]) != shapes:
                            raise ValueError(f"encode_fn changed its outputs from {shapes} to {_schema(carry[1])}")
                        taken = writer.append(*carry)
                        rest = len(carry[0]) - taken
                        carry = (carry[0][taken:], {n: a[taken:] for n, a in carry[1].items()}) if rest else None
                except Exception as err:
                    if not writer.rows:
                        raise
                    # The rows written so far are complete: keep them (hours of encoding, maybe), then re-raise.
                    # An interrupt (KeyboardInterrupt) is not caught here and discards the partial shard.
                    failure = err
            try:
                ns.commit(writer.shard_id, writer.rows, dtype, shapes)
            except BaseException:
                ns.discard(writer.shard_id)
                raise
            if failure is not None:
                raise failure
            written += writer.rows
            carry = carry if carry is not None else next(batches, None)


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


def _encode_batches(
    todo: list[tuple[str, int]],
    encode: Callable[[list[int]], EncodeOutput],
    batch_size: int,
    on_error: OnError,
    errors: dict[str, str],
    progress: Progress | None,
) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
    """Yields ``(keys, arrays)`` for the items that encoded; with ``on_error="skip"`` records failures in ``errors``.

    Only exceptions raised by ``encode`` count as item failures; malformed outputs always raise ``ValueError``.
    """
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
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
        if progress is not None:
            progress(min(start + batch_size, len(todo)), len(todo))
