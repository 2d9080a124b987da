"""A built gallery index: compose a query from a reference image and a text, search, map hits back to files.

Example::

    index = cirlab.load_index("runs/my-index")
    query = index.compose("photos/dress.jpg", "the same dress but red")
    for hit in index.search(query, k=10): print(hit.score, hit.path)

Exact inner-product search over the memory-mapped embeddings is the default (faiss' exhaustive search when the
``[faiss]`` extra is installed, else numpy); an index built with an approximate structure uses it unless
``exact=True`` is asked for. Model calls and searches run one at a time (a lock), so one ``GalleryIndex`` may be
shared by the threads of a server.
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cirlab.data.images import ImageReadError, load_image
from cirlab.evaluation.search import topk_inner_product
from cirlab.features.hashing import hash_bytes, hash_file
from cirlab.generation.cache import TextCache
from cirlab.index.ann import ann_search, read_ann
from cirlab.index.model import load_model, shares_backbone_space, training_free_methods
from cirlab.index.store import describe, read_generation
from cirlab.methods.base import CIRMethod, compose_with_context, create_method, needs_context
from cirlab.types import QueryContext, ReferenceImage

ImageInput = str | os.PathLike | Image.Image | bytes | int
"""A reference image: a file path (a gallery image's indexed path works too), a PIL image, encoded bytes, or a
gallery id."""


@dataclass
class Query:
    """A composed query.

    Attributes:
        vector: (d,) float32, L2-normalised.
        method: the method that composed it.
        text: the modification text.
        exclude: gallery ids holding the reference image itself (same bytes), left out of results by default.
    """

    vector: np.ndarray
    method: str
    text: str
    exclude: list[int] = field(default_factory=list)


@dataclass
class Hit:
    """One search result: ``id`` (row in the index), ``path`` (relative to the gallery root), absolute ``file``."""

    rank: int
    id: int
    path: str
    score: float
    file: Path


class GalleryIndex:
    """An index loaded from ``INDEX_DIR`` (see ``cirlab.index.store`` for the layout)."""

    def __init__(
        self, directory: str | os.PathLike, device: str | torch.device = "cpu", text_cache: TextCache | None = None
    ) -> None:
        """Loads the committed generation of ``directory``; the model is built on first use.

        Args:
            directory: the index directory.
            device: where the model runs.
            text_cache: where methods that generate texts (captions, rewrites) look them up and record them
                (default: in memory, per method).

        Raises:
            cirlab.index.store.IndexFormatError: naming the file that is missing or malformed.
        """
        self.directory = Path(directory)
        stored = read_generation(self.directory)
        self.manifest = stored.manifest
        self.embeddings = stored.embeddings  # (N, d) float32, memory-mapped
        self.paths = stored.paths
        self.digests = stored.digests
        self.root = Path(self.manifest["root"])
        self.device = device
        self._ann = read_ann(stored.ann_path, self.manifest["approximate"]) if stored.ann_path else None
        self._by_path = {p: i for i, p in enumerate(self.paths)}
        self._by_digest: dict[str, list[int]] = {}
        for i, d in enumerate(self.digests):
            self._by_digest.setdefault(d, []).append(i)
        self._lock = threading.RLock()
        self._methods: dict[str, CIRMethod] = {}
        self.text_cache = text_cache

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"GalleryIndex({str(self.directory)!r}: {describe(self.manifest)})"

    # -- the model -------------------------------------------------------------------------------------------------
    @property
    def method_name(self) -> str:
        """The method the gallery was embedded with (the default for queries)."""
        return self.manifest["model"]["method"]

    @property
    def method(self) -> CIRMethod:
        """The index's own method, built from the manifest on first use."""
        return self._get_method(self.method_name)

    def methods(self) -> list[str]:
        """Methods that can query this gallery: its own, plus the training-free ones when they share its space."""
        with self._lock:
            own = self.method
            extra = [m for m in training_free_methods() if m != own.name] if shares_backbone_space(own) else []
        return [own.name, *extra]

    def _get_method(self, name: str) -> CIRMethod:
        with self._lock:
            if name not in self._methods:
                if name == self.method_name:
                    model = self.manifest["model"]
                    self._methods[name], _ = load_model(model["backbone"], model["checkpoint"] or name, self.device)
                elif name in self.methods():
                    self._methods[name] = create_method(name, self.method.backbone).to(self.device).eval()
                else:
                    raise ValueError(f"method {name!r} cannot query this index; choose one of {self.methods()}")
                if self.text_cache is not None and self._methods[name].text_cache is not None:
                    self._methods[name].text_cache = self.text_cache
            return self._methods[name]

    # -- queries ---------------------------------------------------------------------------------------------------
    def _reference(self, image: ImageInput) -> tuple[ReferenceImage, list[int]]:
        """Decodes a reference image (with its content digest) and finds the gallery ids holding the same bytes."""
        if isinstance(image, int | np.integer):
            if not 0 <= int(image) < len(self):
                raise IndexError(f"gallery id {int(image)} out of range (0..{len(self) - 1})")
            image = self.root / self.paths[int(image)]
        if isinstance(image, Image.Image):
            return ReferenceImage.from_image(image), []
        if isinstance(image, bytes):
            try:
                with Image.open(io.BytesIO(image)) as im:
                    im.load()
                    decoded = im.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                raise ImageReadError(f"reference image: cannot read image ({err})") from None
            digest = hash_bytes(image)
            return ReferenceImage(digest, image=decoded), self._by_digest.get(digest, [])
        path = Path(image)
        if not path.is_file() and path.as_posix() in self._by_path:
            path = self.root / path  # an indexed path, relative to the gallery root
        picture = load_image(path)
        digest = hash_file(path)
        return ReferenceImage(digest, path=path, image=picture), self._by_digest.get(digest, [])

    @torch.no_grad()
    def compose(self, image: ImageInput, text: str, method: str | None = None) -> Query:
        """Composes a query from a reference image and a modification text.

        Args:
            image: a file path, an indexed path (relative to the gallery root), a PIL image, encoded bytes or a
                gallery id.
            text: the modification text.
            method: one of ``methods()``; default the index's own.

        Raises:
            cirlab.data.images.ImageReadError: the reference cannot be read (the message names it).
            ValueError: a method that cannot query this index.
        """
        reference, exclude = self._reference(image)
        name = method or self.method_name
        with self._lock:
            model = self._get_method(name)
            pixels = model.backbone.preprocess([reference.load()])  # (1, 3, S, S)
            context = None
            if needs_context(model):
                # The gallery's embeddings are the index's own: the method's retrieval space, L2-normalised.
                context = QueryContext(images=[reference], gallery=self.embeddings)
            vector = compose_with_context(model, model.encode_images(pixels), [text], context)  # (1, d)
        vector = torch.nn.functional.normalize(vector.float(), dim=-1).cpu().numpy()[0]
        return Query(vector.astype(np.float32), name, text, exclude)

    def search(
        self, query: Query | np.ndarray, k: int = 10, exact: bool = False, exclude_reference: bool = True
    ) -> list[Hit]:
        """The ``k`` best gallery images for one query, best first.

        Args:
            query: a composed ``Query`` or a (d,) vector.
            k: how many results.
            exact: search exhaustively even when the index has an approximate structure.
            exclude_reference: leave out gallery images identical to the query's reference image.
        """
        vector = query.vector if isinstance(query, Query) else np.asarray(query, dtype=np.float32)
        exclude = query.exclude if isinstance(query, Query) and exclude_reference else []
        scores, ids = self.search_vectors(vector[None], k, exact=exact, exclude=[exclude])
        return [
            Hit(rank + 1, int(i), self.paths[int(i)], float(s), self.root / self.paths[int(i)])
            for rank, (s, i) in enumerate(zip(scores[0], ids[0], strict=True))
            if i >= 0
        ]

    def search_vectors(
        self, queries: np.ndarray, k: int, exact: bool = False, exclude: list[list[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of a batch of (Q, d) query vectors: (Q, k) scores and ids, descending; ids of -1 pad short rows.

        ``exclude[q]`` lists gallery ids never returned for query ``q``.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"queries must be (Q, {self.embeddings.shape[1]}), got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, len(self))
        if self._ann is not None and not exact:
            with self._lock:
                return ann_search(self._ann, queries, k, [set(e) for e in exclude] if exclude else None)
        width = max((len(e) for e in exclude), default=0) if exclude else 0
        ex = np.full((len(queries), width), -1, dtype=np.int64)
        for r, e in enumerate(exclude or []):
            ex[r, : len(e)] = e
        with self._lock:  # one search at a time: concurrent faiss/BLAS thread pools only fight over the cores
            result = topk_inner_product(queries, self.embeddings, k, exclude=ex if width else None)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        scores[:, : result.scores.shape[1]], ids[:, : result.indices.shape[1]] = result.scores, result.indices
        return scores, ids

    def same_content(self, digest: str) -> list[int]:
        """Gallery ids whose image file has content digest ``digest`` (``cirlab.features.hash_bytes``)."""
        return list(self._by_digest.get(digest, []))

    def file(self, item_id: int) -> Path:
        """The absolute path of gallery item ``item_id`` (an ``IndexError`` when out of range)."""
        if not 0 <= item_id < len(self):
            raise IndexError(f"gallery id {item_id} out of range (0..{len(self) - 1})")
        return self.root / self.paths[item_id]

    def describe(self) -> str:
        """One line: size, model and search mode."""
        return describe(self.manifest)


def load_index(
    directory: str | os.PathLike, device: str | torch.device = "cpu", text_cache: TextCache | None = None
) -> GalleryIndex:
    """Loads a gallery index written by ``cirlab index build`` (or ``cirlab.index.build_index``); ``text_cache``
    serves the methods that generate texts (see ``GalleryIndex``)."""
    return GalleryIndex(directory, device, text_cache)
