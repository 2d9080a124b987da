"""Datasets: benchmark loaders (CIRR, FashionIQ, CIRCO), training corpora (image folders, webdataset shards, caption
files, triplet JSONL), image helpers, triplet sources and the Shapes world.

Importing this package registers the benchmark loaders and corpus readers in ``DATASETS``; none of them imports
torch at import time.
"""

from cirlab.data import circo, cirr, corpora, fashioniq, shapes
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
    "corpora",
    "fashioniq",
    "load_splits",
    "shapes",
]
