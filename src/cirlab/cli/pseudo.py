"""``generate-pseudo-targets``: pseudo-target images for a benchmark split (TMCIR's stage A data), resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def generate_pseudo_targets_cmd(
    source: Annotated[
        Path, typer.Argument(help="A Shapes world directory, or a CIRR annotation root with --dataset cirr.")
    ],
    dataset: Annotated[str, typer.Option("--dataset", help="shapes | cirr.")] = "shapes",
    image_root: Annotated[Path | None, typer.Option("--image-root", help="CIRR image root (--dataset cirr).")] = None,
    split: Annotated[str, typer.Option("--split", help="The split whose queries get pseudo-targets.")] = "train",
    generator: Annotated[
        str, typer.Option("--generator", help="shapes-renderer (Shapes only) | diffusers.")
    ] = "shapes-renderer",
    model: Annotated[
        str | None, typer.Option("--model", help="diffusers: a hub id or a local pipeline directory.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder (Shapes default: the cache beside the world that training reads)."),
    ] = None,
    noise: Annotated[
        float, typer.Option("--noise", help="shapes-renderer: probability of changing one attribute of the edit.")
    ] = 0.2,
    noise_attributes: Annotated[
        list[str] | None,
        typer.Option("--noise-attribute", help="shapes-renderer: attributes noise may change (repeatable)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Run seed (each image's seed derives from it and its key).")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Requests per generator call.")] = 16,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N queries (smoke runs).")] = None,
    device: Annotated[str, typer.Option("--device", help="diffusers: where the pipeline runs.")] = "cpu",
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="diffusers setting KEY=VALUE, e.g. steps=20 or pipeline=AutoPipelineForImage2Image."
        ),
    ] = None,
) -> None:
    """Generate pseudo-target images for a split's queries into a folder with a provenance manifest.

    Interrupted runs resume; images already generated are kept. The Shapes renderer applies each query's edit to
    its reference scene with attribute noise (a stand-in for a diffusion model, and reported as such).

    Example: `cirlab generate-pseudo-targets runs/shapes/world-0123abcd --generator shapes-renderer --noise 0.2`
    """
    from cirlab.config import apply_overrides
    from cirlab.data import pseudo_targets as pt

    world = None
    if dataset == "shapes":
        from cirlab.data.shapes import load_world

        world = load_world(source)
        requests = pt.shapes_requests(world, split)
    elif dataset == "cirr":
        from cirlab.data.cirr import load_cirr

        requests = pt.split_requests(load_cirr(source, image_root, split))
    else:
        raise typer.BadParameter(f"unknown dataset {dataset!r} (shapes, cirr)", param_hint="--dataset")
    if limit is not None:
        requests = requests[:limit]

    if generator == "shapes-renderer":
        if world is None:
            raise typer.BadParameter("the Shapes renderer needs a Shapes world", param_hint="--generator")
        attributes = tuple(noise_attributes) if noise_attributes else ("colour", "shape", "size")
        gen: pt.PseudoTargetGenerator = pt.ShapesRendererGenerator.for_world(world, noise, attributes)
    elif generator == "diffusers":
        if not model:
            raise typer.BadParameter("diffusers needs --model (a hub id or a local directory)", param_hint="--model")
        gen = pt.DiffusersGenerator(model, apply_overrides(pt.DiffusersConfig(), overrides or []), device=device)
    else:
        raise typer.BadParameter(f"unknown generator {generator!r} (shapes-renderer, diffusers)")

    if out is None:
        if world is None:
            raise typer.BadParameter("give an output folder", param_hint="--out")
        out = pt.shapes_pseudo_dir(world, gen, seed)
    records = pt.generate_pseudo_targets(gen, requests, out, seed=seed, batch_size=batch_size, log=typer.echo)
    noisy = sum(r.get("noise") is not None for r in records)
    typer.echo(f"{len(records)} pseudo-targets ({gen.name}, {noisy} with noise) in {out}")


def register(app: typer.Typer) -> None:
    """Adds ``generate-pseudo-targets`` to the ``cirlab`` app."""
    app.command("generate-pseudo-targets")(generate_pseudo_targets_cmd)
