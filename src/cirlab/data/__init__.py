"""Datasets: benchmark loaders (CIRR, FashionIQ, CIRCO), image helpers, triplet sources and the Shapes world.

Importing this package registers the benchmark loaders in ``DATASETS``; none of them imports torch.
"""

from cirlab.data import circo, cirr, fashioniq, shapes
from cirlab.data.benchmark import AnnotationError, CIRQuery, CIRSplit, Protocol, load_splits
from cirlab.registry import DATASETS

__all__ = [
    "DATASETS",
    "AnnotationError",
    "CIRQuery",
    "CIRSplit",
    "Protocol",
    "circo",
    "cirr",
    "fashioniq",
    "load_splits",
    "shapes",
]
