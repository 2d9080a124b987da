"""Trained runs of the Shapes world's studies: content-addressed training (or reuse) of a method with its Shapes
preset, evaluation on the test splits, and aggregation over seeds.

A run's folder name digests the method, its whole run config, the backbone, the world and the seed, so re-running
any study or ``cirlab demo`` reuses it; a new run first copies the finished earlier stages it shares with another.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cirlab.config import config_digest, to_dict
from cirlab.data.shapes import ShapesConfig
from cirlab.evaluation.evaluate import evaluate
from cirlab.experiments.shapes_env import ShapesEnv
from cirlab.experiments.standins import prepare_standins, with_standins
from cirlab.generation.cache import TextCache
from cirlab.io import atomic_write_json, atomic_write_text
from cirlab.methods import METHODS, create_method, load_method
from cirlab.training.run import fit
from cirlab.training.run_config import load_run_config, scale_steps

TEST_SPLITS = ("cirr/test1", "circo/test")


def quick_steps(data: str) -> float:
    """The fraction of its steps a stage that reads ``data`` (a data kind) runs on the quick world: the quick
    world's share of that data (a quarter of the corpus and of the synthetic triplets, an eighth of the train
    triplets), so that every stage makes as many passes over its data as on the full world."""
    full, quick = ShapesConfig(), ShapesConfig.quick()
    if data in ("triplets", "pseudo_triplets"):
        return quick.cirr.train_queries / full.cirr.train_queries
    if data == "synthetic_triplets":
        return quick.synthetic.triplets / full.synthetic.triplets
    return quick.corpus.images / full.corpus.images


def _stage_keys(cls: Any, run_cfg: Any, identity: list[Any]) -> dict[str, str]:
    """Per stage, a digest of everything its trained weights may depend on: the whole run config (and the backbone
    and world) except the loop configs of later stages and, until a stage up to this one reads synthetic triplets,
    the synthetic-triplet options. Two runs whose keys agree for a stage trained identical weights up to that stage;
    a run-config field this does not know about is part of every key, so it can only prevent reuse, never fake it.
    """
    whole = to_dict(run_cfg)
    keys, synthetic = {}, False
    names = [stage.name for stage in cls.stages]
    for i, stage in enumerate(cls.stages):
        synthetic = synthetic or stage.data == "synthetic_triplets"
        later = set(names[i + 1 :]) | (set() if synthetic else {"synthetic"})
        keys[stage.name] = config_digest([{k: v for k, v in whole.items() if k not in later}, *identity], 10)
    return keys


def _reuse_earlier_stages(runs: Path, prefix: str, run_dir: Path, keys: dict[str, str]) -> list[str]:
    """Copies finished stages from another run with the same stage keys into ``run_dir`` (the loop then resumes
    them at their last step and trains nothing); returns the names of the stages it copied. Only a prefix of
    stages is reused: a later stage is trained on the weights of the ones before it.
    """
    copied: list[str] = []
    for stage, key in keys.items():
        target = run_dir / "stages" / stage
        donor = next(
            (
                d.parent
                for d in sorted(runs.glob(f"{prefix}-*/stages/{stage}/stage_key"))
                if d.read_text().strip() == key and d.parent != target and (d.parent / "best").is_dir()
            ),
            None,
        )
        if donor is None or (target / "best").is_dir():
            break
        tmp = target.with_name(f".{stage}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(donor, tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(target)
        copied.append(stage)
    return copied


def run_of(
    name: str, env: ShapesEnv, seed: int, quick: bool, runs: Path, overrides: Sequence[str] = ()
) -> tuple[Any, Path]:
    """The run config of ``name`` with its Shapes preset plus ``overrides`` for ``seed`` (steps scaled on the quick
    world), and the folder its run is kept in under ``runs`` (named by a digest of all of it)."""
    cls = METHODS.get(name)
    run_cfg = load_run_config(name, "shapes", overrides)
    if quick:
        run_cfg = scale_steps(run_cfg, {stage.name: quick_steps(stage.data) for stage in cls.stages})
    stages = {s.name: dataclasses.replace(getattr(run_cfg, s.name), seed=seed) for s in cls.stages}
    run_cfg = dataclasses.replace(run_cfg, seed=seed, **stages)
    if cls.generators:
        method_cfg = with_standins(name, run_cfg.method, prepare_standins(env, quick))
        run_cfg = dataclasses.replace(run_cfg, method=dataclasses.replace(method_cfg, seed=seed))
    identity = [env.backbone.identity(), env.world.world_id]
    key = config_digest([to_dict(run_cfg), *identity], 10)
    return run_cfg, Path(runs) / f"{name}-s{seed}-{key}"


def is_trained(run_dir: Path) -> bool:
    """Whether a run folder holds a finished run."""
    return (run_dir / "train_report.json").is_file()


def train_or_load(
    name: str,
    env: ShapesEnv,
    seed: int,
    quick: bool,
    runs: Path,
    force: bool,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """The method trained with its Shapes preset plus ``overrides`` (reused when an identical run exists in
    ``runs``); returns it and its report. A new run first copies the earlier stages it shares with a finished run
    (same stage keys), so ablations of a later stage do not retrain the stages before it.

    A method that generates texts (CIReVL, LDRE, OSrCIR) gets the world's stand-in models
    (``cirlab.experiments.standins``) and ``seed`` as its sampling seed; its texts are kept with the run, in
    ``<run>/generations.jsonl``, so evaluating it again runs no model. ``progress`` shows the training bars.
    """
    cls = METHODS.get(name)
    run_cfg, run_dir = run_of(name, env, seed, quick, runs, overrides)
    identity = [env.backbone.identity(), env.world.world_id]
    if not cls.stages:
        method = create_method(name, env.backbone, run_cfg.method).eval()
        if cls.generators:
            texts = run_dir / "generations.jsonl"
            if force:
                texts.unlink(missing_ok=True)
            method.text_cache = TextCache(texts)
        return method, {}
    if is_trained(run_dir) and not force:
        return load_method(run_dir, backbone=env.backbone), json.loads((run_dir / "train_report.json").read_text())
    keys = _stage_keys(cls, run_cfg, identity)
    reused = [] if force else _reuse_earlier_stages(Path(runs), f"{name}-s{seed}", run_dir, keys)
    torch.manual_seed(seed)
    method = create_method(name, env.backbone, run_cfg.method)
    report = fit(method, env.source, run_cfg, run_dir, progress=progress)
    for stage, stage_key in keys.items():
        atomic_write_text(run_dir / "stages" / stage / "stage_key", stage_key + "\n")
        if stage in reused:
            report[stage]["reused"] = True
    atomic_write_json(run_dir / "train_report.json", report)
    return method, report


def evaluate_on_tests(method: Any, env: ShapesEnv, splits: Sequence[str] = TEST_SPLITS) -> dict[str, Any]:
    """Metrics on each split (the test splits by default): all queries, seen, held-out (template and combination)
    parts."""
    out = {}
    for split_name in splits:
        split = env.source.split(split_name)
        feats = env.source.features_for(method, split_name)
        t0 = time.perf_counter()
        result = evaluate(method, split, features=feats, subsets=env.source.subsets(split_name))
        out[split_name] = {
            "all": result.metrics,
            **result.subsets,
            "ms_per_query": 1000 * (time.perf_counter() - t0) / max(1, len(split.queries)),
        }
    return out


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every metric of every part of every split."""
    out: dict[str, Any] = {}
    for split_name in runs[0]:
        if not isinstance(runs[0][split_name], dict):
            continue
        out[split_name] = {}
        for part, metrics in runs[0][split_name].items():
            if not isinstance(metrics, dict):
                continue
            out[split_name][part] = {}
            for key in metrics:
                values = [r[split_name][part][key] for r in runs]
                out[split_name][part][key] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                }
    return out


def new_results(env: ShapesEnv, seeds: Sequence[int], quick: bool) -> dict[str, Any]:
    """The results dict's header (world, CLIP quality, seeds); methods are added under ``methods``."""
    return {"methods": {}, "seeds": list(seeds), "quick": quick, "world": env.world.world_id, "clip": env.clip_metrics}
