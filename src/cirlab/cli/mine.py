"""``mine-triplets``: synthetic triplets mined from an image-caption corpus (resumable, with a progress bar)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer


def mine_triplets_cmd(
    corpus: Annotated[
        str, typer.Argument(help="An image folder (captions in sidecar .txt files or --manifest) or webdataset shards.")
    ],
    out: Annotated[Path, typer.Option("--out", help="The triplet JSONL to write.")],
    manifest: Annotated[
        Path | None, typer.Option("--manifest", help="Image folder: CSV/TSV/JSONL/parquet of images and captions.")
    ] = None,
    edit_types: Annotated[
        list[str] | None,
        typer.Option("--edit-type", help="Keep only these edit types (repeatable): colour, count, object, add, remove"),
    ] = None,
    max_pairs_per_key: Annotated[
        int, typer.Option("--max-pairs-per-key", help="Most pairs from captions sharing one edit position.")
    ] = 16,
    partitions: Annotated[int, typer.Option("--partitions", help="Hash partitions (more: less memory).")] = 64,
    limit: Annotated[int, typer.Option("--limit", help="Only the first N images (0: all).")] = 0,
) -> None:
    """Mine (reference, modification, target) triplets from captions that differ by one edit.

    Two images whose captions differ by one content word (a substitution: colour, count or object) or by one added
    word (add / remove) give a triplet each way, the edit verbalised by a template. Deterministic; an interrupted
    run resumes from its work folder (`OUT.work`). Prints and writes (`OUT.report.json`) the count per edit type.
    Image-folder triplets name images by paths relative to OUT's folder; webdataset triplets name them by sample
    key (train with `--data triplets_by_name=true`).

    Example: `cirlab mine-triplets /data/cc3m/{00000..00331}.tar --out runs/cc3m-triplets.jsonl`
    """
    from rich.console import Console
    from rich.table import Table

    from cirlab.data.corpora import ImageFolderCorpus, ShardContext, SkipCounter, open_image_corpus
    from cirlab.data.mining import EDIT_TYPES, Caption, MiningOptions, mine_triplets
    from cirlab.progress import progress_bar

    options = MiningOptions(partitions=partitions, max_pairs_per_key=max_pairs_per_key)
    if edit_types:
        unknown = sorted(set(edit_types) - set(EDIT_TYPES))
        if unknown:
            raise typer.BadParameter(f"unknown edit types {unknown}; known: {', '.join(EDIT_TYPES)}")
        options.edit_types = list(edit_types)
    try:
        source = open_image_corpus(corpus, manifest, limit=limit)
    except (FileNotFoundError, ValueError) as err:
        raise typer.BadParameter(str(err), param_hint="CORPUS") from None
    out_dir = out.resolve().parent
    captions: list[Caption] = []
    skips = SkipCounter()
    for sample in source.samples(ShardContext(), skips):
        if isinstance(source, ImageFolderCorpus):
            # Paths relative to the output's folder: the triplet JSONL then loads with its default image root.
            name = os.path.relpath(source.root.resolve() / sample.name, out_dir)
        else:
            name = sample.name
        captions += [Caption(name, text) for text in sample.captions]
    if isinstance(source, ImageFolderCorpus):
        skips.merge(source.skips.as_dict())
    if skips.total:
        typer.echo(f"skipped while reading: {skips.as_dict()}")
    if not captions:
        raise typer.BadParameter(f"{source.describe()}: no captions to mine", param_hint="CORPUS")
    typer.echo(f"mining {len(captions)} captions of {source.describe()}")
    bar = progress_bar()
    tasks: dict[str, int] = {}

    def progress(phase: str, done: int, total: int | None) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total)
        bar.update(tasks[phase], completed=done, total=total)

    with bar:
        report = mine_triplets(captions, out, options, progress=progress)
    table = Table(title=f"{report['triplets']} triplets from {report['captions_used']} captions")
    table.add_column("edit type")
    table.add_column("triplets", justify="right")
    for kind, n in report["by_edit_type"].items():
        table.add_row(kind, str(n))
    Console().print(table)
    typer.echo(f"wrote {out} and {out.name}.report.json")


def register(app: typer.Typer) -> None:
    """Adds ``mine-triplets`` to the ``cirlab`` app."""
    app.command("mine-triplets")(mine_triplets_cmd)
