"""PIL rendering of Shapes scenes: anti-aliased, with per-render jitter of position, size, colour and background.

A render is a pure function of (scene, render seed, ``RenderConfig``): the same pair always gives the same pixels,
two seeds give two different images of one scene. Shapes are drawn at ``supersample`` times the output size and
box-downsampled (``Image.reduce``), which anti-aliases edges at a fraction of the cost of a LANCZOS resize.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cirlab.data.shapes.world import GRID, RenderConfig, Scene

RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
}

Point = tuple[float, float]


def _regular_polygon(cx: float, cy: float, radius: float, n: int, phase: float) -> list[Point]:
    return [
        (cx + radius * math.cos(phase + 2 * math.pi * k / n), cy + radius * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _draw_circle(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)


def _draw_square(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    # A square of half-side r would look much heavier than a circle of radius r; 0.85 evens the areas out.
    h = 0.85 * r
    draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)


def _draw_triangle(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    # Pointing up, centred on its bounding box rather than its centroid so it fills the cell like the others.
    draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)


def _draw_diamond(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    draw.polygon(_regular_polygon(cx, cy, r, 4, -math.pi / 2), fill=fill)


def _draw_cross(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    t = 0.35 * r
    draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
    draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)


def _draw_star(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    outer = _regular_polygon(cx, cy, r, 5, -math.pi / 2)
    inner = _regular_polygon(cx, cy, 0.45 * r, 5, -math.pi / 2 + math.pi / 5)
    draw.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=fill)


DRAWERS: dict[str, Callable[[ImageDraw.ImageDraw, float, float, float, tuple[int, int, int]], None]] = {
    "circle": _draw_circle,
    "square": _draw_square,
    "triangle": _draw_triangle,
    "diamond": _draw_diamond,
    "cross": _draw_cross,
    "star": _draw_star,
}


def _jittered_colour(rng: random.Random, colour: str, amount: int) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, v + rng.randint(-amount, amount))) for v in RGB[colour])
    return (r, g, b)


def render_image(scene: Scene, seed: int, cfg: RenderConfig) -> Image.Image:
    """Renders ``scene`` as an RGB PIL image of side ``cfg.image_size``.

    Args:
        scene: what to draw.
        seed: the render seed; it alone drives the jitter.
        cfg: sizes and jitter amounts.
    """
    rng = random.Random(seed)
    side = cfg.image_size * cfg.supersample
    grey = rng.randint(*cfg.background)
    canvas = Image.new("RGB", (side, side), (grey, grey, grey))
    draw = ImageDraw.Draw(canvas)
    cell = side / GRID
    for obj in scene.objects:
        row, col = divmod(obj.cell, GRID)
        cx = (col + 0.5) * cell + rng.uniform(-cfg.position_jitter, cfg.position_jitter) * side
        cy = (row + 0.5) * cell + rng.uniform(-cfg.position_jitter, cfg.position_jitter) * side
        extent = cfg.large_extent if obj.size == "large" else cfg.small_extent
        radius = extent * side * (1.0 + rng.uniform(-cfg.size_jitter, cfg.size_jitter))
        DRAWERS[obj.shape](draw, cx, cy, radius, _jittered_colour(rng, obj.colour, cfg.colour_jitter))
    return canvas.reduce(cfg.supersample) if cfg.supersample > 1 else canvas


def render_scene(scene: Scene, seed: int, cfg: RenderConfig) -> np.ndarray:
    """Renders ``scene`` as a uint8 array of shape (H, W, 3)."""
    return np.asarray(render_image(scene, seed, cfg), dtype=np.uint8)


def render_batch(items: Sequence[tuple[Scene, int]], cfg: RenderConfig) -> np.ndarray:
    """Renders (scene, seed) pairs into one uint8 array of shape (N, H, W, 3)."""
    out = np.empty((len(items), cfg.image_size, cfg.image_size, 3), dtype=np.uint8)  # (N, H, W, 3)
    for i, (scene, seed) in enumerate(items):
        out[i] = render_scene(scene, seed, cfg)
    return out


def _write_png(job: tuple[Path, Scene, int], cfg: RenderConfig) -> None:
    path, scene, seed = job
    render_image(scene, seed, cfg).save(path, format="PNG", compress_level=1)


def write_pngs(jobs: Sequence[tuple[Path, Scene, int]], cfg: RenderConfig, workers: int | None = None) -> None:
    """Renders each (path, scene, seed) job and writes it as a PNG, creating folders as needed.

    PNG encoding and file writes release the GIL, so a few threads roughly halve the time on two cores; the
    output does not depend on the thread count. ``compress_level=1``: for tiny images the faster setting saves
    more time than bytes.

    Args:
        jobs: where to write what.
        cfg: rendering settings.
        workers: threads (default: up to 4, bounded by the CPU count).
    """
    for parent in {path.parent for path, _, _ in jobs}:
        parent.mkdir(parents=True, exist_ok=True)
    n = workers if workers is not None else min(4, os.cpu_count() or 1)
    if n <= 1:
        for job in jobs:
            _write_png(job, cfg)
        return
    with ThreadPoolExecutor(n) as pool:
        for _ in pool.map(lambda job: _write_png(job, cfg), jobs, chunksize=64):
            pass
