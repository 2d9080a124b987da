"""A built gallery index: compose a query from a reference image and a text, search, map hits back to files.

Example::

    index = cirlab.load_index("runs/my-index")
    query = index.compose("photos/dress.jpg", "the same dress but red")
    for hit in index.search(query, k=10): print(hit.score, hit.path)

Exact inner-product search over the memory-mapped embeddings is the default (``cirlab.evaluation.ranking``, the
evaluator's ranking path: faiss' exhaustive search when the ``[faiss]`` extra is installed, else numpy, and for a
large batch on a CPU with native bfloat16 its bfloat16 pass with an exact float32 re-rank); an index built with
an approximate structure uses it unless ``exact=True`` is asked for. Model calls and searches run one at a time
(a lock), so one ``GalleryIndex`` may be shared by the threads of a server; decoding and preprocessing a
reference image run outside that lock, so a slow image never holds up other queries.

A server keeps one index open while ``cirlab index build`` may commit a new generation into its directory:
:meth:`GalleryIndex.refresh` notices (a ``stat`` of ``index.json``) and switches to it, one whole generation at a
time. :meth:`GalleryIndex.open_item` opens an indexed file only when it is still the file that was indexed (a
regular file inside the gallery folder with the indexed content), so a file replaced since, or a symbolic link
swapped in, is never served in its place.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from cirlab.data.images import ImageReadError, decode_image, load_image, open_regular_file
from cirlab.evaluation.ranking import RankingGallery, topk_inner_product
from cirlab.features.hashing import DIGEST_SIZE, READ_CHUNK, hash_bytes, hash_file, stat_signature
from cirlab.generation.cache import TextCache
from cirlab.index.ann import ann_search, read_ann
from cirlab.index.model import load_model, shares_backbone_space, training_free_methods
from cirlab.index.store import INDEX_FILE, StoredIndex, describe, read_generation
from cirlab.methods.base import CIRMethod, compose_with_context, create_method, needs_context
from cirlab.types import QueryContext, ReferenceImage

VERIFIED_MEMO = 65536
"""Indexed files remembered as checked (by stat signature), so serving one again does not re-hash it."""

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


class StaleItemError(ImageReadError):
    """An indexed file is gone, or is no longer the file that was indexed; the message says which and why."""


class _Generation:
    """One committed generation of an index, swapped whole when a rebuild commits another."""

    def __init__(self, stored: StoredIndex, stamp: tuple[int, int, int]) -> None:
        self.manifest = stored.manifest
        self.generation = str(stored.manifest["generation"])
        self.stamp = stamp  # index.json's (inode, size, mtime) when read
        self.embeddings = stored.embeddings  # (N, d) float32, memory-mapped
        # Ranked through the one ranking path; a batch large enough for the bfloat16 pass converts it once.
        self.ranking = RankingGallery(self.embeddings)
        self.paths = stored.paths
        self.digests = stored.digests
        self.root = Path(stored.manifest["root"])
        self.ann = read_ann(stored.ann_path, stored.manifest["approximate"]) if stored.ann_path else None
        self.by_path = {p: i for i, p in enumerate(self.paths)}
        self.by_digest: dict[str, list[int]] = {}
        for i, d in enumerate(self.digests):
            self.by_digest.setdefault(d, []).append(i)


def _stamp(directory: Path) -> tuple[int, int, int]:
    st = os.stat(directory / INDEX_FILE)
    return st.st_ino, st.st_size, st.st_mtime_ns


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
        self.device = device
        self._gen = self._read()
        self._lock = threading.RLock()
        self._reload_lock = threading.Lock()
        self._methods: dict[str, CIRMethod] = {}
        self.text_cache = text_cache
        self._verified: OrderedDict[int, tuple[str, str]] = OrderedDict()

    def _read(self) -> _Generation:
        stamp = _stamp(self.directory) if (self.directory / INDEX_FILE).exists() else (0, 0, 0)
        return _Generation(read_generation(self.directory), stamp)

    # -- the committed generation ----------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        """The committed generation's ``index.json``."""
        return self._gen.manifest

    @property
    def embeddings(self) -> np.ndarray:
        """(N, d) float32 gallery embeddings, memory-mapped."""
        return self._gen.embeddings

    @property
    def paths(self) -> list[str]:
        """Row i's image path, relative to :attr:`root`."""
        return self._gen.paths

    @property
    def digests(self) -> list[str]:
        """Row i's content digest."""
        return self._gen.digests

    @property
    def root(self) -> Path:
        """The gallery folder that was indexed."""
        return self._gen.root

    @property
    def generation(self) -> str:
        """The id of the committed generation in use."""
        return self._gen.generation

    def changed(self) -> bool:
        """Whether ``index.json`` changed since the generation in use was read (one ``stat``; see :meth:`refresh`)."""
        try:
            return _stamp(self.directory) != self._gen.stamp
        except FileNotFoundError:
            return False

    def refresh(self) -> bool:
        """Switches to a generation a rebuild committed since this one was read; returns whether it did.

        Costs one ``stat`` when nothing changed. The model is rebuilt (on next use) only when the rebuild used
        another one. Requests already running finish on the generation they started with.

        Raises:
            cirlab.index.store.IndexFormatError: the new generation cannot be read (the old one stays in use).
        """
        try:
            stamp = _stamp(self.directory)
        except FileNotFoundError:
            return False
        if stamp == self._gen.stamp:
            return False
        with self._reload_lock:
            current = self._gen
            if stamp == current.stamp:
                return False
            fresh = self._read()
            if fresh.generation == current.generation:
                current.stamp = fresh.stamp
                return False
            with self._lock:
                if fresh.manifest["model"].get("key") != current.manifest["model"].get("key"):
                    self._methods.clear()
                self._gen = fresh
                self._verified.clear()
            return True

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
        own = self.method
        extra = [m for m in training_free_methods() if m != own.name] if shares_backbone_space(own) else []
        return [own.name, *extra]

    def _get_method(self, name: str) -> CIRMethod:
        built = self._methods.get(name)
        if built is not None:  # no lock: a query must not wait for another one's forward pass to find its model
            return built
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
        gen = self._gen
        if isinstance(image, int | np.integer):
            with self.open_item(int(image)) as f:
                decoded = decode_image(f, f"gallery image {int(image)} ({gen.paths[int(image)]})")
            # open_item checked the file's bytes against the indexed digest, which is therefore its digest.
            return ReferenceImage(gen.digests[int(image)], image=decoded), []
        if isinstance(image, Image.Image):
            return ReferenceImage.from_image(image), []
        if isinstance(image, bytes):
            digest = hash_bytes(image)
            return ReferenceImage(digest, image=decode_image(image, "reference image")), gen.by_digest.get(digest, [])
        path = Path(image)
        if not path.is_file() and path.as_posix() in gen.by_path:
            path = gen.root / path  # an indexed path, relative to the gallery root
        picture = load_image(path)
        digest = hash_file(path)
        return ReferenceImage(digest, path=path, image=picture), gen.by_digest.get(digest, [])

    @torch.no_grad()
    def compose(self, image: ImageInput, text: str, method: str | None = None) -> Query:
        """Composes a query from a reference image and a modification text.

        Decoding and preprocessing the image happen before the model lock is taken, so only the forward pass
        waits for other queries.

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
        model = self._get_method(name)
        pixels = model.backbone.preprocess([reference.load()])  # (1, 3, S, S)
        with self._lock:
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
        gen = self._gen
        vector = query.vector if isinstance(query, Query) else np.asarray(query, dtype=np.float32)
        exclude = query.exclude if isinstance(query, Query) and exclude_reference else []
        scores, ids = self._search(gen, vector[None], k, exact=exact, exclude=[exclude])
        return [
            Hit(rank + 1, int(i), gen.paths[int(i)], float(s), gen.root / gen.paths[int(i)])
            for rank, (s, i) in enumerate(zip(scores[0], ids[0], strict=True))
            if i >= 0
        ]

    def search_vectors(
        self, queries: np.ndarray, k: int, exact: bool = False, exclude: list[list[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of a batch of (Q, d) query vectors: (Q, k) scores and ids, descending; ids of -1 pad short rows.

        ``exclude[q]`` lists gallery ids never returned for query ``q``.
        """
        return self._search(self._gen, queries, k, exact, exclude)

    def _search(
        self, gen: _Generation, queries: np.ndarray, k: int, exact: bool, exclude: list[list[int]] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != gen.embeddings.shape[1]:
            raise ValueError(f"queries must be (Q, {gen.embeddings.shape[1]}), got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, len(gen.paths))
        if gen.ann is not None and not exact:
            with self._lock:
                return ann_search(gen.ann, queries, k, [set(e) for e in exclude] if exclude else None)
        with self._lock:  # one search at a time: concurrent faiss/BLAS thread pools only fight over the cores
            result = topk_inner_product(queries, gen.ranking, k, exclude=exclude or None)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        scores[:, : result.scores.shape[1]], ids[:, : result.indices.shape[1]] = result.scores, result.indices
        return scores, ids

    def same_content(self, digest: str) -> list[int]:
        """Gallery ids whose image file has content digest ``digest`` (``cirlab.features.hash_bytes``)."""
        return list(self._gen.by_digest.get(digest, []))

    def file(self, item_id: int) -> Path:
        """The absolute path of gallery item ``item_id`` (an ``IndexError`` when out of range)."""
        gen = self._gen
        if not 0 <= item_id < len(gen.paths):
            raise IndexError(f"gallery id {item_id} out of range (0..{len(gen.paths) - 1})")
        return gen.root / gen.paths[item_id]

    def open_item(self, item_id: int) -> BinaryIO:
        """Opens gallery item ``item_id``'s file for reading, only if it is still the file that was indexed.

        The file must be a regular file whose real path lies inside the gallery folder (a symbolic link swapped in
        since, pointing elsewhere, is refused) and whose content has the indexed digest. The content check reads
        the file once; afterwards its stat signature (device, inode, size, mtime, ctime) vouches for it.

        Raises:
            IndexError: no such id.
            StaleItemError: the file is gone or is not the indexed file any more; the message uses the indexed
                (relative) path, never the server's absolute one.
        """
        gen = self._gen
        path = self.file(item_id)
        label = f"gallery image {item_id} ({gen.paths[item_id]})"
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(os.path.realpath(gen.root)):
            raise StaleItemError(f"{label} now resolves to a file outside the gallery folder; rebuild the index")
        try:
            f = open_regular_file(real)
        except FileNotFoundError:
            raise StaleItemError(f"{label} is no longer on disk; rebuild the index") from None
        except OSError:
            raise StaleItemError(f"{label} is no longer a readable regular file; rebuild the index") from None
        try:
            signature = stat_signature(os.fstat(f.fileno()))
            if self._verified.get(item_id) != (gen.generation, signature):
                digest = hashlib.blake2b(digest_size=DIGEST_SIZE)
                while chunk := f.read(READ_CHUNK):
                    digest.update(chunk)
                if digest.hexdigest() != gen.digests[item_id]:
                    raise StaleItemError(f"{label} changed since it was indexed; rebuild the index")
                f.seek(0)
                self._verified[item_id] = (gen.generation, signature)
                while len(self._verified) > VERIFIED_MEMO:
                    self._verified.popitem(last=False)
        except BaseException:
            f.close()
            raise
        return f

    def describe(self) -> str:
        """One line: size, model and search mode."""
        return describe(self.manifest)


def load_index(
    directory: str | os.PathLike, device: str | torch.device = "cpu", text_cache: TextCache | None = None
) -> GalleryIndex:
    """Loads a gallery index written by ``cirlab index build`` (or ``cirlab.index.build_index``); ``text_cache``
    serves the methods that generate texts (see ``GalleryIndex``)."""
    return GalleryIndex(directory, device, text_cache)
