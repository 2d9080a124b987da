"""The dry run: a preset checked end to end on a tiny model before anyone rents GPUs.

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
from cirlab.config import shrink_budgets
from cirlab.training.loop import TrainConfig

DRY_RUN_BACKBONE = "tiny"


@dataclasses.dataclass(frozen=True)
class DryRun:
    """How small a dry run is: steps and batch size per stage, samples per corpus."""

    steps: int = 2
    batch_size: int = 4
    limit: int = 16


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
