"""Experiments on top of the library and the training loop: the Shapes environment, the demo, results tables."""

from pathlib import Path

SHAPES_ROOT = Path("runs") / "shapes"
"""Where Shapes worlds, their CLIPs and stand-in models are kept unless a command's ``--root`` says otherwise."""
