"""How far the CLIP4Cir combiner's Shapes budget holds it below what its training data allows (validation only).

The Shapes preset runs each of the combiner's two stages for 400 steps of 128 triplets, about 13 passes over the
world's 4,000 CIRR-format training triplets, where the reference trains stage 1 for 100 epochs and the Combiner for
300. Calibrating the world may use the combiner (issue 16), so this study trains it with every stage's steps
multiplied by each ``--scale`` (the production loop, its preset otherwise unchanged, selection on val as always)
and reports, on the **validation** splits only, CIRR-format R@1 and CIRCO-format mAP@10 beside image-only and sum,
with the step each stage selected. A selected step at the end of its stage means the stage was still improving.

``--train-queries N`` builds the full world with N CIRR-format training queries instead (CIRR itself has 28,225
training triplets). Each split draws from its own random stream, so val, test and the corpus are the default
world's, and the image-only and sum rows do not move; the world id does, so its runs never mix with the default's.

    python benchmarks/study_shapes_combiner_budget.py --root runs/shapes --runs runs/demo/methods --scale 1 4 \
        [--train-queries 16000]

docs/RESULTS.md has its table (the calibration section).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from cirlab.backbones.shapes_clip import shapes_clip, shipped_dir, shipped_record
from cirlab.data.shapes import ShapesConfig, build_world, world_id
from cirlab.experiments import SHAPES_ROOT
from cirlab.experiments.shapes_env import ShapesEnv, prepare_shapes
from cirlab.experiments.study import Row, run_study
from cirlab.features.cache import FeatureCache
from cirlab.training.run_config import load_run_config
from cirlab.training.sources import ShapesSource

SPLITS = ("cirr/val", "circo/val")


def scaled_overrides(scale: float) -> tuple[str, ...]:
    """``key=value`` overrides that multiply the steps of every stage of the combiner's Shapes preset."""
    run_cfg = load_run_config("combiner", "shapes")
    stages = ("finetune", "combiner")
    return tuple(f"{s}.steps={round(getattr(run_cfg, s).steps * scale)}" for s in stages)


def full_world_env(root: Path, train_queries: int | None = None, gap: float = 0.0, quick: bool = False) -> ShapesEnv:
    """The full Shapes world in ``root`` (built or reused; the quick one with ``quick``) with the shipped CLIP;
    ``train_queries`` overrides the number of CIRR-format training queries, ``gap`` gives the CLIP that modality gap
    (``HFCLIPBackbone``)."""
    if train_queries is None:
        env = prepare_shapes(quick=quick, root=root, log=print)
        if gap:
            env = ShapesEnv(
                env.world, shapes_clip(modality_gap=gap).freeze(), env.source, env.clip_metrics, env.clip_dir
            )
        return env
    base = ShapesConfig.quick() if quick else ShapesConfig()
    cfg = dataclasses.replace(base, cirr=dataclasses.replace(base.cirr, train_queries=train_queries))
    world = build_world(cfg, root / f"world-{world_id(cfg)}", log=print)
    source = ShapesSource(world, FeatureCache(root / "features"))
    return ShapesEnv(world, shapes_clip(modality_gap=gap).freeze(), source, shipped_record()["metrics"], shipped_dir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=SHAPES_ROOT, help="where the world and its CLIP are kept")
    parser.add_argument("--runs", type=Path, default=Path("runs/demo/methods"), help="trained runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--scale", type=float, nargs="+", default=[1.0, 4.0], help="step multipliers")
    parser.add_argument("--train-queries", type=int, default=None, help="CIRR-format training queries of the world")
    args = parser.parse_args()
    t0 = time.perf_counter()
    env = full_world_env(args.root, args.train_queries)
    rows = [Row("image-only", "image-only"), Row("sum", "sum")]
    rows += [Row(f"combiner x{s:g}", "combiner", overrides=scaled_overrides(s)) for s in args.scale]
    results = run_study(env, rows, args.seeds, False, args.runs, splits=SPLITS)
    print(f"\nworld {env.world.world_id}, seeds {args.seeds}, {time.perf_counter() - t0:.0f} s; validation only")
    print("| row | CIRR R@1 | CIRCO mAP@10 | selected step (finetune, combiner) per seed |")
    print("|---|---|---|---|")
    for label, r in results["methods"].items():
        cells = []
        for split, key in zip(SPLITS, ("recall_at_1", "map_at_10"), strict=True):
            stat = r["summary"][split]["all"][key]
            cells.append(f"{stat['mean']:.1f} ± {stat['std']:.1f}")
        steps = [
            "/".join(f"{st['best_step']} of {st['steps']}" for st in report.values()) for report in r["train"] if report
        ]
        print(f"| {label} | {' | '.join(cells)} | {'; '.join(steps) or '-'} |")


if __name__ == "__main__":
    main()
