"""Experiments on top of the library and the training loop: the Shapes environment, the demo, results tables."""

import os
from pathlib import Path

SHAPES_ROOT = Path("runs") / "shapes"
"""Where Shapes worlds, their CLIPs and stand-in models are kept unless a command's ``--root`` says otherwise."""


def default_jobs() -> int:
    """Training processes a study runs at once by default (``--jobs``): two where there are two cores or more."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1
