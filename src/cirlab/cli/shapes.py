"""Shapes-world commands: ``shapes-generate`` builds a world directory (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


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


def register(app: typer.Typer) -> None:
    """Adds ``shapes-generate`` to the ``cirlab`` app."""
    app.command("shapes-generate")(shapes_generate_cmd)
