"""The common representation of a CIR benchmark split: what every loader returns and the evaluator consumes.

A loader (``cirlab.data.cirr``, ``fashioniq``, ``circo``, registered in ``BENCHMARKS``) reads the upstream annotation
layout described in ``shared/data/FORMATS.md`` and returns one :class:`CIRSplit`: the queries, the retrieval gallery,
how image names map to files, and the :class:`Protocol` (the benchmark's rules) that ``cirlab.evaluation.protocols``
applies. Every registered benchmark loader has the signature::

    load(annotations_dir, image_root=None, split="val", **options) -> CIRSplit

FashionIQ has one split per garment category, so its loader takes ``category=`` and :func:`load_splits` expands
all three categories. Annotation problems raise :class:`AnnotationError` naming the file and the entry.

This module imports no torch: the CLI's submission commands load splits and must stay fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from cirlab.io import read_json

MetricFamily = Literal["cirr", "circo", "fashioniq"]

FASHIONIQ_CATEGORIES: tuple[str, ...] = ("dress", "shirt", "toptee")


class AnnotationError(ValueError):
    """An annotation file does not follow its benchmark's format; the message names the file and the entry."""


@dataclass
class CIRQuery:
    """One composed-retrieval query.

    Attributes:
        qid: the id the benchmark uses for the query, as a string (CIRR pairid, CIRCO id, FashionIQ list index).
        reference: image name of the reference image.
        text: the modification text given to a method (FashionIQ: the two captions joined, see the split's
            ``describe()``).
        texts: the raw caption(s) exactly as in the annotation file.
        targets: all ground-truth image names, the main target first; empty when the split has no ground truth.
        subset: CIRR ``img_set.members`` (6 names, the reference included); None for other benchmarks.
        aspects: CIRCO ``semantic_aspects``; empty otherwise.
        extra: benchmark-specific fields kept for analysis (e.g. CIRR ``target_soft``, CIRCO ``shared_concept``).
    """

    qid: str
    reference: str
    text: str
    texts: list[str]
    targets: list[str]
    subset: list[str] | None = None
    aspects: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Protocol:
    """The evaluation rules of one split; ``cirlab.evaluation.protocols`` is the only code that interprets them.

    Attributes:
        family: which benchmark's metric set applies ("cirr", "circo" or "fashioniq").
        remove_reference: delete the query's reference image from the ranking before computing metrics.
        has_ground_truth: the split's targets are public (val/train); False for server-scored test splits.
        recall_ks: K values of Recall@K on the main target.
        subset_ks: K values of CIRR Recall_subset@K (empty for other families).
        map_ks: K values of CIRCO mAP@K (empty for other families).
        aspect_map_k: K of the per-semantic-aspect mAP (CIRCO: 10), or None.
        conventions: human-readable statements of every convention chosen, printed by ``CIRSplit.describe``.
    """

    family: MetricFamily
    remove_reference: bool
    has_ground_truth: bool
    recall_ks: tuple[int, ...]
    subset_ks: tuple[int, ...] = ()
    map_ks: tuple[int, ...] = ()
    aspect_map_k: int | None = None
    conventions: tuple[str, ...] = ()

    @property
    def max_k(self) -> int:
        """Largest K any gallery-ranking metric of this protocol needs."""
        return max((*self.recall_ks, *self.map_ks), default=0)


@dataclass
class CIRSplit:
    """One benchmark split (one category for FashionIQ): queries, gallery, image locations and protocol.

    Attributes:
        dataset: annotation format / benchmark name ("cirr", "fashioniq", "circo").
        split: split name as the files spell it ("val", "test1", "test", "train").
        category: FashionIQ garment category, else None.
        queries: the queries, in annotation-file order.
        gallery: image names of the retrieval gallery, in a fixed order; score matrices have one column per entry,
            and ties in scores are broken towards the lower gallery index.
        protocol: the evaluation rules.
        image_root: folder the image files are resolved against, or None when only annotations were loaded.
        image_files: image name -> file path relative to ``image_root``, when the annotations say so (CIRR split
            files, the COCO image list of CIRCO).
        image_templates: file-name patterns tried in order when a name is not in ``image_files``; ``{name}`` is
            the image name (FashionIQ: ``{name}.png``, ``{name}.jpg``).
        version: dataset version (CIRR "rc2"), else None.
        sources: annotation files read, by role (for messages and provenance).
    """

    dataset: str
    split: str
    category: str | None
    queries: list[CIRQuery]
    gallery: list[str]
    protocol: Protocol
    image_root: Path | None = None
    image_files: dict[str, str] = field(default_factory=dict)
    image_templates: tuple[str, ...] = ()
    version: str | None = None
    sources: dict[str, Path] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Short identifier such as ``cirr/val`` or ``fashioniq/dress/val``."""
        parts = [self.dataset, self.category, self.split]
        return "/".join(p for p in parts if p)

    @cached_property
    def gallery_index(self) -> dict[str, int]:
        """Image name -> column index in a (Q, N) score matrix over ``gallery``."""
        return {name: i for i, name in enumerate(self.gallery)}

    def image_path(self, name: str) -> Path:
        """Path of the image file called ``name``.

        Raises:
            FileNotFoundError: no image root was given, or none of the candidate files exists (FashionIQ tries
                ``.png`` then ``.jpg``).
            KeyError: the name is unknown to this split.
        """
        if self.image_root is None:
            raise FileNotFoundError(f"{self.name}: no image root was given to the loader, cannot locate {name!r}")
        if name in self.image_files:
            return self.image_root / self.image_files[name]
        if not self.image_templates:
            raise KeyError(f"{self.name}: unknown image name {name!r}")
        candidates = [self.image_root / t.format(name=name) for t in self.image_templates]
        if len(candidates) == 1:
            return candidates[0]
        for path in candidates:
            if path.is_file():
                return path
        tried = ", ".join(str(p) for p in candidates)
        raise FileNotFoundError(f"{self.name}: image {name!r} not found (tried {tried})")

    def missing_images(self) -> list[str]:
        """Names of gallery and query images whose file cannot be found (empty when all exist)."""
        names = dict.fromkeys(self.gallery)
        for q in self.queries:
            names.update(dict.fromkeys([q.reference, *q.targets, *(q.subset or [])]))
        missing = []
        for name in names:
            try:
                if not self.image_path(name).is_file():
                    missing.append(name)
            except (FileNotFoundError, KeyError):
                missing.append(name)
        return missing

    def check_images(self) -> None:
        """Raises ``FileNotFoundError`` listing missing image files (the count and the first few paths)."""
        missing = self.missing_images()
        if missing:
            shown = ", ".join(missing[:5])
            root = self.image_root if self.image_root is not None else "<no image root>"
            raise FileNotFoundError(
                f"{self.name}: {len(missing)} image(s) missing under {root}, e.g. {shown}"
                + (f" (tried templates {', '.join(self.image_templates)})" if self.image_templates else "")
            )

    def describe(self) -> str:
        """A few lines saying what was loaded and which evaluation conventions apply."""
        p = self.protocol
        lines = [
            f"{self.name}{f' ({self.version})' if self.version else ''}: {len(self.queries)} queries, "
            f"gallery of {len(self.gallery)} images"
            + ("" if p.has_ground_truth else "; ground truth withheld (server-scored split)"),
            "reference image "
            + ("REMOVED from the ranking" if p.remove_reference else "kept in the ranking (not removed)"),
        ]
        metrics = [f"Recall@{{{','.join(map(str, p.recall_ks))}}}"]
        if p.subset_ks:
            metrics.append(f"Recall_subset@{{{','.join(map(str, p.subset_ks))}}}")
        if p.map_ks:
            metrics.append(f"mAP@{{{','.join(map(str, p.map_ks))}}}")
        if p.aspect_map_k:
            metrics.append(f"per-aspect mAP@{p.aspect_map_k}")
        lines.append("metrics: " + ", ".join(metrics) + " (percent); score ties go to the lower gallery index")
        lines.extend(p.conventions)
        return "\n".join(lines)


def benchmark_loader(name: str) -> Any:
    """The registered benchmark loader called ``name``.

    Raises:
        ValueError: ``name`` is a training corpus (which has no benchmark splits) or nothing registered; the
            message lists the benchmarks.
    """
    from cirlab.data import BENCHMARKS, CORPORA

    if name in BENCHMARKS:
        return BENCHMARKS.get(name)
    known = ", ".join(BENCHMARKS.list())
    if name in CORPORA:
        raise ValueError(
            f"{name!r} is a training corpus, not a benchmark: it has no queries or ground truth to evaluate on "
            f"(train from it with `cirlab train --data ...`); benchmarks: {known}"
        )
    raise ValueError(f"unknown benchmark {name!r}; benchmarks: {known}")


def load_splits(
    dataset: str,
    annotations_dir: str | Path,
    image_root: str | Path | None = None,
    split: str = "val",
    **options: Any,
) -> list[CIRSplit]:
    """Loads one registered benchmark split, or all three FashionIQ categories when no ``category`` is given.

    Args:
        dataset: registered name ("cirr", "fashioniq", "circo").
        annotations_dir: the benchmark root as upstream lays it out (see each loader).
        image_root: folder the image files are resolved against, or None to load annotations only.
        split: split name as the files spell it.
        **options: loader options (e.g. ``category``, ``caption_join``, ``remove_reference``, ``check_images``).

    Returns:
        The loaded splits (one element except for FashionIQ without ``category``).
    """
    loader = benchmark_loader(dataset)
    if dataset == "fashioniq" and options.get("category") is None:
        options.pop("category", None)
        return [loader(annotations_dir, image_root, split, category=c, **options) for c in FASHIONIQ_CATEGORIES]
    return [loader(annotations_dir, image_root, split, **options)]


def with_protocol(split: CIRSplit, **changes: Any) -> CIRSplit:
    """A shallow copy of ``split`` whose protocol has ``changes`` applied (e.g. ``remove_reference=True``)."""
    return dataclasses.replace(split, protocol=dataclasses.replace(split.protocol, **changes))


# --- helpers shared by the loaders: every annotation error names the file and the entry -------------------------


def read_json_list(path: Path) -> list[Any]:
    """Reads a JSON file whose top level must be a list."""
    data = read_json(path)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list at the top level, got {type(data).__name__}")
    return data


def read_json_object(path: Path) -> dict[str, Any]:
    """Reads a JSON file whose top level must be an object."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def get_field(entry: Any, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    """Returns ``entry[key]`` after checking the entry is an object, the key exists and the value's type.

    Booleans are rejected where an int is expected (JSON ``true`` is not an id).
    """
    if not isinstance(entry, dict):
        raise AnnotationError(f"{path}: {where}: expected a JSON object, got {type(entry).__name__}")
    if key not in entry:
        raise AnnotationError(f"{path}: {where}: missing key {key!r}")
    value = entry[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise AnnotationError(f"{path}: {where}: key {key!r} should be {names}, got {value!r}")
    return value


def get_str_list(entry: Any, key: str, path: Path, where: str) -> list[str]:
    """Returns ``entry[key]`` checked to be a list of strings."""
    values = get_field(entry, key, list, path, where)
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise AnnotationError(f"{path}: {where}: {key}[{i}] should be a string, got {v!r}")
    return values


def ground_truth_presence(entries: list[Any], key: str, path: Path, where: Any) -> bool:
    """Whether the entries carry ground truth ``key``: all must agree (test files have none, val files all).

    Args:
        entries: the annotation entries.
        key: the ground-truth key (CIRR ``target_hard``, CIRCO ``gt_img_ids``, FashionIQ ``target``).
        path: the annotation file, for messages.
        where: callable ``(index, entry) -> str`` naming an entry in messages.
    """
    if not entries:
        raise AnnotationError(f"{path}: the annotation list is empty")
    present = isinstance(entries[0], dict) and key in entries[0]
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and (key in entry) != present:
            state = "lacks" if present else "has"
            raise AnnotationError(f"{path}: {where(i, entry)}: {state} key {key!r} unlike the first entry")
    return present
