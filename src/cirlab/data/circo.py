"""CIRCO loader (Baldrati et al., "Zero-Shot Composed Image Retrieval with Textual Inversion", ICCV 2023), from
the upstream layout::

    <annotations_dir>/annotations/<split>.json     list of queries; list index == id (val: 220, test: 800)
    <annotations_dir>/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json   COCO image list (gallery)
    <annotations_dir>/COCO2017_unlabeled/unlabeled2017/<12-digit id>.jpg             images

Image names are COCO ids written as decimal strings (``"355099"``). The gallery is every image of the COCO
``image_info_unlabeled2017.json`` list (``images`` with ``id`` and ``file_name``, in file order) when that file is
found; otherwise the image folder is listed (``<12-digit id>.<ext>``, sorted by id); otherwise it is empty and only
the annotations are usable (submission checks, not scoring from a score matrix).

Protocol (FORMATS.md 2.3, the official ``src/evaluation.py``): mAP@{5,10,25,50} over all ground truths,
Recall@{5,10,25,50} on ``target_img_id`` (= first ground truth), per-aspect mAP@10; the reference is NOT removed
from the ranking by default (``remove_reference=True`` is offered as a non-official variant and stated as such).
"""

from __future__ import annotations

import os
import re
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

KS = (5, 10, 25, 50)
ASPECT_MAP_K = 10
IMAGE_INFO_NAME = "image_info_unlabeled2017.json"
_COCO_FILE = re.compile(r"^(\d{12})\.(jpg|jpeg|png)$", re.IGNORECASE)


def circo_annotation_file(annotations_dir: str | Path, split: str) -> Path:
    """Path of ``annotations/<split>.json`` under the CIRCO root."""
    return Path(annotations_dir) / "annotations" / f"{split}.json"


def _image_info_candidates(annotations_dir: Path, image_root: Path | None) -> list[Path]:
    """Where the COCO image list sits in the official layout and the common variants of it."""
    candidates = [annotations_dir / "COCO2017_unlabeled" / "annotations" / IMAGE_INFO_NAME]
    if image_root is not None:
        candidates += [image_root.parent / "annotations" / IMAGE_INFO_NAME, image_root / IMAGE_INFO_NAME]
    return candidates


def read_coco_image_info(path: Path) -> dict[str, str]:
    """Reads a COCO image list: id (as a decimal string) -> file name, in file order."""
    images = get_field(read_json_object(path), "images", list, path, "top level")
    files: dict[str, str] = {}
    for i, entry in enumerate(images):
        image_id = get_field(entry, "id", int, path, f"images[{i}]")
        file_name = get_field(entry, "file_name", str, path, f"images[{i}] (id {image_id})")
        if str(image_id) in files:
            raise AnnotationError(f"{path}: images[{i}]: duplicate image id {image_id}")
        files[str(image_id)] = file_name
    return files


def list_coco_folder(folder: Path) -> dict[str, str]:
    """Lists ``<12-digit id>.<jpg|jpeg|png>`` files of a folder: id string -> file name, sorted by id."""
    found: dict[int, str] = {}
    with os.scandir(folder) as it:
        for item in it:
            match = _COCO_FILE.match(item.name)
            if match and item.is_file():
                found[int(match.group(1))] = item.name
    return {str(i): found[i] for i in sorted(found)}


def _gallery(
    annotations_dir: Path, image_root: Path | None, image_info: str | Path | None
) -> tuple[dict[str, str], str]:
    """The gallery (id -> file name) and a sentence saying where it came from."""
    if image_info is not None:
        path = Path(image_info)
        return read_coco_image_info(path), f"gallery: COCO image list {path}"
    for path in _image_info_candidates(annotations_dir, image_root):
        if path.is_file():
            return read_coco_image_info(path), f"gallery: COCO image list {path}"
    if image_root is not None and image_root.is_dir():
        return list_coco_folder(image_root), f"gallery: <12-digit id>.jpg files listed in {image_root}"
    return {}, f"gallery: UNAVAILABLE ({IMAGE_INFO_NAME} not found, no image folder); annotations only"


def _parse_query(entry: Any, i: int, path: Path, gallery: dict[str, str], has_gt: bool) -> CIRQuery:
    where = f"entry {i}"
    qid = get_field(entry, "id", int, path, where)
    where = f"entry {i} (id {qid})"
    if qid != i:
        # The official evaluation script indexes queries by list position.
        raise AnnotationError(f"{path}: {where}: id should equal the list position {i}")
    reference = str(get_field(entry, "reference_img_id", int, path, where))
    caption = get_field(entry, "relative_caption", str, path, where)
    concept = get_field(entry, "shared_concept", str, path, where)
    if not caption.strip():
        raise AnnotationError(f"{path}: {where}: empty relative_caption")
    targets: list[str] = []
    aspects: list[str] = []
    if has_gt:
        gts = get_field(entry, "gt_img_ids", list, path, where)
        if not gts or any(not isinstance(g, int) or isinstance(g, bool) for g in gts):
            raise AnnotationError(f"{path}: {where}: gt_img_ids should be a non-empty list of ints, got {gts!r}")
        if len(set(gts)) != len(gts):
            raise AnnotationError(f"{path}: {where}: gt_img_ids has duplicates: {gts}")
        target = get_field(entry, "target_img_id", int, path, where)
        if target != gts[0]:
            # Recall@K uses target_img_id and CIRQuery.targets[0] stands for it: they must agree.
            raise AnnotationError(f"{path}: {where}: target_img_id {target} is not gt_img_ids[0] ({gts[0]})")
        targets = [str(g) for g in gts]
        aspects = get_str_list(entry, "semantic_aspects", path, where)
    if gallery:
        for name in [reference, *targets]:
            if name not in gallery:
                raise AnnotationError(f"{path}: {where}: image id {name} is not in the gallery")
    return CIRQuery(
        qid=str(qid),
        reference=reference,
        text=caption,
        texts=[caption],
        targets=targets,
        aspects=aspects,
        extra={"shared_concept": concept},
    )


@BENCHMARKS.register("circo")
def load_circo(
    annotations_dir: str | Path,
    image_root: str | Path | None = None,
    split: str = "val",
    *,
    remove_reference: bool = False,
    image_info: str | Path | None = None,
    check_images: bool = False,
) -> CIRSplit:
    """Loads a CIRCO split.

    Args:
        annotations_dir: the CIRCO root, containing ``annotations/``.
        image_root: the folder of COCO unlabeled2017 images (``.../COCO2017_unlabeled/unlabeled2017``); None to
            load annotations only (the gallery then comes from the COCO image list alone, if found).
        split: ``val`` or ``test``.
        remove_reference: delete the reference from rankings (NOT the official protocol, which keeps it).
        image_info: explicit path of ``image_info_unlabeled2017.json``; by default it is looked for under
            ``<annotations_dir>/COCO2017_unlabeled/annotations/`` and beside ``image_root``.
        check_images: verify now that every gallery and query image exists.

    Raises:
        AnnotationError: malformed entry (named by file, index and id), or an image id not in the gallery.
        FileNotFoundError: the annotation file is missing, or ``check_images`` found missing images.
    """
    root = Path(annotations_dir)
    images_dir = Path(image_root) if image_root is not None else None
    path = circo_annotation_file(root, split)
    entries = read_json_list(path)
    has_gt = ground_truth_presence(entries, "gt_img_ids", path, lambda i, e: f"entry {i} (id {e.get('id')})")
    files, gallery_note = _gallery(root, images_dir, image_info)
    queries = [_parse_query(e, i, path, files, has_gt) for i, e in enumerate(entries)]
    protocol = Protocol(
        family="circo",
        remove_reference=remove_reference,
        has_ground_truth=has_gt,
        recall_ks=KS,
        map_ks=KS,
        aspect_map_k=ASPECT_MAP_K,
        conventions=(
            "mAP@K: sum of precision@i over ranks i<=K holding a ground truth / min(K, #ground truths); "
            "Recall@K on target_img_id only",
            "reference removal: " + ("ON (non-official variant)" if remove_reference else "OFF (official protocol)"),
            gallery_note,
        ),
    )
    result = CIRSplit(
        dataset="circo",
        split=split,
        category=None,
        queries=queries,
        gallery=list(files),
        protocol=protocol,
        image_root=images_dir,
        image_files=files,
        image_templates=("{name:0>12}.jpg",),
        sources={"annotations": path},
    )
    if check_images:
        result.check_images()
    return result
