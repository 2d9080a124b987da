"""The Shapes environment: a built world plus its CLIP, both content-addressed and reused.

``prepare_shapes`` is what ``cirlab demo``, the studies and ``cirlab train --dataset shapes`` call: it builds the
world (or finds it) and takes the Shapes CLIP shipped with cirlab (``shapes-clip``), as real CIR work starts from a
pretrained CLIP. With ``pretrain=True``, or for a world whose scene vocabulary, held-out combinations or renderer
differ from those the shipped CLIP was pretrained on, it pretrains one instead (``cirlab shapes-pretrain``'s
recipe; reused when already trained under ``root``). It returns a ``ShapesSource`` whose features come from the
shared feature cache.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cirlab.config import config_digest, to_dict
from cirlab.data.shapes import ShapesConfig, ShapesWorld, build_world, world_id
from cirlab.experiments import SHAPES_ROOT
from cirlab.features.cache import FeatureCache
from cirlab.io import atomic_write_json
from cirlab.training.clip_pretrain import CLIPPretrainConfig, pretrain_clip
from cirlab.training.run_config import scale_train
from cirlab.training.sources import ShapesSource

QUICK_PRETRAIN = 0.1
"""Fraction of the pretraining steps ``--quick`` runs when it pretrains (a smoke test of the recipe, not a CLIP
good enough to measure methods with)."""


@dataclass
class ShapesEnv:
    """A ready Shapes world: the world, its CLIP (frozen), the training/evaluation source and the CLIP's metrics.

    ``spec`` holds the ``prepare_shapes`` arguments that give this environment again (worker processes rebuild it
    from them; everything is then reused from disk).
    """

    world: ShapesWorld
    backbone: Any
    source: ShapesSource
    clip_metrics: dict[str, float]
    clip_dir: Path
    spec: dict[str, Any] = field(default_factory=dict)


def clip_config(world: ShapesConfig, quick: bool = False) -> CLIPPretrainConfig:
    """The Shapes CLIP's pretraining settings for ``world``'s scenes and renderer (quick: a short schedule)."""
    cfg = CLIPPretrainConfig(scene=world.scene, render=world.render)
    if quick:
        cfg.train = scale_train(cfg.train, QUICK_PRETRAIN)
        cfg.eval_scenes = 500
    return cfg


def shipped_fits(world: ShapesConfig, record: dict[str, Any]) -> bool:
    """Whether the shipped CLIP was pretrained on ``world``'s scene distribution and renderer.

    Anything else (another vocabulary, other held-out combinations, another image size) would let the backbone
    have seen what the world holds out, or never have seen what it shows.
    """
    # The recorded dicts, not configs parsed from them: parsing fills a field the record lacks (one added to the
    # renderer since) with today's default, which would pass a CLIP that never saw what that field draws.
    recorded = record["config"]
    ours = json.loads(json.dumps(to_dict(CLIPPretrainConfig(scene=world.scene, render=world.render))))
    return recorded.get("scene") == ours["scene"] and recorded.get("render") == ours["render"]


def _shipped(world: ShapesWorld, log: Callable[[str], None]) -> tuple[Any, dict[str, float], Path] | None:
    from cirlab.backbones.shapes_clip import shapes_clip, shipped_dir, shipped_record

    try:
        record = shipped_record()
    except FileNotFoundError as err:
        log(f"{err}; pretraining one")
        return None
    if not shipped_fits(world.config, record):
        log("the shipped Shapes CLIP was pretrained on another scene vocabulary or renderer; pretraining one")
        return None
    log(f"using the shipped Shapes CLIP ({shipped_dir()})")
    return shapes_clip().freeze(), dict(record["metrics"]), shipped_dir()


def _pretrained(
    world: ShapesWorld, quick: bool, seed: int, root: Path, force: bool, log: Callable[[str], None]
) -> tuple[Any, dict[str, float], Path]:
    from cirlab.backbones.hf_clip import HFCLIPBackbone

    ccfg = clip_config(world.config, quick)
    clip_dir = root / f"clip-{config_digest([to_dict(ccfg), seed])}"
    best = clip_dir / "best"
    if force and clip_dir.exists():
        shutil.rmtree(clip_dir)
    if (best / "config.json").is_file() and (clip_dir / "clip_metrics.json").is_file():
        log(f"reusing the Shapes CLIP at {best}")
        metrics = json.loads((clip_dir / "clip_metrics.json").read_text())
        return HFCLIPBackbone.from_pretrained(str(best)).freeze(), metrics, best
    log(f"pretraining the Shapes CLIP ({ccfg.train.steps} steps) into {clip_dir}")
    backbone, metrics = pretrain_clip(replace(ccfg, train=replace(ccfg.train, seed=seed)), clip_dir, seed)
    atomic_write_json(clip_dir / "clip_metrics.json", metrics)
    return backbone, metrics, best


def prepare_shapes(
    quick: bool = False,
    seed: int = 0,
    root: str | Path = SHAPES_ROOT,
    cache_dir: str | Path | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    pretrain: bool = False,
) -> ShapesEnv:
    """Builds or reuses the Shapes world, and takes the shipped Shapes CLIP (or pretrains one).

    Args:
        quick: the small world (and, when pretraining, a short schedule; same code path).
        seed: world seed (and pretraining seed).
        root: where worlds and pretrained CLIPs are kept (``world-<id>``, ``clip-<id>``).
        cache_dir: feature cache (default ``<root>/features``).
        force: rebuild the world (and retrain a pretrained CLIP) even when a matching build exists.
        log: progress messages.
        pretrain: pretrain the CLIP instead of using the shipped one.
    """
    root = Path(root)
    wcfg = ShapesConfig.quick(seed=seed) if quick else ShapesConfig(seed=seed)
    world = build_world(wcfg, root / f"world-{world_id(wcfg)}", overwrite=force, log=log)
    found = None if pretrain else _shipped(world, log)
    backbone, metrics, clip_dir = found or _pretrained(world, quick, seed, root, force, log)
    cache = FeatureCache(Path(cache_dir) if cache_dir else root / "features")
    spec = {"quick": quick, "seed": seed, "root": str(root), "cache_dir": cache_dir and str(cache_dir)}
    return ShapesEnv(world, backbone, ShapesSource(world, cache), metrics, clip_dir, {**spec, "pretrain": pretrain})
