"""From a preset to training inputs: which data a run reads (the Shapes world or real corpora), the backbone, and
the dry run that checks a preset end to end on a tiny model before anyone rents GPUs.

A dry run keeps everything a preset says (method settings, data pipeline, stage order, validation) and changes
only what makes it small: the backbone becomes a random-initialised tiny one of its family (``tiny``, the small
CLIP, or for a multimodal LLM ``mllm:<dir>``, a tiny Qwen2.5-VL written to a temporary directory), each stage runs a
few steps on small batches, each corpus is cut to its first few samples, and the compute budgets a method's config
marks (``cirlab.config.budget_field``: SEARLE's OTI steps and inverted images) are capped the same way.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from cirlab.backbones import parse_spec
from cirlab.config import shrink_budgets, to_dict
from cirlab.training.corpus_source import BENCHMARKS, CorpusSource
from cirlab.training.loop import TrainConfig

DATASET_CHOICES = ("auto", "shapes", "corpus", "imagefolder", "webdataset", *BENCHMARKS)
DRY_RUN_BACKBONE = "tiny"


@dataclasses.dataclass(frozen=True)
class DryRun:
    """How small a dry run is: steps and batch size per stage, samples per corpus."""

    steps: int = 2
    batch_size: int = 4
    limit: int = 16


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
    if dataset in BENCHMARKS:
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


def dry_run_backbone(spec: str, workdir: str | Path | None = None) -> str:
    """The spec of the tiny random backbone a dry run uses in place of ``spec``.

    A multimodal LLM (``mllm:...``) becomes ``mllm:<dir>``, a tiny Qwen2.5-VL saved under ``workdir`` (default: a
    new temporary directory), so that what only that family serves (pair embeddings) still runs; any other spec
    becomes ``tiny``, keeping the spec's preprocessing options (``#targetpad=...``).
    """
    if parse_spec(spec)[0] != "mllm":
        _, sep, options = spec.partition("#")
        return DRY_RUN_BACKBONE + sep + options
    from cirlab.backbones.tiny import save_tiny_mllm

    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="cirlab-dry-run-"))
    return f"mllm:{save_tiny_mllm(root / 'tiny-mllm')}"


def dry_run_config(run_cfg: Any, dry: DryRun | None = None, workdir: str | Path | None = None) -> Any:
    """The run config made small (see the module docstring): stage steps, batches, corpus sizes and the method's
    marked budgets capped, no intermediate validation or checkpoints, no bf16 (CPU), a tiny backbone of the same
    family (``dry_run_backbone``; ``workdir`` is where a tiny multimodal LLM is saved)."""
    dry = dry or DryRun()
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(run_cfg):
        value = getattr(run_cfg, f.name)
        if isinstance(value, TrainConfig):
            changes[f.name] = dataclasses.replace(
                value,
                steps=min(value.steps, dry.steps),
                batch_size=min(value.batch_size, dry.batch_size),
                grad_accum=1,
                eval_every=0,
                checkpoint_every=0,
                bf16=False,
                log_every=1,
            )
    data = run_cfg.data
    limit = min(data.limit, dry.limit) if data.limit else dry.limit
    changes["data"] = dataclasses.replace(data, limit=limit, encode_batch_size=min(data.encode_batch_size, 64))
    changes["backbone"] = dry_run_backbone(run_cfg.backbone, workdir)
    changes["method"] = shrink_budgets(run_cfg.method, steps=dry.steps, items=dry.limit)
    return dataclasses.replace(run_cfg, **changes)


def effective_config(run_cfg: Any) -> str:
    """The run config as YAML, exactly as a run uses it (preset, overrides and dry-run changes applied)."""
    import yaml

    return yaml.safe_dump(to_dict(run_cfg), sort_keys=False, width=120)


def corpus_inputs(run_cfg: Any) -> tuple[Any, CorpusSource, str | None]:
    """The frozen backbone, the ``CorpusSource`` and the validation split (or None) of a corpus run.

    Raises:
        ValueError: the config names no backbone.
    """
    from cirlab.backbones import create_backbone
    from cirlab.features.cache import FeatureCache, default_cache_dir

    if not run_cfg.backbone:
        raise ValueError("a corpus run needs a backbone: set `backbone:` in the preset, --backbone or --set backbone=")
    backbone = create_backbone(run_cfg.backbone).freeze()
    cache = FeatureCache(run_cfg.data.cache_dir or default_cache_dir())
    return backbone, CorpusSource(run_cfg.data, cache), run_cfg.data.val or None
