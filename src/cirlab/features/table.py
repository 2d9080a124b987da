"""Image features addressable by name, as methods, trainers and the evaluator consume them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from cirlab.types import ImageFeatures, PairFeatures


class _NamedRows:
    """Rows addressable by name, the lookup both tables share.

    A subclass sets ``names`` and calls ``_index_names`` from its ``__post_init__``; ``_table`` and ``_row`` name
    the table and one of its rows in error messages.
    """

    _table: ClassVar[str]
    _row: ClassVar[str]
    names: list[str]
    index: dict[str, int]

    def _index_names(self) -> None:
        """Builds ``index`` (name -> row); duplicate names raise ``ValueError``."""
        self.index = {n: i for i, n in enumerate(self.names)}
        if len(self.index) != len(self.names):
            raise ValueError(f"{self._table} table names must be unique")

    def __len__(self) -> int:
        return len(self.names)

    def rows(self, names: Sequence[str]) -> torch.Tensor:
        """Row indices of ``names``; an unknown name raises ``KeyError`` naming it."""
        try:
            return torch.tensor([self.index[n] for n in names], dtype=torch.long)
        except KeyError as err:
            raise KeyError(f"{self._row} {err.args[0]!r} has no features in this table") from None


@dataclass
class FeatureTable(_NamedRows):
    """Image features addressable by name: ``embeds`` (N, d) and optional patch ``tokens`` (N, 1 + n, w)."""

    _table: ClassVar[str] = "feature"
    _row: ClassVar[str] = "image"
    names: list[str]
    embeds: torch.Tensor
    tokens: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self._index_names()
        if self.embeds.shape[0] != len(self.names):
            raise ValueError(f"{len(self.names)} names but {self.embeds.shape[0]} embeddings")

    def gather(self, rows: torch.Tensor) -> ImageFeatures:
        """Features of the given rows, as float32 (tokens may be stored in float16 to save memory)."""
        tokens = self.tokens[rows].float() if self.tokens is not None else torch.empty(len(rows), 0, 0)
        return ImageFeatures(self.embeds[rows].float(), tokens)


@dataclass
class PairTable(_NamedRows):
    """(image, caption) pairs addressable by name: each pair's image ``embeds`` (N, d) and joint ``fused`` (N, d).

    Serves a ``pairs`` stage whose rows are the pairs (see ``CIRMethod.pair_embeddings``): ``gather`` returns
    ``PairFeatures`` without patch tokens.
    """

    _table: ClassVar[str] = "pair"
    _row: ClassVar[str] = "pair"
    names: list[str]
    embeds: torch.Tensor
    fused: torch.Tensor

    def __post_init__(self) -> None:
        self._index_names()
        if not self.embeds.shape[0] == self.fused.shape[0] == len(self.names):
            raise ValueError(f"{len(self.names)} names, {self.embeds.shape[0]} embeds, {self.fused.shape[0]} fused")

    def gather(self, rows: torch.Tensor) -> PairFeatures:
        """Features of the given rows, as float32."""
        return PairFeatures(self.embeds[rows].float(), torch.empty(len(rows), 0, 0), self.fused[rows].float())
