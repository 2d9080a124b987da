"""Training corpora in public formats, registered in ``CORPORA``: ``imagefolder`` (an image folder with sidecar or
manifest captions), ``webdataset`` (tar shards), ``captions`` (a caption file) and ``triplet-jsonl`` (synthetic
triplets).

One module per format; ``base`` holds what every image corpus shares (samples, skip counting and the split of a
pass over processes and DataLoader workers) and ``tables`` the CSV/TSV/JSONL/parquet reader. Images are decoded by
the encoder, with ``cirlab.data.images.decode_image``.
"""

from __future__ import annotations

from pathlib import Path

from cirlab.data.corpora.base import (
    ImageCorpus,
    Sample,
    ShardContext,
    SkipCounter,
    Skipped,
    read_image_bytes,
    shard_context,
)
from cirlab.data.corpora.captions import CaptionCorpus
from cirlab.data.corpora.imagefolder import ImageFolderCorpus
from cirlab.data.corpora.tables import read_records
from cirlab.data.corpora.triplets import TripletCorpus, TripletRecord
from cirlab.data.corpora.webdataset import WebDatasetCorpus, expand_braces, expand_urls

__all__ = [
    "CaptionCorpus",
    "ImageCorpus",
    "ImageFolderCorpus",
    "Sample",
    "ShardContext",
    "SkipCounter",
    "Skipped",
    "TripletCorpus",
    "TripletRecord",
    "WebDatasetCorpus",
    "expand_braces",
    "expand_urls",
    "open_image_corpus",
    "read_image_bytes",
    "read_records",
    "shard_context",
]


def open_image_corpus(spec: str | Path, manifest: str | Path | None = None, limit: int = 0) -> ImageCorpus:
    """An image folder (``spec`` is a directory) or webdataset shards (a path or brace pattern of ``.tar`` files)."""
    if Path(spec).is_dir():
        return ImageFolderCorpus(spec, manifest or None, limit=limit)
    if manifest:
        raise ValueError(f"a manifest lists an image folder's images, but {str(spec)!r} is not a directory")
    return WebDatasetCorpus(str(spec), limit=limit)
