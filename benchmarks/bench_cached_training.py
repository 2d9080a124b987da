"""Frozen-backbone training from cached features vs re-encoding images at every step (same run, same method).

Trains Pic2Word for one epoch over N images with a random-weight CLIP (speed does not depend on the weights) three
ways: reading a ``FeatureTable`` of pre-computed embeddings (what
cirlab does with a frozen backbone); through a ``PixelTable`` that reads every batch's image files from disk,
preprocesses and encodes them with the frozen image tower (what a loop without a feature cache does); and the same
from pixels already decoded in memory (a lower bound on re-encoding). Target: cached >= 5x faster than re-encoding
from files.

``--tower shapes`` (default) is the Shapes CLIP (64 px, 2+2 layers of width 128), whose image tower is so small
that the text tower's forward and backward dominate even a cached step; ``--tower vit-l14`` is the shape of
``openai/clip-vit-large-patch14`` (224 px, 24-layer width-1024 image tower, 12-layer width-768 text tower), the
backbone the real-data presets train on, where encoding the images is most of an uncached step::

    python benchmarks/bench_cached_training.py [--images 2048] [--batch-size 128]
    python benchmarks/bench_cached_training.py --tower vit-l14 --images 64 --batch-size 32
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from cirlab.backbones.tiny import PUBLIC_SHAPES, build_small_clip
from cirlab.data.images import load_image
from cirlab.methods import create_method
from cirlab.training.clip_pretrain import shapes_clip_model
from cirlab.training.data import FeatureTable, PixelTable, make_batch_fn
from cirlab.training.loop import TrainConfig, train


def epoch_seconds(method, table, batch_size: int) -> float:
    """Wall time of one epoch of Pic2Word's mapping stage reading ``table``."""
    steps = max(1, len(table) // batch_size)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=1e-3, progress=False, log_every=10**9)
    method.prepare_stage("mapping")
    batch_fn = make_batch_fn("images", batch_size, seed=0, images=table)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(
            method,
            method.trainable_parameters("mapping"),
            batch_fn,
            lambda b: method.training_loss("mapping", b),
            cfg,
            tmp,
            resume=False,
        )
        return time.perf_counter() - t0


TOWERS = {"shapes": shapes_clip_model, "vit-l14": lambda: PUBLIC_SHAPES["vit-l14"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tower", choices=sorted(TOWERS), default="shapes", help="the CLIP's size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TOWERS[args.tower]()
    backbone = build_small_clip(model, ["a large red circle at the top left"] * 10).freeze()
    size = model.image_size
    images = np.random.default_rng(0).integers(0, 255, (args.images, size, size, 3), dtype=np.uint8)  # (N, H, W, 3)

    t0 = time.perf_counter()
    with torch.no_grad():
        embeds = torch.cat(
            [
                backbone.encode_image(backbone.image_transform.from_uint8(images[i : i + 256])).embeds
                for i in range(0, len(images), 256)
            ]
        )
    encode_once = time.perf_counter() - t0
    names = [str(i) for i in range(len(images))]
    cached = FeatureTable(names, embeds)
    pixels = PixelTable(
        names, lambda rows: backbone.image_transform.from_uint8(images[rows.numpy()]), backbone.encode_image
    )

    with tempfile.TemporaryDirectory() as folder:
        paths = [f"{folder}/{i:06d}.png" for i in range(len(images))]
        for path, image in zip(paths, images, strict=True):
            Image.fromarray(image).save(path)
        files = PixelTable(
            names,
            lambda rows: backbone.preprocess([load_image(paths[i]) for i in rows.tolist()]),
            backbone.encode_image,
        )
        method = create_method("pic2word", backbone)
        t_cached = epoch_seconds(method, cached, args.batch_size)
        t_files = epoch_seconds(method, files, args.batch_size)
        t_pixels = epoch_seconds(method, pixels, args.batch_size)
    print(f"tower                            {args.tower} ({size} px)")
    print(f"images per epoch                 {args.images} (batch {args.batch_size}, {args.threads} threads)")
    print(f"encode all images once           {encode_once:8.2f} s  (paid once, then cached on disk)")
    print(f"epoch from cached features       {t_cached:8.2f} s")
    print(f"epoch re-encoding image files    {t_files:8.2f} s   speed-up {t_files / t_cached:5.1f}x (target >= 5x)")
    print(f"epoch re-encoding decoded pixels {t_pixels:8.2f} s   speed-up {t_pixels / t_cached:5.1f}x (lower bound)")
    return 0 if t_files / t_cached >= 5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
