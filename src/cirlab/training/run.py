"""Training a method end to end: the run config (method settings + one loop config per stage), presets, and
``fit``, which runs every stage through the one training loop with validation-based checkpoint selection.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import field, make_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from cirlab.config import apply_overrides, load_config, to_dict
from cirlab.data.benchmark import FASHIONIQ_CATEGORIES
from cirlab.distributed import World, current_world
from cirlab.evaluation.evaluate import evaluate
from cirlab.evaluation.protocols import combine_metrics
from cirlab.io import atomic_write_json
from cirlab.methods import METHODS
from cirlab.methods.base import CIRMethod, load_weights
from cirlab.training.corpus_source import DataOptions
from cirlab.training.data import make_batch_fn, mine_hard_negatives
from cirlab.training.loop import TrainConfig, train
from cirlab.training.sources import SyntheticOptions

RESERVED = {"seed", "backbone", "method", "synthetic", "data"}


def run_config_class(method: str | type[CIRMethod]) -> type:
    """The run-config dataclass of a method: ``seed``, ``backbone`` (spec; empty: the dataset's own, e.g. the
    Shapes CLIP), ``method`` (its config), ``synthetic`` (which synthetic triplets a ``synthetic_triplets`` stage
    reads), ``data`` (training corpora; empty: the Shapes world) and one ``TrainConfig`` field per stage.
    """
    cls = METHODS.get(method) if isinstance(method, str) else method
    fields: list[tuple[str, Any, Any]] = [
        ("seed", int, field(default=0)),
        ("backbone", str, field(default="")),
        ("method", cls.config_class, field(default_factory=cls.config_class)),
        ("synthetic", SyntheticOptions, field(default_factory=SyntheticOptions)),
        ("data", DataOptions, field(default_factory=DataOptions)),
    ]
    for stage in cls.stages:
        if stage.name in RESERVED:
            raise ValueError(f"{cls.name}: stage name {stage.name!r} is reserved")
        fields.append((stage.name, TrainConfig, field(default_factory=TrainConfig)))
    return make_dataclass(f"{cls.__name__}RunConfig", fields)


def preset_path(method: str, preset: str) -> Path | None:
    """The packaged preset file ``configs/<preset>/<method>.yaml``, or None when it does not exist."""
    path = resources.files("cirlab") / "configs" / preset / f"{method}.yaml"
    return Path(str(path)) if path.is_file() else None


def load_run_config(method: str, preset: str | None = "shapes", overrides: tuple[str, ...] | list[str] = ()) -> Any:
    """Run config of ``method`` from a packaged preset name or a YAML/JSON path, then ``key=value`` overrides."""
    cls = run_config_class(method)
    cfg = cls()
    if preset:
        path = Path(preset) if Path(preset).suffix in (".yaml", ".yml", ".json") else preset_path(method, preset)
        if path is not None:
            cfg = load_config(cls, path)
        elif not (resources.files("cirlab") / "configs" / preset).is_dir():
            raise FileNotFoundError(f"no preset {preset!r} (packaged presets live in cirlab/configs/<preset>/)")
    return apply_overrides(cfg, list(overrides))


def scale_train(cfg: TrainConfig, factor: float) -> TrainConfig:
    """A loop config with its steps and evaluation interval scaled by ``factor`` (each at least 1)."""
    eval_every = max(1, math.ceil(cfg.eval_every * factor)) if cfg.eval_every else 0
    return dataclasses.replace(cfg, steps=max(1, math.ceil(cfg.steps * factor)), eval_every=eval_every)


def scale_steps(run_cfg: Any, factor: float) -> Any:
    """A run config with every stage's loop config scaled by ``factor`` (``cirlab demo --quick``)."""
    changes = {
        f.name: scale_train(getattr(run_cfg, f.name), factor)
        for f in dataclasses.fields(run_cfg)
        if isinstance(getattr(run_cfg, f.name), TrainConfig)
    }
    return dataclasses.replace(run_cfg, **changes)


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
        data = source.stage_data_for(method, stage.name, run_cfg.synthetic)
        images = method.prepare_data(stage.name, data.images)
        batch_fn = make_batch_fn(
            stage.data,
            cfg.batch_size,
            cfg.seed,
            cfg.grad_accum,
            images=images,
            captions=data.captions,
            triplets=data.triplets,
            hard_negatives=hard_negative_fn(images, method.hard_negatives(stage.name)),
            world=world,
        )

        def eval_fn() -> dict[str, float]:
            # Fetched per call: a method that fine-tunes its image encoder has new features at every evaluation.
            results = [
                evaluate(method, split, features=source.features_for(method, name)).metrics
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
