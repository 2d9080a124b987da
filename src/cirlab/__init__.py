"""cirlab: composed image retrieval (reference image + modification text -> target image).

Importing ``cirlab`` is cheap; torch-backed parts load when used::

    import cirlab
    backbone = cirlab.create_backbone("tiny")
    method = cirlab.create_method("sum", backbone)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "create_backbone",
    "create_method",
    "list_backbones",
    "list_benchmarks",
    "list_corpora",
    "list_methods",
    "load_index",
]


def create_backbone(spec: str, **kwargs: Any) -> Any:
    """Builds a backbone from a name such as ``"tiny"`` or ``"hf-clip:openai/clip-vit-large-patch14"``."""
    from cirlab.backbones import create_backbone as _create

    return _create(spec, **kwargs)


def create_method(name: str, backbone: Any, config: Any = None) -> Any:
    """Builds a registered method around ``backbone`` (config: the method's dataclass, or None for defaults)."""
    from cirlab.methods import create_method as _create

    return _create(name, backbone, config)


def load_index(directory: str, device: str = "cpu", text_cache: Any = None) -> Any:
    """Opens a gallery index built by ``cirlab index build`` (see ``cirlab.index.GalleryIndex``); ``text_cache``
    (a ``cirlab.generation.TextCache``) keeps the texts of methods that run a captioner or a language model.

    Example:
        >>> index = cirlab.load_index("runs/my-index")
        >>> query = index.compose("photo.jpg", "the same but red")
        >>> hits = index.search(query, k=10)
    """
    from cirlab.index import load_index as _load

    return _load(directory, device, text_cache)


def list_backbones(pattern: str = "*") -> list[str]:
    """Names of the registered backbones."""
    from cirlab.backbones import BACKBONES

    return BACKBONES.list(pattern)


def list_methods(pattern: str = "*") -> list[str]:
    """Names of the registered methods."""
    from cirlab.methods import METHODS

    return METHODS.list(pattern)


def list_benchmarks(pattern: str = "*") -> list[str]:
    """Names of the registered benchmarks (what ``cirlab eval --dataset`` evaluates on)."""
    from cirlab.data import BENCHMARKS

    return BENCHMARKS.list(pattern)


def list_corpora(pattern: str = "*") -> list[str]:
    """Names of the registered training-corpus formats (what ``cirlab train --data`` reads)."""
    from cirlab.data import CORPORA

    return CORPORA.list(pattern)
