"""CIRR loader (Liu et al., "Image Retrieval on Real-life Images with Pre-trained Vision-and-Language Models",
ICCV 2021), dataset version rc2, from the upstream ``cirr_dataset`` layout::

    <annotations_dir>/captions/cap.rc2.<split>.json        list of pairs (pairid, reference, caption, img_set, ...)
    <annotations_dir>/image_splits/split.rc2.<split>.json  image name -> path relative to the raw-image root

Splits are ``train``, ``val`` and ``test1``; ``test1`` has no ``target_hard`` (server-scored). The gallery of a
split is every image of its split file, in file order. Image paths are the split file's values joined onto
``image_root`` (the official README's ``cirr/img_raw``, or the folder holding ``train/ dev/ test1/`` in the
SEARLE/LinCIR layout).

Protocol (see FORMATS.md 1.4): Recall@{1,5,10,50} on ``target_hard`` with the reference deleted from the ranking,
and Recall_subset@{1,2,3} over the 5 non-reference ``img_set`` members in full-ranking order. ``target_soft`` is
kept in ``CIRQuery.extra`` but ignored by the standard metric.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from cirlab.data.benchmark import (
    AnnotationError,
    CIRQuery,
    CIRSplit,
    Protocol,
    get_field,
    get_str_list,
    ground_truth_presence,
    read_json_list,
    read_json_object,
)
from cirlab.registry import BENCHMARKS

RECALL_KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)


def cirr_files(annotations_dir: str | Path, split: str, version: str = "rc2") -> tuple[Path, Path]:
    """Paths of the caption file and the image split file of a CIRR split."""
    root = Path(annotations_dir)
    return (
        root / "captions" / f"cap.{version}.{split}.json",
        root / "image_splits" / f"split.{version}.{split}.json",
    )


def read_cirr_image_split(path: Path) -> dict[str, str]:
    """Reads ``split.<version>.<split>.json``: image name -> relative image path (both strings)."""
    mapping = read_json_object(path)
    for name, rel in mapping.items():
        if not isinstance(rel, str) or not rel:
            raise AnnotationError(f"{path}: image {name!r}: path should be a non-empty string, got {rel!r}")
    return mapping


def _parse_pair(entry: Any, i: int, path: Path, images: dict[str, str], has_gt: bool) -> CIRQuery:
    """Checks one caption entry and turns it into a query; errors name the file, the index and the pairid."""
    where = f"entry {i}"
    pairid = get_field(entry, "pairid", int, path, where)
    where = f"entry {i} (pairid {pairid})"
    reference = get_field(entry, "reference", str, path, where)
    caption = get_field(entry, "caption", str, path, where)
    img_set = get_field(entry, "img_set", dict, path, where)
    members = get_str_list(img_set, "members", path, f"{where} img_set")
    if len(set(members)) != len(members):
        raise AnnotationError(f"{path}: {where}: img_set.members has duplicates: {members}")
    for name in [reference, *members]:
        if name not in images:
            raise AnnotationError(f"{path}: {where}: image {name!r} is not in the split's image file")
    if reference not in members:
        raise AnnotationError(f"{path}: {where}: reference {reference!r} is not one of img_set.members")
    if not caption.strip():
        warnings.warn(f"{path}: {where}: empty caption {caption!r}", stacklevel=2)
    targets: list[str] = []
    extra: dict[str, Any] = {"img_set_id": img_set.get("id"), "reference_rank": img_set.get("reference_rank")}
    if has_gt:
        target = get_field(entry, "target_hard", str, path, where)
        if target not in images:
            raise AnnotationError(f"{path}: {where}: target {target!r} is not in the split's image file")
        if target == reference:
            raise AnnotationError(f"{path}: {where}: target equals the reference {reference!r}")
        targets = [target]
        extra["target_soft"] = entry.get("target_soft", {})
        extra["target_rank"] = img_set.get("target_rank")
    return CIRQuery(
        qid=str(pairid),
        reference=reference,
        text=caption,
        texts=[caption],
        targets=targets,
        subset=members,
        extra=extra,
    )


@BENCHMARKS.register("cirr")
def load_cirr(
    annotations_dir: str | Path,
    image_root: str | Path | None = None,
    split: str = "val",
    *,
    version: str = "rc2",
    check_images: bool = False,
) -> CIRSplit:
    """Loads a CIRR split from the upstream layout.

    Args:
        annotations_dir: folder containing ``captions/`` and ``image_splits/``.
        image_root: folder the split file's relative image paths are joined onto; None to load annotations only.
        split: ``train``, ``val`` or ``test1``.
        version: dataset version in the file names.
        check_images: verify now that every image file exists (otherwise a missing file fails when opened).

    Returns:
        The split; queries keep the caption file's order, the gallery the split file's order.

    Raises:
        AnnotationError: a malformed entry (named by file, index and pairid), a duplicate pairid, or an image
            name not in the split's image file.
        FileNotFoundError: an annotation file is missing, or ``check_images`` found missing images.
    """
    captions_path, split_path = cirr_files(annotations_dir, split, version)
    images = read_cirr_image_split(split_path)
    entries = read_json_list(captions_path)
    has_gt = ground_truth_presence(
        entries, "target_hard", captions_path, lambda i, e: f"entry {i} (pairid {e.get('pairid')})"
    )
    queries = [_parse_pair(entry, i, captions_path, images, has_gt) for i, entry in enumerate(entries)]
    seen: set[str] = set()
    for i, q in enumerate(queries):
        if q.qid in seen:
            raise AnnotationError(f"{captions_path}: entry {i} (pairid {q.qid}): duplicate pairid")
        seen.add(q.qid)
    protocol = Protocol(
        family="cirr",
        remove_reference=True,
        has_ground_truth=has_gt,
        recall_ks=RECALL_KS,
        subset_ks=SUBSET_KS,
        conventions=(
            "hit = target_hard (target_soft ignored); reference deleted from the full ranking (SEARLE/LinCIR "
            "convention behind most published val numbers)",
            "Recall_subset: the img_set members other than the reference, in full-ranking order",
            "avg = (Recall@5 + Recall_subset@1) / 2 (reporting convention)",
        ),
    )
    result = CIRSplit(
        dataset="cirr",
        split=split,
        category=None,
        queries=queries,
        gallery=list(images),
        protocol=protocol,
        image_root=Path(image_root) if image_root is not None else None,
        image_files=images,
        version=version,
        sources={"captions": captions_path, "image_split": split_path},
    )
    if check_images:
        result.check_images()
    return result
