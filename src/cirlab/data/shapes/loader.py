"""The ``shapes`` dataset loader: a built world's benchmark splits through the CIRR and CIRCO loaders.

Registered in ``BENCHMARKS`` with the signature every benchmark loader has
(``load(annotations_dir, image_root=None, split="val", **options) -> CIRSplit``). ``annotations_dir`` is the world
directory; ``split`` is ``train``, ``val`` or ``test1`` for the CIRR-format benchmark, ``circo-val`` or
``circo-test`` for the CIRCO-format one. Each query's ``extra`` gains the Shapes metadata (``heldout_template``,
``heldout_combo``, ``edit_type``, ``template``) so results can be reported on seen and held-out parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cirlab.io import read_json

if TYPE_CHECKING:
    from cirlab.data.benchmark import CIRSplit

CIRR_FORMAT_SPLITS: tuple[str, ...] = ("train", "val", "test1")
CIRCO_FORMAT_SPLITS: tuple[str, ...] = ("circo-val", "circo-test")
_META_KEYS = ("heldout_template", "heldout_combo", "edit_type", "template")


def load_shapes(
    annotations_dir: str | Path, image_root: str | Path | None = None, split: str = "val", **options: Any
) -> CIRSplit:
    """Loads one benchmark split of a built Shapes world.

    Args:
        annotations_dir: the world directory (the one holding ``world.json``).
        image_root: where the images are; default: the world's own image folder for that format.
        split: ``train``, ``val``, ``test1`` (CIRR format) or ``circo-val``, ``circo-test`` (CIRCO format).
        **options: passed to the CIRR or CIRCO loader (e.g. ``check_images``).

    Returns:
        The split, named ``shapes-cirr`` or ``shapes-circo``, with the Shapes metadata in each query's ``extra``.
    """
    # The benchmark loaders are imported here, not at module level: cirlab.data imports this package.
    from cirlab.data.circo import load_circo
    from cirlab.data.cirr import load_cirr

    root = Path(annotations_dir)
    if split in CIRR_FORMAT_SPLITS:
        images = Path(image_root) if image_root is not None else root / "cirr" / "img_raw"
        result = load_cirr(root / "cirr", images, split, **options)
        meta = read_json(root / "cirr" / f"shapes_meta.{split}.json")
        result.dataset = "shapes-cirr"
    elif split in CIRCO_FORMAT_SPLITS:
        circo_split = split.removeprefix("circo-")
        images = Path(image_root) if image_root is not None else root / "circo" / "COCO2017_unlabeled" / "unlabeled2017"
        result = load_circo(root / "circo", images, circo_split, **options)
        meta = read_json(root / "circo" / f"shapes_meta.{circo_split}.json")
        result.dataset = "shapes-circo"
        result.split = circo_split
    else:
        known = ", ".join((*CIRR_FORMAT_SPLITS, *CIRCO_FORMAT_SPLITS))
        raise ValueError(f"unknown Shapes split {split!r}; known: {known}")
    for q in result.queries:
        q.extra.update({k: meta[q.qid][k] for k in _META_KEYS})
    return result


def query_groups(split: CIRSplit) -> dict[str, list[int]]:
    """Indices of a Shapes split's queries by part: ``seen``, ``heldout_template``, ``heldout_combo``, ``heldout``.

    ``seen`` has neither flag; ``heldout`` has either; a query with both flags is in both held-out groups.
    """
    groups: dict[str, list[int]] = {"seen": [], "heldout_template": [], "heldout_combo": [], "heldout": []}
    for i, q in enumerate(split.queries):
        template, combo = bool(q.extra["heldout_template"]), bool(q.extra["heldout_combo"])
        if template:
            groups["heldout_template"].append(i)
        if combo:
            groups["heldout_combo"].append(i)
        groups["heldout" if template or combo else "seen"].append(i)
    return groups
