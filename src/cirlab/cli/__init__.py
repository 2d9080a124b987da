"""The ``cirlab`` command line (typer). Importing it must not import torch: heavy imports live inside commands."""

from cirlab.cli.main import main

__all__ = ["main"]
