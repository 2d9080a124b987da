"""Comparison and ablation studies on the Shapes world: rows of (method, run overrides, evaluation overrides),
each trained (or reused) for several seeds and evaluated on the test splits, in one table.

The per-method results scripts in ``benchmarks/`` only declare their rows; this module runs them. Runs are kept
content-addressed under one folder (``runs``), so a study reuses the runs of ``cirlab demo --seeds 3`` and of other
studies, and rows that differ only in a later stage reuse the earlier stages they share
(``cirlab.experiments.runs.train_or_load``). ``cirlab demo`` is the study of one plain row per method.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cirlab.config import apply_overrides
from cirlab.experiments import SHAPES_ROOT, default_jobs
from cirlab.experiments.report import markdown_table
from cirlab.experiments.runs import TEST_SPLITS, aggregate, evaluate_on_tests, new_results, train_or_load
from cirlab.experiments.shapes_env import ShapesEnv, prepare_shapes
from cirlab.experiments.workers import TrainingPool, TrainTask
from cirlab.io import atomic_write_json, atomic_write_text
from cirlab.methods import METHODS

LATENCY_SPLIT = "cirr/test1"  # query latency is reported on this split, or on the first one a study evaluates


@dataclass(frozen=True)
class Row:
    """One table row: ``method`` trained with its Shapes preset plus ``overrides``, evaluated with ``evaluation``.

    Attributes:
        label: the row's name in the table.
        method: registered method name.
        kind: the table's "kind" column (training-free, zero-shot, supervised, ablation); default from the method.
        overrides: ``key=value`` run-config overrides (they change the trained run).
        evaluation: ``key=value`` overrides of the trained method's own config applied only while evaluating
            (switching a trained part off, sampling settings), so the trained run is reused.
    """

    label: str
    method: str
    kind: str = ""
    overrides: tuple[str, ...] = ()
    evaluation: tuple[str, ...] = ()


def method_kind(name: str) -> str:
    """``supervised``, ``zero-shot`` or ``training-free``."""
    cls = METHODS.get(name)
    return "supervised" if cls.supervised else ("zero-shot" if cls.stages else "training-free")


def comparison_rows(names: Sequence[str]) -> list[Row]:
    """A plain row per registered method in ``names`` (unregistered names are left out)."""
    return [Row(n, n, method_kind(n)) for n in names if n in METHODS]


OnRun = Callable[[Row, int, Any], None]


def evaluate_row(
    row: Row,
    env: ShapesEnv,
    seed: int,
    quick: bool,
    runs: Path,
    force: bool,
    on_run: OnRun | None = None,
    splits: Sequence[str] = TEST_SPLITS,
) -> dict[str, Any]:
    """Trains (or reuses) the row's run for ``seed`` and evaluates it on ``splits`` (the test splits by default).

    Args:
        on_run: called as ``on_run(row, seed, method)`` after the evaluation, while the evaluation overrides are
            still applied (the demo collects example rankings there).
        splits: the Shapes splits to evaluate on.

    Returns:
        ``{"metrics": evaluate_on_tests(...), "train": the run's per-stage training report}``.
    """
    t0 = time.perf_counter()
    method, report = train_or_load(row.method, env, seed, quick, runs, force, row.overrides)
    t1 = time.perf_counter()
    trained = method.config
    method.config = apply_overrides(trained, list(row.evaluation))
    try:
        metrics = evaluate_on_tests(method, env, splits)
        if on_run is not None:
            on_run(row, seed, method)
    finally:
        method.config = trained
    return {"metrics": metrics, "train": report, "seconds": {"train": t1 - t0, "evaluate": time.perf_counter() - t1}}


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def run_study(
    env: ShapesEnv,
    rows: Sequence[Row],
    seeds: Sequence[int],
    quick: bool,
    runs: Path,
    force: bool = False,
    log: Callable[[str], None] = print,
    on_run: OnRun | None = None,
    splits: Sequence[str] = TEST_SPLITS,
    jobs: int = 1,
) -> dict[str, Any]:
    """Every row for every seed on ``splits``; results in the demo's format (so ``markdown_table`` renders them).

    Rows with the same (method, overrides, evaluation) are evaluated once per seed and shared (``on_run``, see
    :func:`evaluate_row`, is then called for the first of them only). A method the seed cannot change (no training
    stage, no sampled text) is evaluated once and that result stands for every seed. With ``jobs`` > 1 the runs
    that need training are trained ``jobs`` at a time in worker processes (``TrainingPool``) while the rows whose
    runs are ready are evaluated here on the cores the workers leave free; the methods that generate texts keep
    training here.
    """
    tasks = [
        TrainTask(row.method, row.overrides, seed)
        for row in rows
        if jobs > 1 and METHODS.get(row.method).stages and not METHODS.get(row.method).generators
        for seed in seeds
    ]
    with TrainingPool(env, tasks, quick, runs, force, jobs, log) as pool:
        return _run_rows(env, rows, seeds, quick, runs, force, log, on_run, splits, pool)


def _run_rows(
    env: ShapesEnv,
    rows: Sequence[Row],
    seeds: Sequence[int],
    quick: bool,
    runs: Path,
    force: bool,
    log: Callable[[str], None],
    on_run: OnRun | None,
    splits: Sequence[str],
    pool: TrainingPool,
) -> dict[str, Any]:
    results = new_results(env, seeds, quick)
    done: dict[tuple[str, tuple[str, ...], tuple[str, ...], int], dict[str, Any]] = {}
    for row in rows:
        latency_split = LATENCY_SPLIT if LATENCY_SPLIT in splits else splits[0]
        per_seed, seconds = [], []
        cls = METHODS.get(row.method)
        seeded = bool(cls.stages or cls.generators)
        for seed in seeds:
            key = (row.method, row.overrides, row.evaluation, seed if seeded else None)
            t0 = time.perf_counter()
            if key not in done:
                task = TrainTask(row.method, row.overrides, seed)
                # Evaluate on a core no worker needs, once a worker has trained the run (with force, if given: load
                # it, do not train it again).
                pool.wait(task)
                again = force and task not in pool
                done[key] = evaluate_row(row, env, seed, quick, runs, again, on_run, splits)
                train_s, eval_s = done[key]["seconds"]["train"], done[key]["seconds"]["evaluate"]
                log(f"[{row.label}] seed {seed}: {train_s:.0f} s to train or load, {eval_s:.0f} s to evaluate")
            per_seed.append(done[key])
            seconds.append(round(time.perf_counter() - t0, 1))
        metrics = [r["metrics"] for r in per_seed]
        results["methods"][row.label] = {
            "kind": row.kind or method_kind(row.method),
            "method": row.method,
            "overrides": list(row.overrides),
            "evaluation": list(row.evaluation),
            "runs": metrics,
            "summary": aggregate(metrics),
            "ms_per_query": _mean_std([m[latency_split]["ms_per_query"] for m in metrics]),
            "train": [r["train"] for r in per_seed],
            "seconds": seconds,
        }
    return results


def study_table(results: dict[str, Any], latency: bool = False) -> str:
    """The demo's Markdown table, optionally with a CPU latency column (ms per CIRR-format test query)."""
    lines = markdown_table(results).split("\n")
    if latency:
        lines[0] += " ms/query |"
        lines[1] += "---|"
        for i, r in enumerate(results["methods"].values(), start=2):
            lines[i] += f" {r['ms_per_query']['mean']:.2f} |"
    return "\n".join(lines)


def study_markdown(results: dict[str, Any], title: str, notes: Sequence[str] = (), latency: bool = False) -> str:
    """A titled table with the setting it was measured in and the command that measured it."""
    mode = "quick world, the full world's passes over its data" if results["quick"] else "full world"
    lines = [
        f"### {title} ({mode}; seeds {results['seeds']}; %)",
        "",
        f"Command: `{results['command']}` ({results['seconds']:.0f} s on {results['torch_threads']} torch threads).",
        "",
        study_table(results, latency),
        "",
        "CIRR: R@K and Rs@1 on `test1`, Avg = (R@5 + Rs@1) / 2; CIRCO: mAP@10 on `test`. Held-out = queries with a "
        "held-out template or (colour, shape) combination; seen = the rest.",
        *notes,
        "",
    ]
    return "\n".join(lines)


def study_main(
    argv: Sequence[str] | None,
    *,
    script: str,
    title: str,
    rows: Callable[[], Sequence[Row]],
    notes: Callable[[], Sequence[str]] = lambda: (),
    latency: bool = False,
    prepare: Callable[[ShapesEnv, bool], Sequence[str]] | None = None,
) -> int:
    """The shared command line of the results scripts; writes ``results.json`` and ``results.md`` into ``--out``.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).
        script: the script's path, for the command line recorded beside the table.
        title: the table's title.
        rows: the study's rows.
        notes: extra lines printed under the table.
        latency: add the ms-per-query column.
        prepare: called as ``prepare(env, quick)`` before the rows run (e.g. to build the models some rows share);
            returns further lines printed under the table.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    name = Path(script).stem.removeprefix("results_").replace("_", "-")
    parser = argparse.ArgumentParser(description=title)
    parser.add_argument("--out", type=Path, default=Path("runs") / f"results-{name}", help="output folder")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per row (mean ± std over them)")
    parser.add_argument("--quick", action="store_true", help="the small world, with as many passes over its data")
    parser.add_argument("--root", type=Path, default=SHAPES_ROOT, help="where Shapes worlds and CLIPs are kept")
    parser.add_argument(
        "--runs", type=Path, default=None, help="where trained runs are kept (default: runs/demo/methods, shared)"
    )
    parser.add_argument("--force", action="store_true", help="retrain every run")
    parser.add_argument(
        "--jobs", type=int, default=default_jobs(), help="runs trained at once, in worker processes (1: in this one)"
    )
    args = parser.parse_args(args_list)

    t0 = time.perf_counter()
    env = prepare_shapes(quick=args.quick, root=args.root)
    prepared = list(prepare(env, args.quick)) if prepare is not None else []
    runs = args.runs or Path("runs") / "demo" / "methods"
    results = run_study(env, list(rows()), list(range(args.seeds)), args.quick, runs, args.force, jobs=args.jobs)
    results["seconds"] = time.perf_counter() - t0
    results["torch_threads"] = torch.get_num_threads()
    results["command"] = " ".join(["python", os.path.relpath(script), *args_list])
    text = study_markdown(results, title, [*notes(), *prepared], latency)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", results)
    atomic_write_text(args.out / "results.md", text)
    print(text)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'} in {results['seconds']:.0f} s")
    return 0
