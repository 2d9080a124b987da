"""Feature encoding split over processes (``torchrun``), resumable after a crash.

Each process encodes its contiguous block of the requested items into the shared :class:`FeatureCache`, a chunk at
a time; every chunk is committed as the process's own shard (files renamed into place, then appended to the
manifest under the namespace lock), so a killed run loses at most the chunk in progress and the next run encodes
only what is still missing. The merge is the manifest: once every process is done, each one assembles the features
of all items, in request order, from the shards all processes committed (memory-mapped, nothing is copied).

A single process (``world`` of size 1) runs the same code, which is what makes a long one-process encoding
resumable in chunks too. Every process must call these functions with the same items. Callers reach them through
``FeatureCache.get_or_compute`` / ``get_or_compute_keys`` with ``world=`` or ``chunk=``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cirlab.distributed import World, all_gather_objects, run_everywhere
from cirlab.features.cache import CachedFeatures, EncodeOutput, FeatureCache, OnError, Progress

DEFAULT_CHUNK = 4096
"""Items per committed shard: bounds what a crash loses (about 12 MB of 768-d float32 embeddings)."""


def _encode_blocks(
    n: int,
    world: World,
    chunk: int,
    encode_chunk: Callable[[int, int], CachedFeatures],
    progress: Progress | None,
    what: str,
) -> tuple[dict[Any, str], int]:
    """Runs ``encode_chunk(start, stop)`` over this process's block; returns every process's failures and count."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    mine = world.block(n)

    def work() -> tuple[dict[Any, str], int]:
        failed: dict[Any, str] = {}
        encoded = 0
        for start in range(mine.start, mine.stop, chunk):
            stop = min(start + chunk, mine.stop)
            part = encode_chunk(start, stop)
            failed.update(part.failed)
            encoded += part.n_encoded
            if progress is not None:
                progress(stop - mine.start, mine.stop - mine.start)
        return failed, encoded

    local = run_everywhere(work, world, what)
    failed: dict[Any, str] = {}
    total = 0
    for part_failed, part_encoded in all_gather_objects(local, world):
        failed.update(part_failed)
        total += part_encoded
    return failed, total


def sharded_get_or_compute(
    cache: FeatureCache,
    paths: Sequence[str | os.PathLike],
    encoder_key: str,
    encode_fn: Callable[[list[Path]], EncodeOutput],
    *,
    world: World | None = None,
    chunk: int | None = None,
    batch_size: int = 64,
    storage_dtype: str | None = None,
    on_error: OnError = "raise",
    progress: Progress | None = None,
) -> CachedFeatures:
    """:meth:`FeatureCache.get_or_compute` with the work split over ``world``'s processes and committed per chunk.

    Args:
        cache: the shared feature cache (on a filesystem every process sees).
        paths: image files, the same list on every process; the result follows this order.
        encoder_key, encode_fn, batch_size, storage_dtype, on_error: as in ``get_or_compute``.
        world: the processes sharing the work (default: this process alone).
        chunk: items per committed shard (default ``DEFAULT_CHUNK``).
        progress: ``progress(done, total)`` over this process's block, after each chunk.

    Returns:
        On every process, the features of all items that succeeded on any process; ``n_encoded`` counts the items
        encoded by all processes in this call.

    Raises:
        The failing process's error on that process and ``DistributedError`` naming it on the others (with
        ``on_error="raise"``), so no process is left waiting.
    """
    world = world or World()
    chunk = DEFAULT_CHUNK if chunk is None else chunk
    paths = [Path(p) for p in paths]

    def encode_chunk(start: int, stop: int) -> CachedFeatures:
        return cache.get_or_compute(
            paths[start:stop], encoder_key, encode_fn,
            batch_size=batch_size, storage_dtype=storage_dtype, on_error=on_error,
        )  # fmt: skip

    failed, encoded = _encode_blocks(
        len(paths), world, chunk, encode_chunk, progress, f"encoding features into {cache.root / encoder_key}"
    )
    return cache.lookup(paths, encoder_key, failed=failed, n_encoded=encoded)


def sharded_get_or_compute_keys(
    cache: FeatureCache,
    keys: Sequence[str],
    encoder_key: str,
    encode_fn: Callable[[list[int]], EncodeOutput],
    *,
    world: World | None = None,
    chunk: int | None = None,
    batch_size: int = 64,
    storage_dtype: str | None = None,
    on_error: OnError = "raise",
    progress: Progress | None = None,
) -> CachedFeatures:
    """:meth:`FeatureCache.get_or_compute_keys` split over processes; ``encode_fn`` takes positions into ``keys``.

    Arguments and result as in :func:`sharded_get_or_compute`.
    """
    world = world or World()
    chunk = DEFAULT_CHUNK if chunk is None else chunk
    keys = list(keys)

    def encode_chunk(start: int, stop: int) -> CachedFeatures:
        return cache.get_or_compute_keys(
            keys[start:stop], encoder_key, lambda rows: encode_fn([start + r for r in rows]),
            batch_size=batch_size, storage_dtype=storage_dtype, on_error=on_error,
        )  # fmt: skip

    failed, encoded = _encode_blocks(
        len(keys), world, chunk, encode_chunk, progress, f"encoding features into {cache.root / encoder_key}"
    )
    return cache.lookup(keys, encoder_key, keys=keys, failed=failed, n_encoded=encoded)
