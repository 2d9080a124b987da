"""Map-to-Compose on the Shapes world: the method against the baselines, and its ablations.

The full run (3 seeds; the world and its CLIP are built or reused under ``--root``)::

    python benchmarks/results_map_to_compose.py --out runs/results-map-to-compose

A smoke run (the small world, a quarter of the steps, one seed)::

    python benchmarks/results_map_to_compose.py --quick --seeds 1 --out runs/results-map-to-compose-quick

Rows: map-to-compose against pic2word, searle, lincir, sum and the supervised combiner; ablations of
map-to-compose: no VSI (``method.use_vsi=false``), no soft alignment (``method.lambda_soft=0``), stage 1 only (the
full run evaluated with its adapters off, which is exactly its stage-1 model because stage 2 trains nothing else),
stage 2 with 1% / 10% / 100% of the synthetic triplet file (``synthetic.fraction``; 100% is the preset, whose file
holds 10% as many triplets as the corpus has images) and with 0% / 20% / 40% of the triplets corrupted (wrong
target; ``synthetic.corrupt_fraction``; 0% is the preset). Every row is trained (or reused: runs are
content-addressed by ``cirlab.experiments.demo.train_or_load``) with the Shapes preset plus its overrides, then
evaluated on the CIRR- and CIRCO-format test splits, all queries and the seen / held-out parts apart. Prints a
Markdown table (mean ± std over seeds) and writes it with every per-seed metric to ``<out>/results.json`` and
``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cirlab.experiments.demo import aggregate, evaluate_on_tests, train_or_load
from cirlab.experiments.report import markdown_table
from cirlab.experiments.shapes_env import DEFAULT_ROOT, ShapesEnv, prepare_shapes
from cirlab.io import atomic_write_json, atomic_write_text
from cirlab.methods import METHODS

M2C = "map-to-compose"


@dataclass(frozen=True)
class Row:
    """One table row: a method trained with the Shapes preset plus ``overrides``.

    Attributes:
        label: the row's name in the table.
        method: registered method name.
        kind: the table's "kind" column (training-free, zero-shot, supervised, ablation).
        overrides: ``key=value`` run-config overrides.
        adapters_off: evaluate with map-to-compose's adapters switched off (its stage-1 model).
    """

    label: str
    method: str
    kind: str
    overrides: tuple[str, ...] = ()
    adapters_off: bool = False


def default_rows() -> list[Row]:
    """The comparison rows, then the ablations; rows equal to the preset run say so and reuse it."""
    rows = [Row("sum", "sum", "training-free")]
    rows += [Row(name, name, "zero-shot") for name in ("pic2word", "searle", "lincir", M2C)]
    rows.append(Row("combiner", "combiner", "supervised"))
    rows += [
        Row("m2c: no VSI", M2C, "ablation", ("method.use_vsi=false",)),
        Row("m2c: no soft alignment", M2C, "ablation", ("method.lambda_soft=0",)),
        Row("m2c: stage 1 only", M2C, "ablation", adapters_off=True),
        Row("m2c: synthetic 1%", M2C, "ablation", ("synthetic.fraction=0.01",)),
        Row("m2c: synthetic 10%", M2C, "ablation", ("synthetic.fraction=0.1",)),
        Row("m2c: synthetic 100% (= m2c)", M2C, "ablation"),
        Row("m2c: corrupted 0% (= m2c)", M2C, "ablation"),
        Row("m2c: corrupted 20%", M2C, "ablation", ("synthetic.corrupt_fraction=0.2",)),
        Row("m2c: corrupted 40%", M2C, "ablation", ("synthetic.corrupt_fraction=0.4",)),
    ]
    return rows


def evaluate_row(row: Row, env: ShapesEnv, seed: int, quick: bool, out: Path, force: bool) -> dict[str, Any]:
    """Trains (or reuses) the row's run for ``seed`` and evaluates it on the test splits.

    Returns:
        ``{"metrics": evaluate_on_tests(...), "train": the run's per-stage training report}``.
    """
    method, report = train_or_load(row.method, env, seed, quick, out, force, row.overrides)
    switch = method.without_adapters() if row.adapters_off else contextlib.nullcontext()
    with switch:
        metrics = evaluate_on_tests(method, env)
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
    done: dict[tuple[str, tuple[str, ...], bool, int], dict[str, Any]] = {}
    for row in rows:
        per_seed, seconds = [], []
        for seed in seeds:
            key = (row.method, row.overrides, row.adapters_off, seed)
            t0 = time.perf_counter()
            if key not in done:
                log(f"[{row.label}] seed {seed}")
                done[key] = evaluate_row(row, env, seed, quick, out, force)
            per_seed.append(done[key])
            seconds.append(time.perf_counter() - t0)
        results["methods"][row.label] = {
            "kind": row.kind,
            "method": row.method,
            "overrides": list(row.overrides),
            "adapters_off": row.adapters_off,
            "runs": [r["metrics"] for r in per_seed],
            "summary": aggregate([r["metrics"] for r in per_seed]),
            "train": [r["train"] for r in per_seed],
            "seconds": seconds,
        }
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/results-map-to-compose"), help="output folder")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row (mean ± std over them)")
    parser.add_argument("--quick", action="store_true", help="the small world and a quarter of the steps")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where Shapes worlds and CLIPs are kept")
    parser.add_argument("--force", action="store_true", help="retrain every run")
    args = parser.parse_args(argv)
    if M2C not in METHODS:
        parser.error(f"{M2C} is not registered")

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    env = prepare_shapes(quick=args.quick, root=args.root)
    results = run(env, default_rows(), list(range(args.seeds)), args.quick, args.out, args.force)
    results["seconds"] = time.perf_counter() - t0
    table = markdown_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", results)
    atomic_write_text(args.out / "results.md", table + "\n")
    print(table)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
