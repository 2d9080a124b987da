"""The image-caption corpus: scenes with captions and no triplets (backbone pretraining, zero-shot methods).

On disk (``corpus/`` of a world): ``images.npy``, a uint8 array (N, H, W, 3), because tens of thousands of tiny
PNG files cost more to write and read than the pixels themselves; and ``captions.jsonl``, one JSON object per
image, in array order::

    {"index": 0, "scene": "0:large:red:circle|4:small:blue:square",
     "captions": ["top left: a big red circle, middle: a little blue square", ...],
     "eval_caption": "a large red circle at the top left and a small blue square at the center"}

``scene`` lets a trainer draw a fresh phrasing at every step (``ShapesCorpus.pairs``). Captions are alt-text-like
by default (complete or partial descriptions, ``alttext.py``), as a web corpus's are; ``CorpusConfig.caption_style``
``scene`` keeps complete scene captions only. No corpus scene holds a held-out combination.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cirlab.data.shapes.alttext import alt_caption
from cirlab.data.shapes.captions import caption, eval_caption
from cirlab.data.shapes.render import render_batch
from cirlab.data.shapes.world import Scene, ShapesConfig, component_rng, sample_scene


@dataclass
class ShapesCorpus:
    """Images and their scenes, with captions drawn on demand.

    Attributes:
        images: uint8 array (N, H, W, 3).
        scenes: the scene of each image.
        style: ``alt-text`` or ``scene`` (see ``caption_for``).
    """

    images: np.ndarray
    scenes: list[Scene]
    style: str = "alt-text"

    def __post_init__(self) -> None:
        if len(self.images) != len(self.scenes):
            raise ValueError(f"{len(self.images)} images but {len(self.scenes)} scenes")

    def __len__(self) -> int:
        return len(self.scenes)

    def caption(self, index: int, rng: random.Random) -> str:
        """A fresh random caption of image ``index`` in the corpus's style."""
        return caption_for(self.scenes[index], rng, self.style)

    def eval_caption(self, index: int) -> str:
        """The canonical caption of image ``index``."""
        return eval_caption(self.scenes[index])

    def pairs(self, rng: random.Random) -> Iterator[tuple[np.ndarray, str]]:
        """Endless (image (H, W, 3) uint8, caption) pairs: shuffled epochs, a new phrasing at every visit."""
        order = list(range(len(self)))
        while True:
            rng.shuffle(order)
            for i in order:
                yield self.images[i], self.caption(i, rng)

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True, style: str = "alt-text") -> ShapesCorpus:
        """Reads ``images.npy`` (memory-mapped by default) and ``captions.jsonl`` from ``directory``."""
        directory = Path(directory)
        images = np.load(directory / "images.npy", mmap_mode="r" if mmap else None)
        with open(directory / "captions.jsonl", encoding="utf-8") as fh:
            scenes = [Scene.parse(json.loads(line)["scene"]) for line in fh]
        return cls(images=images, scenes=scenes, style=style)


def caption_for(scene: Scene, rng: random.Random, style: str) -> str:
    """A random caption of ``scene``: alt-text (complete or partial) or a complete scene caption."""
    return alt_caption(scene, rng)[0] if style == "alt-text" else caption(scene, rng)


def sample_corpus(cfg: ShapesConfig) -> tuple[list[Scene], list[int]]:
    """The corpus scenes (seen combinations only) and their render seeds."""
    rng = component_rng(cfg.seed, "corpus")
    scenes = [sample_scene(rng, cfg.scene) for _ in range(cfg.corpus.images)]
    seeds = [rng.getrandbits(31) for _ in scenes]
    return scenes, seeds


def write_corpus(cfg: ShapesConfig, directory: Path) -> int:
    """Renders and writes the corpus into ``directory``; returns the number of images."""
    scenes, seeds = sample_corpus(cfg)
    rng = component_rng(cfg.seed, "corpus", "captions")
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "images.npy", render_batch(list(zip(scenes, seeds, strict=True)), cfg.render))
    with open(directory / "captions.jsonl", "w", encoding="utf-8") as fh:
        for i, scene in enumerate(scenes):
            record = {
                "index": i,
                "scene": scene.to_str(),
                "captions": [
                    caption_for(scene, rng, cfg.corpus.caption_style) for _ in range(cfg.corpus.captions_per_image)
                ],
                "eval_caption": eval_caption(scene),
            }
            fh.write(json.dumps(record) + "\n")
    return len(scenes)
