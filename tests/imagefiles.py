"""Small image files for tests: a few coloured shapes per picture, PNG and JPEG, in nested folders."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(220, 40, 40), (40, 160, 60), (40, 70, 220), (230, 200, 40), (150, 60, 190), (30, 190, 200)]


def draw_image(path: Path, seed: int) -> Path:
    """A small picture of a few coloured shapes; non-square sizes exercise resizing and cropping."""
    rng = random.Random(seed)
    size = (rng.randint(36, 64), rng.randint(36, 64))
    im = Image.new("RGB", size, tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    for _ in range(rng.randint(1, 3)):
        x, y = rng.randint(0, size[0] - 12), rng.randint(0, size[1] - 12)
        box = (x, y, x + rng.randint(8, 24), y + rng.randint(8, 24))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=rng.choice(COLOURS))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def make_gallery(root: Path, n: int, start: int = 0) -> list[Path]:
    """``n`` images spread over two folders, PNG and JPEG."""
    return [
        draw_image(root / ("sub" if i % 3 == 0 else "") / f"img{i:03d}.{'jpg' if i % 2 else 'png'}", seed=i)
        for i in range(start, start + n)
    ]
