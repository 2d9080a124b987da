"""The calibration rows on a variant of the full Shapes world: fewer objects per scene, and/or another Shapes CLIP.

``cirlab shapes-calibrate`` runs on the default worlds only. This script builds the full world with
``--max-objects`` (default: the world's own, 4) and runs the same calibration (backbone, training-free rows, the
three peers, the combiner; seed 0) with the shipped Shapes CLIP or with one pretrained by ``cirlab shapes-pretrain``
(``--clip DIR/shapes-clip``). Worlds of 1 to ``max_objects <= 4`` objects hold only scenes of the kind the shipped
CLIP was pretrained on, so it may serve them; ``shapes-calibrate`` itself would pretrain a new one for any other
scene config.

It is a tool for choosing the world on validation: read the val columns, not test.

    python benchmarks/study_shapes_world_variants.py --max-objects 2 [--clip DIR] [--root R] [--runs R] [--out O]

docs/RESULTS.md has its tables (the calibration section).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from cirlab.backbones.shapes_clip import shapes_clip, shipped_dir, shipped_record
from cirlab.data.shapes import ShapesConfig, build_world, world_id
from cirlab.experiments.calibrate import calibrate, calibration_markdown
from cirlab.experiments.shapes_env import ShapesEnv
from cirlab.features.cache import FeatureCache
from cirlab.io import atomic_write_text, read_json
from cirlab.training.sources import ShapesSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-objects", type=int, default=ShapesConfig().scene.max_objects)
    parser.add_argument("--clip", type=Path, default=None, help="a pretrained Shapes CLIP directory")
    parser.add_argument("--root", type=Path, default=Path("runs/world-variants"))
    parser.add_argument("--runs", type=Path, default=None, help="trained rows (default: ROOT/runs-<clip>)")
    parser.add_argument("--out", type=Path, default=None, help="default: ROOT/calibrate-<world>-<clip>")
    args = parser.parse_args()
    shipped_max = shipped_record()["config"]["scene"]["max_objects"]
    if args.clip is None and not 1 < args.max_objects <= shipped_max:
        parser.error(f"the shipped CLIP saw scenes of 1 to {shipped_max} objects; pass --clip for others")
    t0 = time.perf_counter()
    base = ShapesConfig()
    cfg = dataclasses.replace(base, scene=dataclasses.replace(base.scene, max_objects=args.max_objects))
    world = build_world(cfg, args.root / f"world-{world_id(cfg)}", log=print)
    if args.clip is None:
        backbone, metrics, clip_dir, clip_name = shapes_clip(), shipped_record()["metrics"], shipped_dir(), "shipped"
    else:
        record = read_json(args.clip / "PRETRAINED.json")
        backbone, metrics, clip_dir = shapes_clip(str(args.clip)), record["metrics"], args.clip
        clip_name = args.clip.parent.name
    source = ShapesSource(world, FeatureCache(args.root / "features"))
    env = ShapesEnv(world, backbone.freeze(), source, metrics, clip_dir)
    runs = args.runs or args.root / f"runs-{clip_name}"
    report = calibrate(env, [0], False, runs)
    out = args.out or args.root / f"calibrate-{world.world_id}-{clip_name}"
    out.mkdir(parents=True, exist_ok=True)
    text = calibration_markdown(report)
    atomic_write_text(out / "calibration.md", text + "\n")
    print(text)
    seconds = time.perf_counter() - t0
    print(f"max_objects {args.max_objects}, CLIP {clip_dir}; wrote {out / 'calibration.md'} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
