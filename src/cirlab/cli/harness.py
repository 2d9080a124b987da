"""Benchmark-harness commands: ``check-submission`` and ``score`` (test-server files, no model, no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

Dataset = Literal["cirr", "circo"]

_DATASET_HELP = "Benchmark format: cirr or circo."
_ANNOTATIONS_HELP = "Dataset root as upstream lays it out (CIRR: holds captions/, image_splits/; CIRCO: annotations/)."
_GALLERY_HELP = (
    "CIRCO: image_info_unlabeled2017.json or the image folder to check ids against (default: official layout)."
)


def _failure() -> SystemExit:
    """The exception a failed check raises: exit status 1.

    SystemExit rather than typer.Exit: under ``standalone_mode=False`` click turns typer.Exit into a return value,
    which ``cirlab.cli.main.main`` does not read, whereas it maps SystemExit to its code.
    """
    return SystemExit(1)


def check_submission_cmd(
    file: Annotated[Path, typer.Argument(help="The submission JSON file.")],
    dataset: Annotated[Dataset, typer.Option("--dataset", help=_DATASET_HELP)],
    split: Annotated[str, typer.Option("--split", help="Split the file is for (CIRR: test1/val; CIRCO: test/val).")],
    annotations: Annotated[Path, typer.Option("--annotations", help=_ANNOTATIONS_HELP)],
    gallery: Annotated[Path | None, typer.Option("--gallery", help=_GALLERY_HELP)] = None,
) -> None:
    """Validate a CIRR or CIRCO test-server submission file; list every problem, one per line (exit 1 if any).

    Checks every query is present, no unknown keys, list lengths, duplicates, known names/ids (CIRCO ids may be
    digit strings, as the official scorer casts them: accepted with a note), CIRR version and
    metric keys (the CIRR metric file type is detected from its "metric" key), no CIRR reference in its own list,
    and CIRR subset lists drawn only from the query's non-reference img_set members.

    Example: `cirlab check-submission test1_pred_ranks_recall.json --dataset cirr --split test1 --annotations data/cirr`
    """
    from cirlab.evaluation.submission import check_submission, circo_notes, detect_cirr_metric
    from cirlab.io import read_json

    problems = check_submission(file, dataset, split, annotations, gallery=gallery)
    if problems:
        for problem in problems:
            typer.echo(problem)
        typer.echo(f"{file}: INVALID, {len(problems)} problem(s)", err=True)
        raise _failure()
    obj = read_json(file)
    for note in circo_notes(obj) if dataset == "circo" else []:
        typer.echo(note)
    kind = f" ({detect_cirr_metric(obj)})" if dataset == "cirr" else ""
    typer.echo(f"{file}: valid {dataset} {split} submission{kind}")


def score_cmd(
    files: Annotated[list[Path], typer.Argument(help="CIRR: the recall and/or recall_subset file; CIRCO: one file.")],
    dataset: Annotated[Dataset, typer.Option("--dataset", help=_DATASET_HELP)],
    annotations: Annotated[Path, typer.Option("--annotations", help=_ANNOTATIONS_HELP)],
    split: Annotated[str, typer.Option("--split", help="A split with public ground truth.")] = "val",
    gallery: Annotated[Path | None, typer.Option("--gallery", help=_GALLERY_HELP)] = None,
    per_aspect: Annotated[bool, typer.Option("--per-aspect", help="CIRCO: add mAP@10 per semantic aspect.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Score submission file(s) of a split with ground truth (val), with the evaluator's metric functions.

    Example: `cirlab score val_pred_ranks_recall.json --dataset cirr --split val --annotations data/cirr --json`
    """
    from cirlab.evaluation.submission import SubmissionError, score_submission

    try:
        result = score_submission(files, dataset, split, annotations, gallery=gallery, per_aspect=per_aspect)
    except SubmissionError as err:
        for problem in err.problems:
            typer.echo(problem)
        typer.echo(str(err).splitlines()[0], err=True)
        raise _failure() from None
    if as_json:
        typer.echo(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{dataset} {split}: {', '.join(f.name for f in files)}")
    table.add_column("metric")
    table.add_column("value (%)", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.2f}")
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Adds ``check-submission`` and ``score`` to the ``cirlab`` app."""
    app.command("check-submission")(check_submission_cmd)
    app.command("score")(score_cmd)
