"""Shapes-world commands: ``shapes-generate`` (a world directory, no torch), ``shapes-pretrain`` (the Shapes CLIP)
and ``shapes-calibrate`` (whether the world can tell methods apart)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cirlab.experiments import SHAPES_ROOT, default_jobs


def shapes_generate_cmd(
    out_dir: Annotated[Path, typer.Argument(help="World directory to create (reused when it holds the same world).")],
    quick: Annotated[bool, typer.Option("--quick", help="The small preset (builds in a few seconds).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Master seed of the world.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different world found in OUT_DIR.")] = False,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Config override KEY=VALUE, e.g. cirr.test_queries=500 (repeatable)."),
    ] = None,
) -> None:
    """Build a Shapes world: CIRR- and CIRCO-format benchmarks, a caption corpus and synthetic triplets.

    Prints the world id and its directory; an existing build of the same config is reused.

    Example: `cirlab shapes-generate runs/shapes-quick --quick --seed 0`
    """
    from cirlab.config import apply_overrides
    from cirlab.data.shapes import ShapesConfig, build_world

    cfg = ShapesConfig.quick(seed=seed) if quick else ShapesConfig(seed=seed)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    world = build_world(cfg, out_dir, overwrite=overwrite, log=typer.echo)
    typer.echo(f"world {world.world_id}: {world.root}")


def shapes_pretrain_cmd(
    out_dir: Annotated[
        Path, typer.Argument(help="Run folder: trainer state, metrics.csv and shapes-clip/ (the model).")
    ],
    seed: Annotated[int, typer.Option("--seed", help="Initialisation and data seed.")] = 0,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Pretraining config override KEY=VALUE, e.g. train.steps=500 (repeatable)."),
    ] = None,
) -> None:
    """Pretrain the Shapes world's CLIP the way cirlab's shipped one was made (alt-text captions, hard negatives).

    Writes OUT_DIR/shapes-clip/, a model directory with PRETRAINED.json (file digests, this command, the config and
    the held-out-scene retrieval metrics); it loads as `shapes-clip:OUT_DIR/shapes-clip`. Re-running the same
    command resumes an interrupted run. Copying OUT_DIR/shapes-clip/ over src/cirlab/assets/shapes-clip/ ships it.

    Example: `cirlab shapes-pretrain runs/shapes-clip-pretrain`
    """
    import shlex
    import sys

    import torch

    from cirlab.config import apply_overrides
    from cirlab.training.clip_pretrain import CLIPPretrainConfig, export_pretrained, pretrain_clip

    cfg = CLIPPretrainConfig()
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    cfg.train.seed = seed
    torch.manual_seed(seed)
    typer.echo(f"pretraining the Shapes CLIP: {cfg.train.steps} steps of {cfg.train.batch_size} scenes")
    backbone, metrics = pretrain_clip(cfg, out_dir / "run", seed)
    command = "cirlab " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "cirlab shapes-pretrain"
    export_pretrained(backbone, cfg, metrics, command, out_dir / "shapes-clip")
    typer.echo("held-out scenes (%): " + ", ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
    typer.echo(f"wrote {out_dir / 'shapes-clip'}")


def shapes_calibrate_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output folder (calibration.json, .md, .png).")] = Path(
        "runs/calibrate"
    ),
    quick: Annotated[bool, typer.Option("--quick", help="The quick world (held to the order checks only).")] = False,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per trained row.")] = 3,
    root: Annotated[Path, typer.Option("--root", help="Where Shapes worlds and CLIPs are kept.")] = SHAPES_ROOT,
    runs: Annotated[Path, typer.Option("--runs", help="Trained runs (shared with the demo).")] = Path(
        "runs/demo/methods"
    ),
    pretrain: Annotated[bool, typer.Option("--pretrain", help="Pretrain the CLIP instead of the shipped one.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Retrain every row.")] = False,
    jobs: Annotated[
        int, typer.Option("--jobs", min=1, help="Runs trained at once, in worker processes (1: in this one).")
    ] = default_jobs(),
) -> None:
    """Check that the Shapes world can tell CIR methods apart: backbone, published order, headroom.

    Measures on val and test the backbone (held-out-scene retrieval, the target-caption oracle) and the
    training-free, peer zero-shot and supervised combiner rows over --seeds seeds; marks each check pass or fail;
    writes a table and a chart. Exits 1 when a check fails.

    Example: `cirlab shapes-calibrate --quick --seeds 3`
    """
    import time

    from cirlab.experiments.calibrate import calibrate, calibration_chart, calibration_markdown
    from cirlab.experiments.shapes_env import prepare_shapes
    from cirlab.io import atomic_write_json, atomic_write_text

    t0 = time.perf_counter()
    env = prepare_shapes(quick=quick, root=root, log=typer.echo, pretrain=pretrain)
    report = calibrate(env, list(range(seeds)), quick, runs, force, log=typer.echo, jobs=jobs)
    report["seconds"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "calibration.json", report)
    text = calibration_markdown(report)
    atomic_write_text(out / "calibration.md", text)
    calibration_chart(report, out / "calibration.png")
    typer.echo(text)
    typer.echo(f"wrote {out / 'calibration.json'}, {out / 'calibration.md'}, {out / 'calibration.png'}")
    if not report["passed"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Adds the Shapes commands to the ``cirlab`` app."""
    app.command("shapes-generate")(shapes_generate_cmd)
    app.command("shapes-pretrain")(shapes_pretrain_cmd)
    app.command("shapes-calibrate")(shapes_calibrate_cmd)
