"""The content-hashed feature cache: reuse, order, incremental updates, crash safety, errors, concurrency."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cirlab.features import FeatureCache, default_cache_dir, encoder_key, hash_array, hash_bytes, hash_file, hashing

KEY = encoder_key("tiny", "seed-0", "32px")


def content_embedding(data: bytes, dim: int = 4) -> np.ndarray:
    """What the fake encoder returns for an image: a deterministic function of its bytes, (dim,) float32."""
    return np.frombuffer(hashlib.sha256(data).digest()[:dim], dtype=np.uint8).astype(np.float32)


class FakeEncoder:
    """Encodes paths from their bytes and records every call, so tests can see what was (re)computed."""

    def __init__(self, tokens: bool = False, fail_on: set[str] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.tokens = tokens
        self.fail_on = fail_on or set()

    @property
    def encoded(self) -> list[str]:
        return [name for call in self.calls for name in call]

    def __call__(self, paths: list[Path]) -> dict[str, np.ndarray] | np.ndarray:
        self.calls.append([p.name for p in paths])
        bad = [p.name for p in paths if p.name in self.fail_on]
        if bad:
            raise ValueError(f"cannot decode image {bad[0]}")
        embeds = np.stack([content_embedding(p.read_bytes()) for p in paths])  # (B, 4)
        if not self.tokens:
            return embeds
        return {"embeds": embeds, "tokens": np.repeat(embeds[:, None, :2], 3, axis=1)}  # (B, 3, 2)


def write_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img{i:03d}.png"
        path.write_bytes(f"image-{i}".encode() * (i % 3 + 1))
        paths.append(path)
    return paths


def expected(paths: list[Path]) -> np.ndarray:
    return np.stack([content_embedding(p.read_bytes()) for p in paths])


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_round_trip_and_reuse_across_cache_objects(tmp_path):
    paths = write_images(tmp_path / "img", 10)
    encode = FakeEncoder()
    feats = FeatureCache(tmp_path / "cache").get_or_compute(paths, KEY, encode, batch_size=4)
    assert [len(c) for c in encode.calls] == [4, 4, 2]
    assert feats.n_encoded == 10 and len(feats) == 10 and feats.items == paths
    np.testing.assert_array_equal(feats.embeds, expected(paths))
    assert feats.embeds.dtype == np.float32 and feats.names == ("embeds",)

    again = FeatureCache(tmp_path / "cache").get_or_compute(paths, KEY, encode)
    assert len(encode.calls) == 3 and again.n_encoded == 0
    np.testing.assert_array_equal(again.embeds, expected(paths))


def test_result_follows_the_requested_order_with_duplicates(tmp_path):
    paths = write_images(tmp_path / "img", 8)
    cache = FeatureCache(tmp_path / "cache", shard_bytes=40)  # a few rows per shard: rows come from many shards
    cache.get_or_compute(paths, KEY, FakeEncoder(), batch_size=3)
    request = [paths[5], paths[0], paths[7], paths[5], paths[2]]
    feats = cache.get_or_compute(request, KEY, FakeEncoder())
    np.testing.assert_array_equal(feats.embeds, expected(request))
    np.testing.assert_array_equal(feats.positions, np.arange(5))
    np.testing.assert_array_equal(feats.take("embeds", [3, 1]), expected([paths[5], paths[0]]))


def test_only_new_images_are_encoded(tmp_path):
    paths = write_images(tmp_path / "img", 30)
    cache = FeatureCache(tmp_path / "cache")
    cache.get_or_compute(paths, KEY, FakeEncoder())
    new = write_images(tmp_path / "img", 5, start=30)
    encode = FakeEncoder()
    feats = cache.get_or_compute(paths + new, KEY, encode, batch_size=2)
    assert sorted(encode.encoded) == sorted(p.name for p in new)
    assert feats.n_encoded == 5
    np.testing.assert_array_equal(feats.embeds, expected(paths + new))


def test_changed_content_is_recomputed_even_with_restored_mtime(tmp_path):
    paths = write_images(tmp_path / "img", 4)
    cache = FeatureCache(tmp_path / "cache")
    cache.get_or_compute(paths, KEY, FakeEncoder())
    st = paths[1].stat()
    paths[1].write_bytes(bytes(reversed(paths[1].read_bytes())))  # same size, new content
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns))  # a tool restoring mtime must not fool the memo
    encode = FakeEncoder()
    feats = cache.get_or_compute(paths, KEY, encode)
    assert encode.encoded == [paths[1].name]
    np.testing.assert_array_equal(feats.embeds, expected(paths))


def test_same_bytes_under_another_path_are_reused(tmp_path):
    paths = write_images(tmp_path / "img", 3)
    cache = FeatureCache(tmp_path / "cache")
    cache.get_or_compute(paths, KEY, FakeEncoder())
    copy = tmp_path / "elsewhere" / "renamed.jpg"
    copy.parent.mkdir()
    shutil.copy(paths[2], copy)
    encode = FakeEncoder()
    feats = cache.get_or_compute([copy], KEY, encode)
    assert encode.calls == [] and feats.keys == [hash_file(paths[2])]
    np.testing.assert_array_equal(feats.embeds, expected([paths[2]]))


def test_unchanged_files_are_not_rehashed(tmp_path, monkeypatch):
    paths = write_images(tmp_path / "img", 6)
    cache = FeatureCache(tmp_path / "cache")
    cache.get_or_compute(paths, KEY, FakeEncoder())
    hashed = []
    monkeypatch.setattr(hashing, "hash_file", lambda p: hashed.append(p) or hash_bytes(Path(p).read_bytes()))
    cache.get_or_compute(paths, KEY, FakeEncoder())
    assert hashed == []
    FeatureCache(tmp_path / "cache", stat_memo=False).get_or_compute(paths, KEY, FakeEncoder())
    assert len(hashed) == 6


def test_encoder_keys_are_separate(tmp_path):
    paths = write_images(tmp_path / "img", 3)
    cache = FeatureCache(tmp_path / "cache")
    cache.get_or_compute(paths, KEY, FakeEncoder())
    other = encoder_key("tiny", "seed-1", "32px")
    assert other != KEY and encoder_key("tiny", "seed-0", "32px") == KEY
    encode = FakeEncoder()
    feats = cache.get_or_compute(paths, other, lambda batch: encode(batch) + 100)
    assert len(encode.encoded) == 3
    np.testing.assert_array_equal(feats.embeds, expected(paths) + 100)
    assert cache.list_encoder_keys() == sorted([KEY, other])


def test_reads_are_memory_mapped(tmp_path):
    paths = write_images(tmp_path / "img", 12)
    cache = FeatureCache(tmp_path / "cache")
    feats = cache.get_or_compute(paths, KEY, FakeEncoder())
    # One shard in request order: the memory map itself comes back, read-only, no copy.
    assert isinstance(feats.embeds, np.memmap) and not feats.embeds.flags.writeable
    subset = cache.get_or_compute(paths[2:7], KEY, FakeEncoder())
    assert isinstance(subset.embeds, np.memmap)
    shuffled = cache.get_or_compute(paths[::-1], KEY, FakeEncoder())
    assert not isinstance(shuffled.embeds, np.memmap) and shuffled.embeds.flags.c_contiguous
    np.testing.assert_array_equal(shuffled.embeds, expected(paths[::-1]))


def test_several_arrays_and_float16_storage(tmp_path):
    paths = write_images(tmp_path / "img", 5)
    cache = FeatureCache(tmp_path / "cache")
    feats = cache.get_or_compute(paths, KEY, FakeEncoder(tokens=True), storage_dtype="float16")
    assert feats.names == ("embeds", "tokens") and feats.storage_dtype == "float16"
    assert feats.embeds.dtype == np.float32 and not isinstance(feats.embeds, np.memmap)
    assert isinstance(feats.array("embeds", dtype=np.float16), np.memmap)
    np.testing.assert_array_equal(feats.embeds, expected(paths))  # small integers are exact in float16
    tokens = feats.take("tokens", [4, 0])
    assert tokens.shape == (2, 3, 2)
    np.testing.assert_array_equal(tokens[:, 0], expected([paths[4], paths[0]])[:, :2])
    with pytest.raises(ValueError, match="stored as float16"):
        cache.get_or_compute(paths, KEY, FakeEncoder(tokens=True), storage_dtype="float32")
    with pytest.raises(KeyError, match="no cached array 'masks'"):
        feats.array("masks")


def test_different_outputs_under_one_key_raise(tmp_path):
    paths = write_images(tmp_path / "img", 4)
    cache = FeatureCache(tmp_path / "cache")
    cache.get_or_compute(paths[:2], KEY, FakeEncoder())
    with pytest.raises(ValueError, match="encode_fn returned"):
        cache.get_or_compute(paths, KEY, FakeEncoder(tokens=True))
    with pytest.raises(ValueError, match="shape"):
        cache.get_or_compute(paths, KEY, lambda batch: np.zeros((len(batch) + 1, 4)))
    assert not temporaries(tmp_path / "cache")


@pytest.mark.parametrize(
    ("crash", "committed"),
    [
        (RuntimeError("GPU out of memory"), [6, 6, 4]),  # an error keeps the complete rows of the open shard
        (KeyboardInterrupt(), [6, 6, 4]),  # so does an interrupt (Ctrl-C): the next run resumes after them
    ],
)
def test_crash_in_encode_fn_leaves_a_consistent_cache(tmp_path, crash, committed):
    paths = write_images(tmp_path / "img", 20)
    cache = FeatureCache(tmp_path / "cache", shard_bytes=4 * 4 * 6)  # 6 rows of 4 float32 per shard

    def crashing(batch: list[Path]) -> np.ndarray:
        if any(p in paths[16:] for p in batch):
            raise crash
        return expected(batch)

    with pytest.raises(type(crash)):
        cache.get_or_compute(paths, KEY, crashing, batch_size=4)
    assert not temporaries(tmp_path / "cache")
    manifest = json.loads((tmp_path / "cache" / KEY / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == committed
    assert len(list((tmp_path / "cache" / KEY / "shards").iterdir())) == 2 * len(committed)  # keys + embeds

    encode = FakeEncoder()
    feats = FeatureCache(tmp_path / "cache").get_or_compute(paths, KEY, encode)
    assert sorted(encode.encoded) == sorted(p.name for p in paths[sum(committed) :])
    np.testing.assert_array_equal(feats.embeds, expected(paths))


def test_missing_or_unreadable_file_is_named(tmp_path):
    paths = write_images(tmp_path / "img", 3)
    missing = tmp_path / "img" / "gone.png"
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        cache.get_or_compute([*paths, missing], KEY, FakeEncoder())
    with pytest.raises(IsADirectoryError, match="img"):
        cache.get_or_compute([tmp_path / "img"], KEY, FakeEncoder())


def test_skip_reports_failures_and_keeps_the_rest(tmp_path):
    paths = write_images(tmp_path / "img", 6)
    missing = tmp_path / "img" / "gone.png"
    encode = FakeEncoder(fail_on={paths[3].name})
    request = [paths[0], missing, *paths[1:]]
    feats = FeatureCache(tmp_path / "cache").get_or_compute(request, KEY, encode, batch_size=3, on_error="skip")
    assert list(feats.failed) == [missing, paths[3]]
    assert "gone.png" in feats.failed[missing] and "cannot decode image img003" in feats.failed[paths[3]]
    good = [p for p in request if p not in feats.failed]
    assert feats.items == good
    np.testing.assert_array_equal(feats.positions, [0, 2, 3, 5, 6])
    np.testing.assert_array_equal(feats.embeds, expected(good))
    with pytest.raises(ValueError, match="cannot decode"):
        FeatureCache(tmp_path / "cache").get_or_compute(paths, KEY, encode)


def test_in_memory_images_by_content_key(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, size=(7, 8, 8, 3), dtype=np.uint8)  # (N, H, W, 3)
    keys = [hash_array(im) for im in images]
    assert len(set(keys)) == 7 and hash_array(images[0].copy()) == keys[0]
    seen: list[int] = []

    def encode(positions: list[int]) -> np.ndarray:
        seen.extend(positions)
        return images[positions].reshape(len(positions), -1)[:, :5].astype(np.float32)  # (B, 5)

    cache = FeatureCache(tmp_path / "cache")
    progress: list[tuple[int, int]] = []
    feats = cache.get_or_compute_keys(keys[:4], KEY, encode, batch_size=3, progress=lambda *p: progress.append(p))
    assert progress == [(3, 4), (4, 4)]
    seen.clear()
    feats = cache.get_or_compute_keys(keys, KEY, encode)
    assert seen == [4, 5, 6] and feats.items == keys
    np.testing.assert_array_equal(feats.embeds, images.reshape(7, -1)[:, :5])
    with pytest.raises(ValueError, match="non-empty"):
        cache.get_or_compute_keys(["", "a"], KEY, encode)


def test_encoder_key_and_default_dir(monkeypatch, tmp_path):
    key = encoder_key("hf-clip:openai/clip-vit-large-patch14", "abc123", "224 bicubic")
    assert key.startswith("hf-clip-openai-clip-vit-large-patch14-")
    assert key != encoder_key("hf-clip:openai/clip-vit-large-patch14", "abc124", "224 bicubic")
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "features"
    monkeypatch.delenv("CIRLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "cirlab" / "features"


def fill_cache(root: str, folder: str, start: int, stop: int, go: multiprocessing.synchronize.Event) -> None:
    """Worker process: waits for the start signal, then caches images [start, stop) in tiny shards."""
    paths = sorted(Path(folder).iterdir())[start:stop]
    go.wait()
    FeatureCache(root, shard_bytes=4 * 4 * 3).get_or_compute(paths, KEY, FakeEncoder(), batch_size=2)


def test_parallel_writers_do_not_corrupt_the_cache(tmp_path):
    paths = write_images(tmp_path / "img", 40)
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    ranges = [(0, 25), (10, 35), (15, 40)]  # overlapping: the same images computed by several processes
    workers = [
        ctx.Process(target=fill_cache, args=(str(tmp_path / "cache"), str(tmp_path / "img"), a, b, go))
        for a, b in ranges
    ]
    for w in workers:
        w.start()
    go.set()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert not temporaries(tmp_path / "cache")
    encode = FakeEncoder()
    feats = FeatureCache(tmp_path / "cache").get_or_compute(paths, KEY, encode)
    assert encode.calls == []
    np.testing.assert_array_equal(feats.embeds, expected(paths))


def test_progress_is_committed_by_time_not_only_when_a_shard_fills(tmp_path, monkeypatch):
    """An encoding far smaller than a shard still commits as it goes, so an interrupted run resumes from there."""
    import time as real_time
    import types

    import cirlab.features.cache as cache_module

    now = [0.0]
    clock = types.SimpleNamespace(time_ns=real_time.time_ns, time=real_time.time, monotonic=lambda: now[0])
    monkeypatch.setattr(cache_module, "time", clock)
    paths = write_images(tmp_path / "img", 12)
    committed_before_each_call = []

    def slow_encoder(batch: list[Path]) -> np.ndarray:
        committed_before_each_call.append(len(FeatureCache(tmp_path / "cache").lookup(paths, KEY)))
        now[0] += 11.0  # each batch takes longer than the commit interval (10 s by default)
        return expected(batch)

    FeatureCache(tmp_path / "cache").get_or_compute(paths, KEY, slow_encoder, batch_size=4)
    assert committed_before_each_call == [0, 4, 8]


def test_a_killed_writers_temporaries_and_orphans_are_removed(tmp_path):
    import fcntl

    paths = write_images(tmp_path / "img", 6)
    cache = FeatureCache(tmp_path / "cache")
    cache.get_or_compute(paths[:3], KEY, FakeEncoder())
    shards = tmp_path / "cache" / KEY / "shards"
    dead = shards / ".18ab-1-dead.embeds.npy.0123456789ab.tmp"  # a SIGKILLed writer's temporary (16 MB, say)
    dead.write_bytes(b"\0" * 4096)
    orphan = shards / "18ac-1-orphan.embeds.npy"  # renamed into place by a writer killed before its commit
    orphan.write_bytes(b"\0" * 128)
    live = shards / ".18ad-2-live.embeds.npy.0123456789ab.tmp"  # a running writer's, flock'ed by it
    live.write_bytes(b"")
    (tmp_path / "cache" / KEY / ".manifest.json.killed.tmp").write_text("{")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        feats = FeatureCache(tmp_path / "cache").get_or_compute(paths, KEY, FakeEncoder())
        assert not dead.exists() and not orphan.exists() and live.exists()
    assert not (tmp_path / "cache" / KEY / ".manifest.json.killed.tmp").exists()
    np.testing.assert_array_equal(feats.embeds, expected(paths))


FULL_DISK_WORKER = """
import sys
import numpy as np
from pathlib import Path
from cirlab.features import FeatureCache

folder, cache = Path(sys.argv[1]), Path(sys.argv[2])
paths = sorted(folder.iterdir())
try:
    FeatureCache(cache).get_or_compute(paths, "k", lambda b: np.ones((len(b), 512), np.float32), batch_size=8)
except OSError as err:
    print(f"error: {err}")
    sys.exit(1)
"""


def test_a_full_disk_fails_with_a_message_naming_the_file_and_leaves_no_temporary(tmp_path):
    """A real full filesystem (a 256 KB tmpfs in a private mount namespace): no SIGBUS, a clear error, no leftovers."""
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-Urm", "true"]).returncode != 0:
        pytest.skip("needs unshare -Urm to mount a small tmpfs")
    write_images(tmp_path / "img", 200)  # 200 x 512 float32 = 400 KB of features
    (tmp_path / "cache").mkdir()
    script = tmp_path / "worker.py"
    script.write_text(FULL_DISK_WORKER)
    mount = f"mount -t tmpfs -o size=256k none {tmp_path / 'cache'}"
    encode = f'"{sys.executable}" {script} {tmp_path / "img"} {tmp_path / "cache"}'
    run = f'{mount} && {encode}; echo "rc=$?"; ls -aR {tmp_path / "cache"}'
    done = subprocess.run(["unshare", "-Urm", "sh", "-c", run], capture_output=True, text=True, timeout=120)
    out = done.stdout
    assert "rc=1" in out, (out, done.stderr[-2000:])  # not 135 (SIGBUS)
    assert "No space left on device" in out and ".npy" in out and str(tmp_path / "cache") in out, out
    assert ".tmp" not in out.split("rc=1")[1], "temporaries were left on the full disk"


def share_work(root: str, folder: str, out: str, go: multiprocessing.synchronize.Event) -> None:
    """Worker process: encodes every image of ``folder`` slowly, writes how many it encoded itself."""
    import time

    import cirlab.features.cache as cache_module

    cache_module.CLAIM_ITEMS = 4  # small chunks, so the two processes interleave on 64 items
    paths = sorted(Path(folder).iterdir())

    def slow(batch: list[Path]) -> np.ndarray:
        time.sleep(0.01 * len(batch))
        return expected(batch)

    go.wait()
    feats = FeatureCache(root).get_or_compute(paths, KEY, slow, batch_size=4)
    np.testing.assert_array_equal(feats.embeds, expected(paths))
    Path(out).write_text(str(feats.n_encoded))


def test_concurrent_runs_over_the_same_images_share_the_encoding(tmp_path):
    paths = write_images(tmp_path / "img", 64)
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    outs = [tmp_path / f"encoded-{i}" for i in range(2)]
    workers = [
        ctx.Process(target=share_work, args=(str(tmp_path / "cache"), str(tmp_path / "img"), str(out), go))
        for out in outs
    ]
    for w in workers:
        w.start()
    go.set()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    counts = [int(out.read_text()) for out in outs]
    assert sum(counts) == len(paths), f"the two runs encoded {counts} of {len(paths)} images"
    assert not temporaries(tmp_path / "cache") and not list((tmp_path / "cache" / KEY / "claims").iterdir())


MANY_SHARDS_WORKER = """
import os, resource, sys
import numpy as np
import cirlab.features.cache as cache_module
from cirlab.features import FeatureCache

root, n = sys.argv[1], int(sys.argv[2])
cache_module.OPEN_MAPS = 16
keys = [f"item-{i}" for i in range(n)]
encode = lambda pos: np.array(pos, np.float32)[:, None] + np.arange(8, dtype=np.float32)  # row i: i .. i + 7
FeatureCache(root, commit_seconds=0.0).get_or_compute_keys(keys, "k", encode, batch_size=1)  # one shard per item
free = len(os.listdir("/proc/self/fd")) + n // 2  # fewer descriptors left than there are shards
resource.setrlimit(resource.RLIMIT_NOFILE, (free, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
feats = FeatureCache(root).get_or_compute_keys(keys, "k", lambda pos: 1 / 0)
np.testing.assert_array_equal(feats.embeds, encode(list(range(n))))
np.testing.assert_array_equal(feats.take("embeds", [n - 1, 0]), encode([n - 1, 0]))
print("ok")
"""


def test_a_cache_of_many_small_shards_is_read_within_the_file_descriptor_limit(tmp_path):
    """Commits every few seconds make many shards; each memory map holds a descriptor, so reading them all at once
    ran out of descriptors ("Too many open files") once a cache held more shards than the limit allows."""
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(MANY_SHARDS_WORKER)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "cache"), "120"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
