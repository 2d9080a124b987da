"""Fusion-Diff on the Shapes world: the method against the baselines, its ablations, and query latency.

The full run (3 seeds; the world and its CLIP are built or reused under ``--root``)::

    python benchmarks/results_fusion_diff.py --out runs/results-fusion-diff

A smoke run (the small world, a quarter of the steps, one seed; about 4 min on 2 busy cores once the world and its
CLIP exist)::

    python benchmarks/results_fusion_diff.py --quick --seeds 1 --out runs/results-fusion-diff-quick

Rows: fusion-diff against map-to-compose (when registered), lincir, pic2word, sum and the supervised combiner;
ablations of fusion-diff: the stage-1 prior alone (the full run sampled with its adapter off, which is exactly its
stage-1 model because stage 2 trains nothing else), the adapter trained without stage 1
(``method.adapter_from_scratch=true``: the prior is trained jointly with it on the synthetic triplets), no
guidance (``guidance_scale=1`` at sampling time), 10 (the preset) vs 50 DDIM steps (sampling time), and stage 2
on 10% / 50% / 100% of the synthetic triplets (``synthetic.fraction``; 100% is the preset). Sampling-time rows
reuse the preset's trained run. Every run is trained (or reused: runs are content-addressed by
``cirlab.experiments.demo.train_or_load``) with the Shapes preset plus its overrides, then evaluated on the CIRR-
and CIRCO-format test splits, all queries and the seen / held-out parts apart, with the query latency (ms per
query on CPU, the whole evaluation of the CIRR-format test split divided by its queries). Prints a Markdown table
(mean ± std over seeds) and writes it with every per-seed metric to ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import cirlab.methods.fusion_diff  # noqa: F401  (registers "fusion-diff" wherever cirlab.methods does not yet)
from cirlab.config import apply_overrides
from cirlab.experiments.demo import aggregate, evaluate_on_tests, train_or_load
from cirlab.experiments.report import markdown_table
from cirlab.experiments.shapes_env import DEFAULT_ROOT, ShapesEnv, prepare_shapes
from cirlab.io import atomic_write_json, atomic_write_text
from cirlab.methods import METHODS

FD = "fusion-diff"
LATENCY_SPLIT = "cirr/test1"


@dataclass(frozen=True)
class Row:
    """One table row: a method trained with the Shapes preset plus ``overrides``, sampled with ``sampling``.

    Attributes:
        label: the row's name in the table.
        method: registered method name.
        kind: the table's "kind" column (training-free, zero-shot, supervised, ablation).
        overrides: ``key=value`` run-config overrides (they change the trained run).
        sampling: ``key=value`` overrides of the trained method's config applied only when evaluating (fusion-diff's
            sampling settings: ``guidance_scale``, ``ddim_steps``, ``use_adapter``), so the trained run is reused.
    """

    label: str
    method: str
    kind: str
    overrides: tuple[str, ...] = ()
    sampling: tuple[str, ...] = ()


def default_rows() -> list[Row]:
    """The comparison rows, then the ablations; rows equal to the preset run say so and reuse it."""
    rows = [Row("sum", "sum", "training-free")]
    rows += [Row(name, name, "zero-shot") for name in ("pic2word", "lincir", "map-to-compose", FD) if name in METHODS]
    rows.append(Row("combiner", "combiner", "supervised"))
    rows += [
        Row("fd: stage-1 prior only", FD, "ablation", sampling=("use_adapter=false",)),
        Row("fd: adapter without stage 1", FD, "ablation", ("method.adapter_from_scratch=true",)),
        Row("fd: no guidance", FD, "ablation", sampling=("guidance_scale=1",)),
        Row("fd: 10 DDIM steps (= fd)", FD, "ablation"),
        Row("fd: 50 DDIM steps", FD, "ablation", sampling=("ddim_steps=50",)),
        Row("fd: synthetic 10%", FD, "ablation", ("synthetic.fraction=0.1",)),
        Row("fd: synthetic 50%", FD, "ablation", ("synthetic.fraction=0.5",)),
        Row("fd: synthetic 100% (= fd)", FD, "ablation"),
    ]
    return rows


def evaluate_row(row: Row, env: ShapesEnv, seed: int, quick: bool, out: Path, force: bool) -> dict[str, Any]:
    """Trains (or reuses) the row's run for ``seed`` and evaluates it on the test splits with its sampling settings.

    Returns:
        ``{"metrics": evaluate_on_tests(...), "train": the run's per-stage training report}``.
    """
    method, report = train_or_load(row.method, env, seed, quick, out, force, row.overrides)
    trained = method.config
    if row.sampling:
        method.config = apply_overrides(trained, list(row.sampling))
    try:
        metrics = evaluate_on_tests(method, env)
    finally:
        method.config = trained
    return {"metrics": metrics, "train": report}


def run(
    env: ShapesEnv,
    rows: list[Row],
    seeds: list[int],
    quick: bool,
    out: Path,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every row for every seed; results in the demo's format (so ``markdown_table`` renders them)."""
    results: dict[str, Any] = {"methods": {}, "seeds": seeds, "quick": quick, "world": env.world.world_id}
    done: dict[tuple[str, tuple[str, ...], tuple[str, ...], int], dict[str, Any]] = {}
    for row in rows:
        per_seed, seconds = [], []
        for seed in seeds:
            key = (row.method, row.overrides, row.sampling, seed)
            t0 = time.perf_counter()
            if key not in done:
                log(f"[{row.label}] seed {seed}")
                done[key] = evaluate_row(row, env, seed, quick, out, force)
            per_seed.append(done[key])
            seconds.append(time.perf_counter() - t0)
        latency = [r["metrics"][LATENCY_SPLIT]["ms_per_query"] for r in per_seed]
        results["methods"][row.label] = {
            "kind": row.kind,
            "method": row.method,
            "overrides": list(row.overrides),
            "sampling": list(row.sampling),
            "runs": [r["metrics"] for r in per_seed],
            "summary": aggregate([r["metrics"] for r in per_seed]),
            "ms_per_query": {
                "mean": statistics.fmean(latency),
                "std": statistics.stdev(latency) if len(latency) > 1 else 0.0,
            },
            "train": [r["train"] for r in per_seed],
            "seconds": seconds,
        }
    return results


def results_table(results: dict[str, Any]) -> str:
    """The demo's Markdown table with a latency column (ms per query, CPU) beside each row."""
    lines = markdown_table(results).split("\n")
    lines[0] += " ms/query |"
    lines[1] += "---|"
    for i, r in enumerate(results["methods"].values(), start=2):
        lines[i] += f" {r['ms_per_query']['mean']:.2f} |"
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/results-fusion-diff"), help="output folder")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row (mean ± std over them)")
    parser.add_argument("--quick", action="store_true", help="the small world and a quarter of the steps")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where Shapes worlds and CLIPs are kept")
    parser.add_argument("--force", action="store_true", help="retrain every run")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    env = prepare_shapes(quick=args.quick, root=args.root)
    results = run(env, default_rows(), list(range(args.seeds)), args.quick, args.out, args.force)
    results["seconds"] = time.perf_counter() - t0
    results["torch_threads"] = torch.get_num_threads()
    table = results_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", results)
    atomic_write_text(args.out / "results.md", table + "\n")
    print(table)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
