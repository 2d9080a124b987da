"""Datasets: benchmark loaders (CIRR, FashionIQ, CIRCO), image helpers, triplet sources and the Shapes world."""

from cirlab.registry import DATASETS

__all__ = ["DATASETS"]
