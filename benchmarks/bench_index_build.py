"""``cirlab index build`` encoding throughput against the bare model forward on the same images.

Three measurements on the same image files and the same model, interleaved for ``--repeats`` rounds (best of
each reported):

* bare forward: every image decoded and preprocessed beforehand (untimed), then only ``encode_images`` batches
  are timed: the upper bound, with no data loading at all;
* index build: the whole ``cirlab.index.build_index`` call into a fresh index directory with a fresh feature cache
  (hashing, decoding on the prefetching thread pool, the model, cache and index writes; the model is built
  beforehand by ``load_model`` in both cases, but ``build_index`` builds its own, so its time includes that);
* sequential loop: decode a batch, then run it through the model (what a naive loop does), for reference.

Rounds run the three in a rotating order; each reports its best wall time (the least disturbed by other
processes on a shared machine) and its median CPU time (``time.process_time``, all threads of this process),
which other processes barely affect. The build's encoding step (``BuildReport.encode_seconds``: decoding, the
model and the cache writes, without hashing, model loading and index writing) is reported too. Target: the
encoding step's throughput >= 0.8 x the bare forward, by best wall time (data loading is not the bottleneck).

Usage:
    python benchmarks/bench_index_build.py [--images DIR] [--backbone SPEC] [--limit 2000 --batch-size 64]
    python benchmarks/bench_index_build.py --tower vit-b32 --limit 256 --batch-size 32 --repeats 2

Defaults: the Shapes world's CLIP (``runs/shapes/clip-*/best``, built by ``cirlab demo --quick``) and that
world's CIRR images (``runs/shapes/world-*/cirr/img_raw``). ``--tower vit-b32`` (or ``vit-l14``) instead saves a
random-weight CLIP of that public checkpoint's shape to a temporary directory and loads it as ``hf-clip:<dir>``,
and, without ``--images``, writes ``--limit`` photo-sized JPEGs (500x375, smooth colour fields with noise) to
encode: the workload of a user's photo folder, where decoding and resizing a JPEG costs far less than the forward.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cirlab.backbones.tiny import PUBLIC_SHAPES, build_small_clip
from cirlab.backbones.tokenizer import BASIC_CORPUS
from cirlab.cli.search import default_backbone
from cirlab.data.images import load_image
from cirlab.experiments import SHAPES_ROOT
from cirlab.features.cache import FeatureCache
from cirlab.index import build_index, find_images
from cirlab.index.model import load_model

TARGET = 0.8


def shapes_images(root: Path = SHAPES_ROOT) -> Path:
    worlds = sorted(root.glob("world-*/cirr/img_raw"), key=lambda p: p.stat().st_mtime)
    if not worlds:
        sys.exit(f"no Shapes world under {root}/: run `cirlab demo --quick` first, or pass --images DIR")
    return worlds[-1]


def write_photos(folder: Path, n: int, size: tuple[int, int] = (500, 375)) -> Path:
    """``n`` photo-sized JPEGs: smooth random colour fields (bicubic-upsampled 8x6 grids) with pixel noise."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
        noisy = np.asarray(field, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"photo-{i:05d}.jpg", quality=90)
    return folder


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def bare_forward(model, pixels: torch.Tensor, batch_size: int) -> None:
    for i in range(0, len(pixels), batch_size):
        model.encode_images(pixels[i : i + batch_size])


@torch.no_grad()
def sequential_loop(model, files: list[Path], batch_size: int) -> None:
    for i in range(0, len(files), batch_size):
        model.encode_images(model.backbone.preprocess([load_image(f) for f in files[i : i + batch_size]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=None, help="image folder (default: the Shapes world's)")
    parser.add_argument("--backbone", default=None, help="backbone spec (default: the Shapes CLIP)")
    parser.add_argument("--limit", type=int, default=2000, help="images used (the first N in path order)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="decoding threads of the build (0: one per core)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--tower", choices=sorted(PUBLIC_SHAPES), default=None, help="a random CLIP of this shape")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="cirlab-bench-build-") as tmp:
        if args.tower:
            spec = f"hf-clip:{Path(tmp) / args.tower}"
            clip = build_small_clip(PUBLIC_SHAPES[args.tower], BASIC_CORPUS.split(" . "))
            clip.save_pretrained(Path(tmp) / args.tower)
            source = args.images or write_photos(Path(tmp) / "photos", args.limit)
        else:
            spec = args.backbone or default_backbone()
            source = args.images or shapes_images()
        folder = Path(tmp) / "images"
        for rel in find_images(source)[: args.limit]:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, folder / rel)
        files = [folder / rel for rel in find_images(folder)]
        model, _ = load_model(spec, "sum")
        pixels = model.backbone.preprocess([load_image(f) for f in files])  # (N, 3, S, S), untimed
        print(f"{len(files)} images from {source}, {spec}, input {tuple(pixels.shape[1:])}, batch {args.batch_size}")
        print(f"torch threads {torch.get_num_threads()}, decoding workers {args.workers or 'one per core'}")
        bare_forward(model, pixels[: args.batch_size], args.batch_size)  # warm-up
        runs = 0
        encoding: list[float] = []

        def build() -> None:
            nonlocal runs
            runs += 1
            report = build_index(
                folder,
                Path(tmp) / f"index-{runs}",
                backbone=spec,
                cache=FeatureCache(Path(tmp) / f"cache-{runs}"),  # fresh: every image is encoded
                batch_size=args.batch_size,
                workers=args.workers,
                log=lambda m: None,
            )
            assert report.encoded == len(files), f"encoded {report.encoded} of {len(files)}"
            encoding.append(report.encode_seconds)

        jobs = {
            "forward": lambda: bare_forward(model, pixels, args.batch_size),
            "build (whole)": build,
            "sequential": lambda: sequential_loop(model, files, args.batch_size),
        }
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in jobs}
        names = list(jobs)
        for r in range(args.repeats):
            for name in names[r % 3 :] + names[: r % 3]:
                times[name].append(timed(jobs[name]))
    best = {name: min(w for w, _ in t) for name, t in times.items()}
    best["build (encoding)"] = min(encoding)
    cpu = {name: float(np.median([c for _, c in t])) for name, t in times.items()}
    base = len(files) / best["forward"]
    print(f"{'':<16} {'best wall s':>11} {'images/s':>9} {'vs forward':>11} {'median CPU s':>13} {'CPU vs fwd':>11}")
    for name in best:
        rate = len(files) / best[name]
        cpu_cols = f" {cpu[name]:13.2f} {cpu['forward'] / cpu[name]:10.2f}x" if name in cpu else ""
        print(f"{name:<16} {best[name]:11.2f} {rate:9.1f} {rate / base:10.2f}x{cpu_cols}")
    ratio = best["forward"] / best["build (encoding)"]
    verdict = "meets" if ratio >= TARGET else "MISSES"
    print(
        f"index build encoding throughput = {ratio:.2f} x bare forward, best wall time ({verdict} the {TARGET} target)"
    )
    if ratio < TARGET:
        sys.exit(1)


if __name__ == "__main__":
    main()
