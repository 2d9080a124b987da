"""Datasets: benchmark loaders (CIRR, FashionIQ, CIRCO), training corpora (image folders, webdataset shards, caption
files, triplet JSONL), image helpers, triplet sources and the Shapes world.

Importing this package registers the benchmark loaders in ``BENCHMARKS`` and the corpus readers in ``CORPORA``
(apart: a corpus has no queries to evaluate on, a benchmark is not read as training images); none of them imports
torch at import time.
"""

from cirlab.data import circo, cirr, corpora, fashioniq, shapes
from cirlab.data.benchmark import AnnotationError, CIRQuery, CIRSplit, Protocol, benchmark_loader, load_splits
from cirlab.registry import BENCHMARKS, CORPORA

__all__ = [
    "BENCHMARKS",
    "CORPORA",
    "AnnotationError",
    "CIRQuery",
    "CIRSplit",
    "Protocol",
    "benchmark_loader",
    "circo",
    "cirr",
    "corpora",
    "fashioniq",
    "load_splits",
    "shapes",
]
