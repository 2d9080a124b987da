"""Name -> constructor registries: the public vocabulary of backbones, methods, benchmarks, corpora and text
generators.

A registry is the only module-level state cirlab keeps (STYLE.md rule 9). Names are what the CLI offers as
choices, what configs store and what the contract tests iterate over.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to registered objects (classes or factory functions).

    Example:
        >>> BACKBONES = Registry("backbone")
        >>> @BACKBONES.register("tiny")
        ... def make_tiny(): ...
        >>> BACKBONES.list()
        ['tiny']
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering an object under ``name``; a duplicate name raises ``ValueError``."""

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        """Registers ``obj`` under ``name`` without decorator syntax."""
        if not name or name != name.strip():
            raise ValueError(f"invalid {self.kind} name {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def get(self, name: str) -> T:
        """Returns the object registered as ``name``; unknown names raise ``KeyError`` listing the known ones."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self.list()) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {known}") from None

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a shell-style ``pattern``."""
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._items)


BACKBONES: Registry = Registry("backbone")
METHODS: Registry = Registry("method")
BENCHMARKS: Registry = Registry("benchmark")
"""Benchmark loaders, ``load(annotations_dir, image_root=None, split="val", **options) -> CIRSplit``: what
``cirlab eval --dataset`` and ``cirlab.data.load_splits`` accept."""
CORPORA: Registry = Registry("corpus")
"""Training-corpus readers (image folders, webdataset shards, caption files, triplet JSONL): what ``--data`` reads."""
CAPTIONERS: Registry = Registry("captioner")
REWRITERS: Registry = Registry("rewriter")
