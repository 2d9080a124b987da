"""Feature cache throughput: hashing image files (cold and with the stat memo), writing, incremental updates, reads.

Two parts, both in a temporary directory:

* files: ``--n-files`` small random files stand in for images; first run hashes and encodes everything, the
  second run finds everything through the stat memo, the third run adds ``--n-new`` files and encodes only those.
* gallery: a CIRCO-sized ``--n-gallery`` x ``--dim`` float32 gallery is written by content key and read back both
  as one assembled array (default shard size) and as a single-shard memory map.

Usage:
    python benchmarks/bench_feature_cache.py [--n-files 5000 --n-new 10 --n-gallery 123403 --dim 768]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from cirlab.features import FeatureCache, encoder_key

DIM_FILES = 16  # the fake encoder's output size for the file part; its cost is not what is measured


def fake_encoder(calls: list[int]):
    """An encoder that reads each file (as a real one would) and returns (B, DIM_FILES) float32."""

    def encode(paths: list[Path]) -> np.ndarray:
        calls.append(len(paths))
        return np.stack([np.frombuffer(p.read_bytes()[:DIM_FILES], dtype=np.uint8) for p in paths]).astype(np.float32)

    return encode


def not_cached(positions: list[int]) -> np.ndarray:
    raise AssertionError(f"{len(positions)} items were expected in the cache")


def bench_files(root: Path, n_files: int, n_new: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder = root / "images"
    folder.mkdir()
    paths = []
    for i in range(n_files + n_new):
        path = folder / f"{i:06d}.jpg"
        path.write_bytes(rng.integers(0, 256, size=int(rng.integers(20_000, 60_000)), dtype=np.uint8).tobytes())
        paths.append(path)
    size_mb = sum(p.stat().st_size for p in paths[:n_files]) / 2**20
    key = encoder_key("bench-files", "none", "raw-bytes")
    print(f"files: {n_files:,} files, {size_mb:.0f} MiB")
    for label, request in (("first run", paths[:n_files]), ("re-run", paths[:n_files]), ("+new", paths)):
        calls: list[int] = []
        start = time.perf_counter()
        feats = FeatureCache(root / "cache").get_or_compute(request, key, fake_encoder(calls), batch_size=256)
        seconds = time.perf_counter() - start
        print(f"  {label:<10} {seconds:7.2f} s   encoded {sum(calls):6,} of {len(feats):,}")


def bench_gallery(root: Path, n_gallery: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    gallery = rng.standard_normal((n_gallery, dim), dtype=np.float32)  # (N, d)
    keys = [f"gallery-{seed}-{i}" for i in range(n_gallery)]
    key = encoder_key("bench-gallery", f"seed-{seed}", f"{n_gallery}x{dim}")
    print(f"gallery: {n_gallery:,} x {dim} float32 ({gallery.nbytes / 2**20:.0f} MiB)")
    for label, shard_bytes in (("default shards", 256 << 20), ("one shard", 4 << 30)):
        cache_root = root / label.replace(" ", "-")
        start = time.perf_counter()
        # Committed only when a shard fills (not every 10 s), so "one shard" stays one on a slow machine.
        FeatureCache(cache_root, shard_bytes=shard_bytes, commit_seconds=float("inf")).get_or_compute_keys(
            keys, key, lambda pos: gallery[pos], batch_size=8192
        )
        write = time.perf_counter() - start
        start = time.perf_counter()
        embeds = FeatureCache(cache_root, shard_bytes=shard_bytes).get_or_compute_keys(keys, key, not_cached).embeds
        lookup = time.perf_counter() - start
        start = time.perf_counter()
        checksum = float(embeds[:, 0].sum())  # touches every row of a memory map
        touch = time.perf_counter() - start
        assert np.isclose(checksum, float(gallery[:, 0].sum()), rtol=1e-4)
        print(
            f"  {label:<15} write {write:6.2f} s   read {lookup:6.2f} s ({type(embeds).__name__})"
            f"   first pass over rows {touch:6.2f} s"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-files", type=int, default=5000)
    parser.add_argument("--n-new", type=int, default=10)
    parser.add_argument("--n-gallery", type=int, default=123_403)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cirlab-bench-") as tmp:
        bench_files(Path(tmp), args.n_files, args.n_new, args.seed)
        bench_gallery(Path(tmp), args.n_gallery, args.dim, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
