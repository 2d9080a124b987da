"""Training a method end to end: ``fit`` runs every stage through the one training loop, on the data the method
requests from a training data source, with validation-based checkpoint selection. The run config it reads is
declared in ``cirlab.training.run_config``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cirlab.config import to_dict
from cirlab.data.benchmark import FASHIONIQ_CATEGORIES
from cirlab.distributed import World, current_world
from cirlab.evaluation.evaluate import evaluate
from cirlab.evaluation.protocols import combine_metrics
from cirlab.features.table import FeatureTable
from cirlab.io import atomic_write_json
from cirlab.methods.base import CIRMethod, load_weights
from cirlab.training.data import PixelTable, make_batch_fn, mine_hard_negatives
from cirlab.training.loop import TrainConfig, train


def hard_negative_fn(images: Any, k: int) -> Any:
    """``target rows (B,) -> ImageFeatures (B * k)``: each target's ``k`` nearest other training images in the
    frozen image space (mined once), or None when the stage asks for none."""
    if k <= 0 or images is None:
        return None
    neighbours = mine_hard_negatives(images.embeds, k)  # (N, k)

    def gather(target_rows: torch.Tensor) -> Any:
        return images.gather(neighbours[target_rows].reshape(-1))

    return gather


def validation_splits(name: str | None) -> list[str]:
    """The split names validation reads for ``name``: ``fashioniq/<split>`` (no category) stands for the three
    categories, evaluated together and averaged (as CLIP4Cir validates); any other name is one split; none for None."""
    if not name:
        return []
    family, _, rest = name.partition("/")
    if family == "fashioniq" and rest and "/" not in rest:
        return [f"{name}/{category}" for category in FASHIONIQ_CATEGORIES]
    return [name]


def load_previous_stage(method: CIRMethod, stage_dir: Path) -> None:
    """Loads the best weights an earlier run left for a stage that is skipped now, since later stages build on
    them (``cirlab train --stage stage2`` after ``--stage stage1`` into the same ``--out``); warns when none exist.
    """
    best = stage_dir / "best" / "model.safetensors"
    if best.is_file():
        load_weights(method, best.parent)
    else:
        warnings.warn(f"{method.name}: stage {stage_dir.name!r} is skipped and has no weights at {best}", stacklevel=3)


def _stage_split_features(method: CIRMethod, source: Any) -> Callable[[str], FeatureTable]:
    """Split name -> the features one stage's validation reads: fetched at every call while the image encoder
    trains (they change at every step), once per stage while the stage leaves it frozen."""
    frozen: dict[str, FeatureTable] = {}

    def features(name: str) -> FeatureTable:
        if method.image_encoder_training:
            return source.features_for(method, name)
        if name not in frozen:
            frozen[name] = source.features_for(method, name)
        return frozen[name]

    return features


def fit(
    method: CIRMethod,
    source: Any,
    run_cfg: Any,
    out_dir: str | Path,
    stages: list[str] | None = None,
    val_split: str | None = "cirr/val",
    select_metric: str = "avg",
    progress: bool = True,
    world: World | None = None,
) -> dict[str, Any]:
    """Trains ``method``'s stages in order on ``source``; after each stage the best-on-validation weights are
    loaded back, and the final method is saved to ``out_dir`` (``config.json`` + ``model.safetensors``). When
    ``stages`` selects some stages, the skipped stages before the first selected one load the best weights a
    previous run left in ``out_dir``.

    Under ``torchrun`` every process calls ``fit``: each reads its share of every global batch and only rank 0
    writes files (``world`` defaults to the initialised ``torch.distributed`` group, else one process).

    Returns:
        Per stage: steps, best step, best validation metrics, seconds, and data info.
    """
    out_dir = Path(out_dir)
    world = world or current_world()
    report: dict[str, Any] = {}
    val_names = validation_splits(val_split)
    vals = [source.split(name) for name in val_names]
    names = [s.name for s in method.stages]
    first = min((names.index(s) for s in stages if s in names), default=len(names)) if stages is not None else 0
    for i, stage in enumerate(method.stages):
        if stages is not None and stage.name not in stages:
            if i < first:
                load_previous_stage(method, out_dir / "stages" / stage.name)
            continue
        cfg: TrainConfig = dataclasses.replace(getattr(run_cfg, stage.name), progress=progress)
        method.prepare_stage(stage.name)
        request = method.data_request(stage.name)
        data = source.stage_data(request, run_cfg.synthetic)
        images = data.images
        if isinstance(images, PixelTable) and not method.image_encoder_training:
            # An earlier stage fine-tuned the image encoder and this one leaves it frozen (CLIP4Cir's Combiner
            # stage): an image's features do not change here, so each image is encoded once instead of at every
            # read, when that is fewer encodings and the features fit in memory.
            images = images.encoded_once(reads=cfg.steps * cfg.batch_size * cfg.grad_accum)
        images = method.prepare_data(stage.name, images)
        batch_fn = make_batch_fn(
            request.kind,
            cfg.batch_size,
            cfg.seed,
            cfg.grad_accum,
            images=images,
            captions=data.captions,
            triplets=data.triplets,
            hard_negatives=hard_negative_fn(images, request.hard_negatives),
            world=world,
        )

        split_features = _stage_split_features(method, source)

        def eval_fn(split_features: Callable[[str], FeatureTable] = split_features) -> dict[str, float]:
            results = [
                evaluate(method, split, features=split_features(name)).metrics
                for split, name in zip(vals, val_names, strict=True)
            ]
            return combine_metrics(vals, results) if len(vals) > 1 else results[0]

        stage_dir = out_dir / "stages" / stage.name
        result = train(
            method,
            method.trainable_parameters(stage.name),
            batch_fn,
            lambda batch, stage=stage: method.training_loss(stage.name, batch),
            cfg,
            stage_dir,
            # Without a validation split each stage keeps its last step.
            eval_fn=eval_fn if vals else None,
            select_metric=select_metric if vals else None,
            save_fn=method.save,
            description=f"{method.name}/{stage.name}",
            lr_scales=method.learning_rate_scales(stage.name),
            world=world,
        )
        load_weights(method, stage_dir / "best")
        report[stage.name] = {
            "steps": result.steps,
            "best_step": result.best_step,
            "val": result.best_metrics,
            "seconds": round(result.seconds, 1),
            **data.info,
        }
    method.eval()
    if world.is_main:
        method.save(out_dir, extra={"run_config": to_dict(run_cfg), "stages": report})
        atomic_write_json(out_dir / "train_report.json", report)
    return report


def seeded(seed: int) -> None:
    """Seeds torch's RNG before a method is built, so its initialisation is reproducible."""
    torch.manual_seed(seed)
