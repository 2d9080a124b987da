"""Gallery indexes: embed a folder of images once, then search it with composed queries (reference image + text).

``build_index`` walks a folder, embeds new or changed images through the shared feature cache and commits the
index atomically; ``load_index`` opens one for ``compose`` and ``search``. Exact faiss inner-product search is the
default; HNSW or IVF structures are optional, with their recall against exact search measured when built.
"""

from cirlab.index.ann import APPROXIMATE_KINDS, AnnConfig
from cirlab.index.build import BuildReport, build_index, find_images
from cirlab.index.gallery import GalleryIndex, Hit, Query, load_index
from cirlab.index.store import IndexFormatError

__all__ = [
    "APPROXIMATE_KINDS",
    "AnnConfig",
    "BuildReport",
    "GalleryIndex",
    "Hit",
    "IndexFormatError",
    "Query",
    "build_index",
    "find_images",
    "load_index",
]
