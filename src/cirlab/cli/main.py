"""The ``cirlab`` console script: one typer app; each area registers its commands from its own module.

Commands import torch and the library lazily so that ``cirlab --help`` stays fast.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer

from cirlab import __version__

app = typer.Typer(
    name="cirlab",
    help="cirlab: composed image retrieval (reference image + modification text -> target image).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"cirlab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """cirlab: composed image retrieval toolkit.

    Example: `cirlab demo --quick`
    """


@app.command("list")
def list_cmd() -> None:
    """List registered backbones, methods, benchmarks, training corpora, captioners and rewriters, one section each.

    Example: `cirlab list`
    """
    import cirlab
    from cirlab.generation import CAPTIONERS, REWRITERS

    for title, names in (
        ("backbones", cirlab.list_backbones()),
        ("methods", cirlab.list_methods()),
        ("benchmarks", cirlab.list_benchmarks()),
        ("corpora", cirlab.list_corpora()),
        ("captioners", CAPTIONERS.list()),
        ("rewriters", REWRITERS.list()),
    ):
        typer.echo(f"{title}:")
        for name in names:
            typer.echo(f"  {name}")


def _register_all() -> None:
    """Attach the commands of every area; each module only defines commands and imports heavy parts lazily."""
    import importlib

    for module in (
        "cirlab.cli.harness",
        "cirlab.cli.shapes",
        "cirlab.cli.train",
        "cirlab.cli.search",
        "cirlab.cli.pseudo",
        "cirlab.cli.mine",
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name == module:
                continue
            raise
        mod.register(app)


_register_all()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI with ``argv`` (default: ``sys.argv[1:]``) and returns the exit code instead of exiting."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        # Without standalone mode click returns a command's exit code (typer.Exit) instead of raising it.
        rc = app(args=args, prog_name="cirlab", standalone_mode=False)
        return int(rc or 0) if isinstance(rc, int) else 0
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else 1
    except Exception as exc:  # click usage errors and library errors: one clear line, non-zero exit
        import click

        # typer carries its own copy of click, whose exceptions are not click's: check both.
        if isinstance(exc, click.exceptions.Abort | typer.Abort):
            typer.echo("Aborted.", err=True)
            return 130
        if isinstance(exc, click.ClickException | typer.TyperException) and hasattr(exc, "show"):
            exc.show()  # "Usage: ...", then "Error: Invalid value for '--port': ..."
            return int(getattr(exc, "exit_code", 2))
        typer.echo(f"error: {exc}", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
