"""Optional dependencies: import them lazily and fail with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the cirlab extra that provides it."""


def require(module: str, extra: str, purpose: str = "") -> ModuleType:
    """Imports ``module`` or raises ``MissingExtraError`` naming ``pip install 'cirlab[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        why = f" for {purpose}" if purpose else ""
        raise MissingExtraError(
            f"{module!r} is needed{why} but is not installed: pip install 'cirlab[{extra}]' ({err})"
        ) from err
