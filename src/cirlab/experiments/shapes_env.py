"""The Shapes environment: a built world plus its own pretrained CLIP, both content-addressed and reused.

``prepare_shapes`` is what ``cirlab demo`` and ``cirlab train --dataset shapes`` call: it builds the world (or
finds it), pretrains the Shapes CLIP on the world's caption corpus (or finds it) and returns a ``ShapesSource``
whose features come from the shared feature cache.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cirlab.config import to_dict
from cirlab.data.shapes import ShapesConfig, ShapesWorld, build_world, eval_caption, sample_scene, world_id
from cirlab.data.shapes.render import render_batch
from cirlab.data.shapes.world import combo_filter, component_rng
from cirlab.features.cache import FeatureCache
from cirlab.io import atomic_write_json
from cirlab.training.clip_pretrain import CLIPPretrainConfig, pretrain_clip
from cirlab.training.run import scale_train
from cirlab.training.sources import ShapesSource

DEFAULT_ROOT = Path("runs") / "shapes"


@dataclass
class ShapesEnv:
    """A ready Shapes world: the world, its CLIP (frozen), the training/evaluation source and the CLIP's metrics."""

    world: ShapesWorld
    backbone: Any
    source: ShapesSource
    clip_metrics: dict[str, float]
    clip_dir: Path


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def clip_config(quick: bool) -> CLIPPretrainConfig:
    """The Shapes CLIP's pretraining settings (quick: fewer steps, same model)."""
    cfg = CLIPPretrainConfig()
    cfg.train.eval_every = 200
    if quick:
        cfg.train = scale_train(cfg.train, 0.25)
        cfg.eval_scenes = 500
    return cfg


def heldout_scenes(world: ShapesWorld, n: int) -> tuple[np.ndarray, list[str]]:
    """Fresh scenes (never in the corpus) with their canonical captions, for the CLIP's retrieval eval."""
    rng = component_rng(world.config.seed, "clip-eval")
    scenes = [sample_scene(rng, world.config.scene, combo_filter(world.config.scene.heldout)) for _ in range(n)]
    images = render_batch([(s, rng.getrandbits(31)) for s in scenes], world.config.render)
    return images, [eval_caption(s) for s in scenes]


def prepare_shapes(
    quick: bool = False,
    seed: int = 0,
    root: str | Path = DEFAULT_ROOT,
    cache_dir: str | Path | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> ShapesEnv:
    """Builds or reuses the Shapes world and its CLIP.

    Args:
        quick: the small world and a shorter CLIP schedule (same code path).
        seed: world and CLIP seed.
        root: where worlds and CLIPs are kept (``world-<id>``, ``clip-<id>``).
        cache_dir: feature cache (default ``<root>/features``).
        force: rebuild the world and retrain the CLIP even when a matching build exists.
        log: progress messages.
    """
    import torch

    from cirlab.backbones.hf_clip import HFCLIPBackbone

    root = Path(root)
    wcfg = ShapesConfig.quick(seed=seed) if quick else ShapesConfig(seed=seed)
    wid = world_id(wcfg)
    world = build_world(wcfg, root / f"world-{wid}", overwrite=force, log=log)
    ccfg = clip_config(quick)
    clip_dir = root / f"clip-{_digest([wid, to_dict(ccfg), seed])}"
    best = clip_dir / "best"
    if force and clip_dir.exists():
        import shutil

        shutil.rmtree(clip_dir)
    if (best / "config.json").is_file() and (clip_dir / "clip_metrics.json").is_file():
        log(f"reusing the Shapes CLIP at {best}")
        backbone = HFCLIPBackbone.from_pretrained(str(best)).freeze()
        metrics = json.loads((clip_dir / "clip_metrics.json").read_text())
    else:
        log(f"pretraining the Shapes CLIP ({ccfg.train.steps} steps) into {clip_dir}")
        corpus = world.corpus()
        rng = random.Random(f"tokenizer/{seed}")
        texts = [corpus.caption(i, rng) for i in range(len(corpus))]
        images, captions = heldout_scenes(world, ccfg.eval_scenes)
        torch.manual_seed(seed)
        backbone, metrics = pretrain_clip(corpus.images, corpus.caption, texts, ccfg, clip_dir, images, captions, seed)
        atomic_write_json(clip_dir / "clip_metrics.json", metrics)
    cache = FeatureCache(Path(cache_dir) if cache_dir else root / "features")
    return ShapesEnv(world, backbone, ShapesSource(world, cache), metrics, best)
