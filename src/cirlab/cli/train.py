"""Training and evaluation commands: ``demo``, ``train``, ``eval``, ``submit`` (heavy imports inside commands)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cirlab.experiments import SHAPES_ROOT, default_jobs

TRAIN_LOCK = ".cirlab-train.lock"
"""Held (``flock``) in a checkpoint directory while ``cirlab train`` writes into it."""

# Bounds of the loop settings (training.loop.TrainConfig) that would otherwise fail deep inside a run with an
# unrelated message ("list index out of range" for batch_size=0, "file not found" for negative steps).
_AT_LEAST = {"steps": 1, "batch_size": 1, "grad_accum": 1, "log_every": 1, "eval_every": 0, "checkpoint_every": 0}
_FRACTIONS = ("warmup", "ema_decay")
_NON_NEGATIVE = ("lr", "weight_decay", "max_grad_norm")
_SET_HELP = "Config override KEY=VALUE, type-checked (repeatable), e.g. mapping.steps=100 or method.prompt='$ {text}'."
_METHOD_SET_HELP = (
    "Method config override KEY=VALUE, type-checked (repeatable), e.g. rewrite_prompt=cirevl-structural or "
    "captioner=hf-captioner:Salesforce/blip2-opt-2.7b."
)
_GENERATIONS_HELP = (
    "Generated-text cache (JSONL) of methods that run a captioner or a language model: texts found there are not "
    "generated again, new ones are added (default: the user cache, ~/.cache/cirlab/generations.jsonl)."
)


def _text_cache(model, generations: Path | None):
    """Points a generative method's text cache at ``generations`` (or the user's default); None for others."""
    from cirlab.generation import TextCache, default_generation_cache

    if model.text_cache is None:
        return None
    model.text_cache = TextCache(generations or default_generation_cache())
    return model.text_cache


def _report_texts(cache, before: int) -> None:
    if cache is not None:
        typer.echo(f"generated texts: {len(cache.used)} used, {len(cache) - before} new, cached in {cache.path}")


def _shapes_method(method: str, env, quick: bool, overrides: list[str]):
    """A registered method on the Shapes world: its default config with ``overrides``; a generative method gets its
    Shapes preset and the world's stand-in captioner / language models."""
    from cirlab.config import apply_overrides
    from cirlab.methods import METHODS, create_method

    cls = METHODS.get(method)
    if cls.generators:
        from cirlab.experiments.standins import prepare_standins, with_standins
        from cirlab.training.run_config import load_run_config

        config = with_standins(
            method, load_run_config(method, "shapes").method, prepare_standins(env, quick, log=typer.echo)
        )
    else:
        config = cls.config_class()
    return create_method(method, env.backbone, apply_overrides(config, overrides))


def _shapes_model(method: str | None, checkpoint: Path | None, env, quick: bool, overrides: list[str]):
    """The model eval and submit run on the Shapes world: a checkpoint on the world's CLIP (its config overridden),
    or a training-free method."""
    from cirlab.config import apply_overrides
    from cirlab.methods import load_method

    if checkpoint:
        from cirlab.backbones import spec_options
        from cirlab.io import read_json
        from cirlab.methods.base import CONFIG_FILE

        meta = read_json(checkpoint / CONFIG_FILE) if (checkpoint / CONFIG_FILE).is_file() else {}
        recorded = str(meta.get("backbone", "")) if isinstance(meta, dict) else ""  # load_method names what is wrong
        gap = spec_options(recorded).get("gap", 0.0)
        if gap != getattr(env.backbone, "modality_gap", 0.0):
            # The world's CLIP is the plain one; a checkpoint trained with a gap would silently rank in another space.
            raise typer.BadParameter(
                f"{checkpoint}: trained on {recorded!r} (modality gap {gap:g}); the Shapes world's CLIP here has none",
                param_hint="--checkpoint",
            )
        model = load_method(checkpoint, backbone=env.backbone)
        model.config = apply_overrides(model.config, overrides)
        return model
    return _shapes_method(method, env, quick, overrides)


def demo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output folder (results.json, chart.png, report.html).")] = Path(
        "runs/demo"
    ),
    quick: Annotated[bool, typer.Option("--quick", help="Small world and short schedules; same code path.")] = False,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per method (mean ± std when > 1).")] = 1,
    methods: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            help="Only these methods (repeatable); default: all but the generative ones (cirevl, ldre, osrcir), "
            "which are opt-in.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild the world and every method.")] = False,
    root: Annotated[Path, typer.Option("--root", help="Where Shapes worlds and CLIPs are kept.")] = SHAPES_ROOT,
    pretrain: Annotated[
        bool, typer.Option("--pretrain", help="Pretrain the Shapes CLIP instead of using the shipped one.")
    ] = False,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs", min=1, help="Runs trained at once, in worker processes sharing the CPU threads (1: in this one)."
        ),
    ] = default_jobs(),
) -> None:
    """Run the main job on the Shapes world: build it, take its CLIP, train and evaluate every method.

    The Shapes CLIP shipped with cirlab is used, as real CIR starts from a pretrained CLIP; --pretrain trains one
    with `cirlab shapes-pretrain`'s recipe instead (reused once trained; --quick shortens it to a smoke test).

    Prints one table (methods x metrics, seen vs held-out) and writes results.json, chart.png and report.html.
    Everything already built is reused (content-addressed); --force rebuilds.

    Example: `cirlab demo --quick`
    """
    import time

    import torch

    from cirlab.experiments.demo import run_demo
    from cirlab.experiments.report import bar_chart, html_report, markdown_table, print_table
    from cirlab.experiments.shapes_env import prepare_shapes
    from cirlab.io import atomic_write_json, atomic_write_text

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    env = prepare_shapes(quick=quick, root=root, force=force, log=typer.echo, pretrain=pretrain)
    clip = ", ".join(f"{k} {v:.1f}" for k, v in env.clip_metrics.items())
    typer.echo(f"Shapes CLIP zero-shot retrieval on held-out scenes (%): {clip}")
    results = run_demo(
        env, out, methods, seeds=tuple(range(seeds)), quick=quick, force=force, log=typer.echo, jobs=jobs
    )
    results["seconds"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown_table(results) + "\n")
    bar_chart(results, out / "chart.png")
    html_report(results, results["showcase"], env.source.split("cirr/test1"), out / "report.html")
    print_table(results)
    typer.echo(
        f"wrote {out / 'results.json'}, {out / 'chart.png'}, {out / 'report.html'} in {results['seconds']:.0f} s"
    )


def check_stage_settings(run_cfg: object, stages: list[str]) -> None:
    """Refuses loop settings no run can use, naming the ``--set`` key, before anything is built or written."""
    for stage in stages:
        cfg = getattr(run_cfg, stage)
        problems = [
            f"{key}={getattr(cfg, key)} (must be at least {low})"
            for key, low in _AT_LEAST.items()
            if getattr(cfg, key) < low
        ]
        problems += [
            f"{key}={getattr(cfg, key)} (must be in [0, 1])" for key in _FRACTIONS if not 0 <= getattr(cfg, key) <= 1
        ]
        problems += [
            f"{key}={getattr(cfg, key)} (must not be negative)" for key in _NON_NEGATIVE if getattr(cfg, key) < 0
        ]
        if problems:
            raise typer.BadParameter(", ".join(f"{stage}.{p}" for p in problems), param_hint="--set")


def train_cmd(
    method: Annotated[str, typer.Argument(help="Registered method name (see `cirlab list`).")],
    dataset: Annotated[
        str,
        typer.Option(
            "--dataset",
            help="auto (corpora when the preset or --data names data, else shapes) | shapes | corpus | imagefolder | "
            "webdataset | cirr | fashioniq.",
        ),
    ] = "auto",
    preset: Annotated[str, typer.Option("--preset", help="Packaged preset name or a YAML/JSON file.")] = "shapes",
    overrides: Annotated[list[str] | None, typer.Option("--set", help=_SET_HELP)] = None,
    data: Annotated[
        list[str] | None,
        typer.Option("--data", help="Data setting KEY=VALUE (as --set data.KEY=VALUE), e.g. images=/cc3m/{0..9}.tar"),
    ] = None,
    annotations: Annotated[
        Path | None, typer.Option("--annotations", help="cirr / fashioniq: the annotation root.")
    ] = None,
    images: Annotated[Path | None, typer.Option("--images", help="cirr / fashioniq: the image root.")] = None,
    backbone: Annotated[
        str | None, typer.Option("--backbone", help="Backbone spec for corpus runs (default: the preset's).")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Build everything and run a few steps on the tiny backbone with the same data pipeline (corpora "
            "cut to a few samples); prints the effective config.",
        ),
    ] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Checkpoint directory (default runs/train/METHOD).")] = None,
    stage: Annotated[list[str] | None, typer.Option("--stage", help="Only these stages (repeatable).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Shapes: the small world.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of initialisation and data order.")] = 0,
    root: Annotated[Path, typer.Option("--root", help="Where Shapes worlds and CLIPs are kept.")] = SHAPES_ROOT,
) -> None:
    """Train a method; writes a checkpoint directory (config.json + model.safetensors of the trained parts).

    Stages resume from their last checkpoint when re-run with the same --out. Several processes: launch with
    `torchrun --standalone --nproc_per_node N -m cirlab.cli.main train ...`; each reads 1/N of every batch
    (batch_size must be a multiple of N) and rank 0 writes the checkpoint.

    Real data: `cirlab train pic2word --preset cc3m-vitl14 --data images=/data/cc3m/{00000..00331}.tar`; check a
    preset first with `--dry-run`.

    Example: `cirlab train pic2word --dataset shapes --set mapping.steps=200 --out runs/p2w`
    """
    import contextlib
    import dataclasses
    import os
    import tempfile

    from cirlab.io import file_lock
    from cirlab.methods import METHODS
    from cirlab.training.dry_run import dry_run_config
    from cirlab.training.run_config import effective_config, load_run_config, resolve_dataset

    cls = METHODS.get(method)
    names = [s.name for s in cls.stages]
    unknown = [s for s in stage or [] if s not in names]
    if unknown:
        # Checked before anything is written: fit would skip every stage and rewrite the checkpoint's config.json
        # with settings that never trained its weights.
        raise typer.BadParameter(
            f"{method} has no stage {', '.join(map(repr, unknown))}; its stages: {', '.join(names) or 'none'}",
            param_hint="--stage",
        )
    run_cfg = load_run_config(method, preset, [*(overrides or []), *(f"data.{d}" for d in data or [])])
    check_stage_settings(run_cfg, [n for n in names if stage is None or n in stage])
    run_cfg = dataclasses.replace(
        run_cfg, seed=seed, **{s.name: dataclasses.replace(getattr(run_cfg, s.name), seed=seed) for s in cls.stages}
    )
    try:
        run_cfg, source_kind = resolve_dataset(run_cfg, dataset, annotations, images, backbone)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--dataset") from None
    if dry_run:
        full_backbone = run_cfg.backbone
        run_cfg = dry_run_config(run_cfg)
        # Shapes runs use the world's own small CLIP whatever the config says.
        swapped = (
            f"backbone {full_backbone or '(unset)'} swapped for {run_cfg.backbone}"
            if source_kind == "corpus"
            else "backbone: the Shapes world's CLIP"
        )
        typer.echo(f"dry run of {method} (preset {preset}, {swapped}) with this effective config:")
        typer.echo(effective_config(run_cfg))
        out = out or Path(tempfile.mkdtemp(prefix=f"cirlab-dry-run-{method}-"))
    out = out or Path("runs/train") / method
    # One run at a time per checkpoint directory: a second run into the same --out would interleave its log and
    # checkpoints with the first's and silently win. Only the first process of a torchrun launch (the one that
    # writes) takes the lock; it is taken before anything is built, so a refused run costs nothing.
    writer = os.environ.get("RANK", "0") == "0"
    out_lock = file_lock(out / TRAIN_LOCK, wait=False, purpose=f"training into {out}") if writer else None
    with out_lock or contextlib.nullcontext():
        _train(method, cls, run_cfg, source_kind, out, stage, quick, seed, root, dry_run)


def _train(
    method: str,
    cls: type,
    run_cfg: object,
    source_kind: str,
    out: Path,
    stage: list[str] | None,
    quick: bool,
    seed: int,
    root: Path,
    dry_run: bool = False,
) -> None:
    """The body of ``train_cmd`` once its arguments are checked and ``--out`` is locked."""
    import dataclasses

    import torch

    from cirlab.distributed import process_group
    from cirlab.experiments.shapes_env import prepare_shapes
    from cirlab.io import file_lock
    from cirlab.methods import create_method
    from cirlab.training.corpus_source import corpus_inputs
    from cirlab.training.run import fit

    if source_kind == "shapes":
        # Under torchrun the first process to get the lock builds the world and its CLIP alone (before the process
        # group exists, so that pretraining is single-process); the others then find them built.
        with file_lock(root / ".prepare.lock"):
            env = prepare_shapes(quick=quick, root=root, log=typer.echo)
    with process_group() as world:
        if source_kind == "shapes":
            model_backbone, source, val_split = env.backbone, env.source, "cirr/val"
        else:
            model_backbone, source, val_split = corpus_inputs(run_cfg)
            if world.is_main:
                typer.echo(f"training data: {source.describe()}")
        if cls.generators and source_kind == "shapes":
            from cirlab.experiments.standins import prepare_standins, standin_config, with_standins

            # A dry run trains the stand-ins for a few steps only (they are content-addressed apart).
            small = standin_config(quick).scaled(0.02) if dry_run else None
            standins = prepare_standins(env, quick, log=typer.echo, config=small)
            run_cfg = dataclasses.replace(run_cfg, method=with_standins(method, run_cfg.method, standins))
        torch.manual_seed(seed)
        model = create_method(method, model_backbone, run_cfg.method)
        if not cls.stages:
            if world.is_main:
                model.save(out)
                typer.echo(f"{method} is training-free; saved its config to {out}")
            return
        report = fit(
            model, source, run_cfg, out, stages=stage, val_split=val_split, progress=world.is_main, world=world
        )
        if world.is_main:
            typer.echo(json.dumps(report, indent=2))
            typer.echo(f"checkpoint: {out}" + (f" (trained by {world.size} processes)" if world.distributed else ""))


def _check_benchmark(dataset: str) -> None:
    """Refuses a ``--dataset`` that is no registered benchmark (a training corpus's name included) before anything
    is built or loaded."""
    from cirlab.data.benchmark import benchmark_loader

    try:
        benchmark_loader(dataset)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--dataset") from None


def eval_cmd(
    method: Annotated[
        str | None, typer.Argument(help="Registered method (training-free) when no --checkpoint.")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Checkpoint directory.")] = None,
    dataset: Annotated[str, typer.Option("--dataset", help="shapes | cirr | fashioniq | circo")] = "shapes",
    split: Annotated[
        str, typer.Option("--split", help="Split with ground truth (shapes: cirr/val, circo/test, ...).")
    ] = "cirr/val",
    annotations: Annotated[Path | None, typer.Option("--annotations", help="Benchmark root (real datasets).")] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Image root (real datasets).")] = None,
    backbone: Annotated[
        str | None, typer.Option("--backbone", help="Backbone spec for a training-free method.")
    ] = None,
    output: Annotated[Path | None, typer.Option("--json", help="Also write the metrics to this JSON file.")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help=_METHOD_SET_HELP)] = None,
    generations: Annotated[Path | None, typer.Option("--generations", help=_GENERATIONS_HELP)] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Shapes: the small world.")] = False,
    root: Annotated[Path, typer.Option("--root", help="Where Shapes worlds and CLIPs are kept.")] = SHAPES_ROOT,
) -> None:
    """Evaluate a method on a benchmark split with ground truth; prints a table and writes JSON.

    Methods that run a captioner or a language model (cirevl, ldre, osrcir) keep every generated text in
    --generations: a second evaluation reads them all from there and runs no model. On the Shapes world they use
    the world's stand-in models.

    Example: `cirlab eval --checkpoint runs/p2w --dataset shapes --split cirr/test1`
    """
    from rich.console import Console
    from rich.table import Table

    from cirlab.config import apply_overrides
    from cirlab.data.benchmark import load_splits
    from cirlab.evaluation.evaluate import evaluate
    from cirlab.evaluation.protocols import combine_metrics
    from cirlab.features.cache import FeatureCache, default_cache_dir
    from cirlab.io import atomic_write_json
    from cirlab.methods import create_method, load_method

    if (method is None) == (checkpoint is None):
        raise typer.BadParameter("give either a METHOD (training-free) or --checkpoint DIR")
    _check_benchmark(dataset)
    overrides = list(overrides or [])
    if dataset == "shapes":
        from cirlab.experiments.shapes_env import prepare_shapes

        if backbone is not None:
            from cirlab.backbones import BACKBONES, parse_spec

            BACKBONES.get(parse_spec(backbone)[0])  # an unknown name: the registry's error, exit 1
            raise typer.BadParameter(
                "the Shapes world is evaluated with its own CLIP; --backbone applies to real datasets",
                param_hint="--backbone",
            )
        env = prepare_shapes(quick=quick, root=root, log=typer.echo)
        model = _shapes_model(method, checkpoint, env, quick, overrides)
        texts = _text_cache(model, generations)
        before = len(texts) if texts is not None else 0
        result = evaluate(
            model,
            env.source.split(split),
            features=env.source.features_for(model, split),
            subsets=env.source.subsets(split) if "test" in split else None,
        )
        typer.echo(result.conventions)
        metrics = {"all": result.metrics, **result.subsets}
    else:
        from cirlab.backbones import create_backbone

        if annotations is None:
            raise typer.BadParameter("real datasets need --annotations DIR (and --images DIR)")
        model = (
            load_method(checkpoint)
            if checkpoint
            else create_method(method, create_backbone(backbone or "hf-clip:openai/clip-vit-large-patch14").freeze())
        )
        model.config = apply_overrides(model.config, overrides)
        texts = _text_cache(model, generations)
        before = len(texts) if texts is not None else 0
        splits = load_splits(dataset, annotations, images, split)
        cache = FeatureCache(default_cache_dir())
        results = [evaluate(model, s, cache=cache) for s in splits]
        for r in results:
            typer.echo(r.conventions)
        metrics = {
            "all": combine_metrics(splits, [r.metrics for r in results]) if len(splits) > 1 else results[0].metrics
        }
    table = Table(title=f"{model.name} on {dataset} {split} (%)")
    table.add_column("part")
    keys = list(metrics["all"])
    for k in keys:
        table.add_column(k, justify="right")
    for part, values in metrics.items():
        table.add_row(part, *(f"{values.get(k, float('nan')):.2f}" for k in keys))
    Console().print(table)
    _report_texts(texts, before)
    if output:
        atomic_write_json(output, metrics)


def submit_cmd(
    method: Annotated[
        str | None, typer.Argument(help="Registered method (training-free) when no --checkpoint.")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Checkpoint directory.")] = None,
    dataset: Annotated[str, typer.Option("--dataset", help="cirr | circo | shapes")] = "cirr",
    split: Annotated[
        str, typer.Option("--split", help="cirr: test1; circo: test; shapes: cirr/test1 or circo/test")
    ] = "test1",
    annotations: Annotated[Path | None, typer.Option("--annotations", help="Benchmark root (real datasets).")] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Image root (real datasets).")] = None,
    backbone: Annotated[
        str | None, typer.Option("--backbone", help="Backbone spec for a training-free method.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the submission file(s).")] = Path("runs/submission"),
    overrides: Annotated[list[str] | None, typer.Option("--set", help=_METHOD_SET_HELP)] = None,
    generations: Annotated[Path | None, typer.Option("--generations", help=_GENERATIONS_HELP)] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Shapes: the small world.")] = False,
    root: Annotated[Path, typer.Option("--root", help="Where Shapes worlds and CLIPs are kept.")] = SHAPES_ROOT,
) -> None:
    """Write test-server files: CIRR test1 (recall and recall_subset) or CIRCO test, validated before writing.

    A method that runs a captioner or a language model also writes OUT/generations.jsonl, every text the
    submission was computed from: with it (as --generations) the submission is recomputed without any model.

    Example: `cirlab submit sum --dataset shapes --split cirr/test1 --out runs/submission`
    """
    from cirlab.config import apply_overrides
    from cirlab.evaluation.evaluate import predict_embeddings
    from cirlab.evaluation.submission import write_circo_submission, write_cirr_submission
    from cirlab.methods import create_method, load_method

    if (method is None) == (checkpoint is None):
        raise typer.BadParameter("give either a METHOD (training-free) or --checkpoint DIR")
    _check_benchmark(dataset)
    overrides = list(overrides or [])
    if dataset == "shapes":
        from cirlab.experiments.shapes_env import prepare_shapes

        env = prepare_shapes(quick=quick, root=root, log=typer.echo)
        model = _shapes_model(method, checkpoint, env, quick, overrides)
        texts = _text_cache(model, generations)
        target = env.source.split(split)
        queries, gallery = predict_embeddings(model, target, env.source.features_for(model, split))
    else:
        from cirlab.backbones import create_backbone
        from cirlab.data.benchmark import load_splits
        from cirlab.features.cache import FeatureCache, default_cache_dir

        if annotations is None:
            raise typer.BadParameter("real datasets need --annotations DIR and --images DIR")
        model = (
            load_method(checkpoint)
            if checkpoint
            else create_method(method, create_backbone(backbone or "hf-clip:openai/clip-vit-large-patch14").freeze())
        )
        model.config = apply_overrides(model.config, overrides)
        texts = _text_cache(model, generations)
        (target,) = load_splits(dataset, annotations, images, split)
        queries, gallery = predict_embeddings(model, target, cache=FeatureCache(default_cache_dir()))
    typer.echo(target.describe())
    if target.dataset == "cirr":
        written = list(write_cirr_submission(target, queries, gallery, out).values())
    elif target.dataset == "circo":
        written = [write_circo_submission(target, queries, gallery, out / f"circo_{target.split}_submission.json")]
    else:
        raise typer.BadParameter(f"no test server format for {target.dataset}", param_hint="--dataset")
    for path in written:
        typer.echo(f"wrote {path} (validated)")
    if texts is not None:
        n = texts.export(out / "generations.jsonl")
        typer.echo(f"wrote {out / 'generations.jsonl'} ({n} generated texts the submission was computed from)")


def register(app: typer.Typer) -> None:
    """Adds ``demo``, ``train``, ``eval`` and ``submit`` to the ``cirlab`` app."""
    app.command("demo")(demo_cmd)
    app.command("train")(train_cmd)
    app.command("eval")(eval_cmd)
    app.command("submit")(submit_cmd)
