"""The run config: everything one training run of a method is set by, in one dataclass per section.

A run config holds ``seed``, ``backbone`` (a spec; empty: the dataset's own, e.g. the Shapes CLIP), ``method`` (the
method's own config dataclass, declared in its file), ``synthetic`` (:class:`SyntheticOptions`), ``data``
(:class:`DataOptions`: training corpora; empty: the Shapes world) and one ``training.loop.TrainConfig`` per stage.
Presets are such configs serialised as YAML under ``cirlab/configs/<preset>/<method>.yaml``; ``key=value``
overrides are type-checked against the dataclasses (``cirlab.config``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, make_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cirlab.config import apply_overrides, load_config, to_dict
from cirlab.methods import METHODS
from cirlab.methods.base import CIRMethod
from cirlab.training.loop import TrainConfig

TRAINING_BENCHMARKS = ("cirr", "fashioniq")
"""Benchmarks whose train split a run can train on (``data.benchmark``)."""

DATASET_CHOICES = ("auto", "shapes", "corpus", "imagefolder", "webdataset", *TRAINING_BENCHMARKS)
RESERVED = {"seed", "backbone", "method", "synthetic", "data"}


@dataclass
class SyntheticOptions:
    """Attributes: corrupt_fraction: which synthetic file (None: the world's default); fraction: share used."""

    corrupt_fraction: float | None = None
    fraction: float = 1.0


@dataclass
class DataOptions:
    """Where a run's training and validation data come from (the ``data`` section of a run config).

    Attributes:
        images: image corpus: a folder (recursive) or webdataset shards (``/data/cc3m/{00000..00331}.tar``).
        manifest: CSV/TSV/JSONL/parquet listing an image folder's images and captions (default: sidecar ``.txt``).
        captions: caption corpus for ``captions`` stages (default: the image corpus's captions).
        triplets: triplet JSONL for ``synthetic_triplets`` stages (``cirlab mine-triplets`` writes one).
        triplet_image_root: folder the triplet image paths are relative to (default: the JSONL's folder).
        triplets_by_name: triplet images are names in the image corpus (e.g. webdataset keys), not paths.
        benchmark: ``cirr`` or ``fashioniq``: supervised train triplets and validation splits.
        annotations: the benchmark's annotation root (upstream layout).
        benchmark_images: the benchmark's image root.
        categories: FashionIQ categories whose train triplets are used (empty: all three).
        val: validation split as ``<benchmark>/<split>`` or ``fashioniq/<split>/<category>``; ``fashioniq/<split>``
            validates on the three categories, averaged (empty: no validation; each stage keeps its last step).
        limit: read only the first N samples of each corpus (0: all); dry runs use a few.
        num_workers: DataLoader workers reading corpora (and threads decoding images).
        encode_batch_size: images per encoder call when filling the feature cache.
        cache_dir: feature cache directory (default: ``CIRLAB_CACHE`` or ``~/.cache/cirlab``).
    """

    images: str = ""
    manifest: str = ""
    captions: str = ""
    triplets: str = ""
    triplet_image_root: str = ""
    triplets_by_name: bool = False
    benchmark: str = ""
    annotations: str = ""
    benchmark_images: str = ""
    categories: list[str] = field(default_factory=list)
    val: str = ""
    limit: int = 0
    num_workers: int = 2
    encode_batch_size: int = 256
    cache_dir: str = ""

    def used(self) -> bool:
        """Whether any data is named (otherwise a run trains on the Shapes world)."""
        return bool(self.images or self.captions or self.triplets or self.benchmark)


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


def scale_steps(run_cfg: Any, factor: float | Mapping[str, float]) -> Any:
    """A run config with every stage's loop config scaled by ``factor``, or by ``factor[stage]`` per stage
    (``cirlab demo --quick``); a mapping that leaves a stage out raises ``KeyError`` naming it."""

    def of(stage: str) -> float:
        if not isinstance(factor, Mapping):
            return factor
        if stage not in factor:
            raise KeyError(f"no step factor for stage {stage!r}; given for {', '.join(factor) or 'none'}")
        return factor[stage]

    changes = {
        f.name: scale_train(getattr(run_cfg, f.name), of(f.name))
        for f in dataclasses.fields(run_cfg)
        if isinstance(getattr(run_cfg, f.name), TrainConfig)
    }
    return dataclasses.replace(run_cfg, **changes)


def resolve_dataset(
    run_cfg: Any,
    dataset: str = "auto",
    annotations: str | Path | None = None,
    images: str | Path | None = None,
    backbone: str | None = None,
) -> tuple[Any, str]:
    """The run config with the command line's data choices applied, and ``"shapes"`` or ``"corpus"``.

    Args:
        run_cfg: the loaded run config (preset + overrides).
        dataset: ``auto`` (corpora when the config names any data, else the Shapes world), ``shapes``, ``corpus``,
            ``imagefolder`` / ``webdataset`` (corpora; checks the kind of ``data.images``), ``cirr`` / ``fashioniq``
            (sets ``data.benchmark``).
        annotations / images: the benchmark's annotation and image roots (set ``data.annotations`` /
            ``data.benchmark_images``).
        backbone: backbone spec overriding the config's.

    Raises:
        ValueError: an unknown dataset, or a choice that contradicts the config (naming both).
    """
    if dataset not in DATASET_CHOICES:
        raise ValueError(f"unknown training dataset {dataset!r}; choose from {', '.join(DATASET_CHOICES)}")
    data = run_cfg.data
    changes: dict[str, Any] = {}
    if dataset in TRAINING_BENCHMARKS:
        changes["benchmark"] = dataset
    if annotations is not None:
        changes["annotations"] = str(annotations)
    if images is not None:
        changes["benchmark_images"] = str(images)
    data = dataclasses.replace(data, **changes)
    run_cfg = dataclasses.replace(run_cfg, data=data, **({"backbone": backbone} if backbone else {}))
    if dataset == "shapes":
        if data.used():
            raise ValueError("--dataset shapes, but the config names training data (data.*); drop one of them")
        return run_cfg, "shapes"
    if dataset == "auto":
        return run_cfg, "corpus" if data.used() else "shapes"
    if not data.used():
        raise ValueError(f"--dataset {dataset} needs data: --data images=PATH, captions=PATH, triplets=PATH, ...")
    if dataset in ("imagefolder", "webdataset"):
        if not data.images:
            raise ValueError(f"--dataset {dataset} needs --data images=PATH")
        is_dir = Path(data.images).is_dir()
        if is_dir != (dataset == "imagefolder"):
            kind = "a folder" if is_dir else "not a folder"
            raise ValueError(f"--dataset {dataset}, but data.images {data.images!r} is {kind}")
    return run_cfg, "corpus"


def effective_config(run_cfg: Any) -> str:
    """The run config as YAML, exactly as a run uses it (preset, overrides and dry-run changes applied)."""
    import yaml

    return yaml.safe_dump(to_dict(run_cfg), sort_keys=False, width=120)
