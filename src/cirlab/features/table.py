"""Image features addressable by name, as methods, trainers and the evaluator consume them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cirlab.types import ImageFeatures, PairFeatures


@dataclass
class FeatureTable:
    """Image features addressable by name: ``embeds`` (N, d) and optional patch ``tokens`` (N, 1 + n, w)."""

    names: list[str]
    embeds: torch.Tensor
    tokens: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.index = {n: i for i, n in enumerate(self.names)}
        if len(self.index) != len(self.names):
            raise ValueError("feature table names must be unique")
        if self.embeds.shape[0] != len(self.names):
            raise ValueError(f"{len(self.names)} names but {self.embeds.shape[0]} embeddings")

    def __len__(self) -> int:
        return len(self.names)

    def rows(self, names: Sequence[str]) -> torch.Tensor:
        """Row indices of ``names``; an unknown name raises ``KeyError`` naming it."""
        try:
            return torch.tensor([self.index[n] for n in names], dtype=torch.long)
        except KeyError as err:
            raise KeyError(f"image {err.args[0]!r} has no features in this table") from None

    def gather(self, rows: torch.Tensor) -> ImageFeatures:
        """Features of the given rows, as float32 (tokens may be stored in float16 to save memory)."""
        tokens = self.tokens[rows].float() if self.tokens is not None else torch.empty(len(rows), 0, 0)
        return ImageFeatures(self.embeds[rows].float(), tokens)


@dataclass
class PairTable:
    """(image, caption) pairs addressable by name: each pair's image ``embeds`` (N, d) and joint ``fused`` (N, d).

    Serves a ``pairs`` stage whose rows are the pairs (see ``CIRMethod.pair_embeddings``): ``gather`` returns
    ``PairFeatures`` without patch tokens.
    """

    names: list[str]
    embeds: torch.Tensor
    fused: torch.Tensor

    def __post_init__(self) -> None:
        self.index = {n: i for i, n in enumerate(self.names)}
        if len(self.index) != len(self.names):
            raise ValueError("pair table names must be unique")
        if not self.embeds.shape[0] == self.fused.shape[0] == len(self.names):
            raise ValueError(f"{len(self.names)} names, {self.embeds.shape[0]} embeds, {self.fused.shape[0]} fused")

    def __len__(self) -> int:
        return len(self.names)

    def rows(self, names: Sequence[str]) -> torch.Tensor:
        """Row indices of ``names``; an unknown name raises ``KeyError`` naming it."""
        try:
            return torch.tensor([self.index[n] for n in names], dtype=torch.long)
        except KeyError as err:
            raise KeyError(f"pair {err.args[0]!r} has no features in this table") from None

    def gather(self, rows: torch.Tensor) -> PairFeatures:
        """Features of the given rows, as float32."""
        return PairFeatures(self.embeds[rows].float(), torch.empty(len(rows), 0, 0), self.fused[rows].float())
