"""The one progress-bar builder: encoding, training, mining and index builds all show the same bar.

rich is imported when a bar is made, so importing this module costs nothing.
"""

from __future__ import annotations

from typing import Any


def progress_bar(*columns: Any, console: Any = None) -> Any:
    """A ``rich.progress.Progress``: each task's description, a bar, done / total, then ``columns`` (extra rich
    columns, e.g. the running loss), then the time remaining.

    Args:
        columns: extra ``rich.progress`` columns, shown before the time remaining.
        console: the rich console to draw on (default: rich's own).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *columns, TimeRemainingColumn(),
        console=console,
    )  # fmt: skip
