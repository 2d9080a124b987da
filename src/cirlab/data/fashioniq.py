"""FashionIQ loader (Wu et al., "The Fashion IQ Dataset: Retrieving Images by Combining Side Information and
Relative Natural Language Feedback", CVPR 2021), from the upstream layout::

    <annotations_dir>/captions/cap.<category>.<split>.json        list of {candidate, target, captions[2]}
    <annotations_dir>/image_splits/split.<category>.<split>.json  list of ASINs (the gallery)

One :class:`CIRSplit` per category (dress, shirt, toptee). Test files have no ``target``. Images are
``<ASIN>.png`` or ``<ASIN>.jpg`` in one flat folder (both copies circulate); ``.png`` is tried first.

Protocol (see FORMATS.md 3.4): Recall@10 and Recall@50 on the target over the category's gallery, the reference
NOT removed (SEARLE/LinCIR), reported per category and averaged over categories. The two relative captions are
joined into one query text; the convention used is stated by ``describe()``.
"""

from __future__ import annotations

import dataclasses
import string
from pathlib import Path
from typing import Any, Literal

from cirlab.data.benchmark import (
    FASHIONIQ_CATEGORIES,
    AnnotationError,
    CIRQuery,
    CIRSplit,
    Protocol,
    get_field,
    get_str_list,
    ground_truth_presence,
    read_json_list,
)
from cirlab.registry import BENCHMARKS

CaptionJoin = Literal["forward", "reverse", "both"]

RECALL_KS = (10, 50)

# What the peer code strips from both ends of a caption (".?, "), plus all whitespace: on the real files this
# gives the same text as SEARLE/LinCIR for every non-empty caption.
_STRIP = string.whitespace + ".?,"


def clean_caption(caption: str) -> str:
    """Strips surrounding whitespace and the punctuation ``. ? ,`` the peer code trims."""
    return caption.strip(_STRIP)


def join_captions(captions: list[str], order: Literal["forward", "reverse"] = "forward") -> str:
    """Joins relative captions as ``"<c1> and <c2>"`` after cleaning; empty captions are skipped.

    Skipping differs from the peer code only on the few entries with an empty caption (it produces
    ``" and <c2>"``); a leading ``" and "`` carries no information.

    Args:
        captions: the raw captions of one triplet.
        order: "forward" keeps the file order, "reverse" joins the last caption first.
    """
    cleaned = [c for c in (clean_caption(c) for c in captions) if c]
    if order == "reverse":
        cleaned.reverse()
    return " and ".join(cleaned)


def fashioniq_files(annotations_dir: str | Path, category: str, split: str) -> tuple[Path, Path]:
    """Paths of the caption file and the image split file of one FashionIQ category and split."""
    root = Path(annotations_dir)
    return (
        root / "captions" / f"cap.{category}.{split}.json",
        root / "image_splits" / f"split.{category}.{split}.json",
    )


def _read_gallery(path: Path) -> list[str]:
    names = read_json_list(path)
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise AnnotationError(f"{path}: entry {i}: expected a non-empty ASIN string, got {name!r}")
        if name in seen:
            raise AnnotationError(f"{path}: entry {i}: duplicate image {name!r}")
        seen.add(name)
    return names


def _parse_triplet(
    entry: Any, i: int, path: Path, gallery: set[str], has_gt: bool, caption_join: CaptionJoin
) -> CIRQuery:
    where = f"entry {i}"
    reference = get_field(entry, "candidate", str, path, where)
    captions = get_str_list(entry, "captions", path, where)
    if reference not in gallery:
        raise AnnotationError(f"{path}: {where}: candidate {reference!r} is not in the split's image file")
    forward = join_captions(captions, "forward")
    if not forward:
        raise AnnotationError(f"{path}: {where}: every caption is empty: {captions!r}")
    reverse = join_captions(captions, "reverse")
    targets: list[str] = []
    if has_gt:
        target = get_field(entry, "target", str, path, where)
        if target not in gallery:
            raise AnnotationError(f"{path}: {where}: target {target!r} is not in the split's image file")
        targets = [target]
    text, extra = _query_text(forward, reverse, caption_join)
    return CIRQuery(qid=str(i), reference=reference, text=text, texts=list(captions), targets=targets, extra=extra)


def _query_text(forward: str, reverse: str, caption_join: CaptionJoin) -> tuple[str, dict[str, Any]]:
    """A query's ``text`` and ``extra`` under ``caption_join``."""
    if caption_join == "both":
        # The evaluator composes a query per variant and averages the normalised queries (SEARLE, LinCIR).
        return forward, {"text_variants": [forward, reverse]}
    return (reverse if caption_join == "reverse" else forward), {}


def training_captions(captions: list[str]) -> list[str]:
    """The training texts of one triplet as CLIP4Cir draws them: ``"<c1> and <c2>"``, ``"<c2> and <c1>"``, ``c1``
    and ``c2`` (cleaned; empty captions skipped, repeats dropped), one drawn at random per training step."""
    cleaned = [c for c in (clean_caption(c) for c in captions) if c]
    options = [join_captions(captions, "forward"), join_captions(captions, "reverse"), *cleaned]
    return list(dict.fromkeys(o for o in options if o))


def with_caption_join(split: CIRSplit, caption_join: CaptionJoin) -> CIRSplit:
    """The FashionIQ ``split`` with its query texts joined by ``caption_join`` (from each query's raw captions)."""
    if split.dataset != "fashioniq":
        raise ValueError(f"{split.name}: caption joining applies to FashionIQ splits only")
    _check_join(caption_join)
    queries = []
    for q in split.queries:
        text, extra = _query_text(join_captions(q.texts, "forward"), join_captions(q.texts, "reverse"), caption_join)
        kept = {k: v for k, v in q.extra.items() if k != "text_variants"}
        queries.append(dataclasses.replace(q, text=text, extra={**kept, **extra}))
    conventions = (_join_convention(caption_join), *split.protocol.conventions[1:])
    protocol = dataclasses.replace(split.protocol, conventions=conventions)
    return dataclasses.replace(split, queries=queries, protocol=protocol)


def _check_join(caption_join: str) -> None:
    if caption_join not in ("forward", "reverse", "both"):
        raise ValueError(f"caption_join must be 'forward', 'reverse' or 'both', got {caption_join!r}")


def _join_convention(caption_join: CaptionJoin) -> str:
    join_text = {
        "forward": '"<caption 1> and <caption 2>"',
        "reverse": '"<caption 2> and <caption 1>"',
        "both": '"<caption 1> and <caption 2>" and "<caption 2> and <caption 1>", their normalised queries averaged',
    }[caption_join]
    return f"query text: {join_text}, captions stripped of whitespace and '.?,', empty captions skipped"


@BENCHMARKS.register("fashioniq")
def load_fashioniq(
    annotations_dir: str | Path,
    image_root: str | Path | None = None,
    split: str = "val",
    *,
    category: str,
    caption_join: CaptionJoin = "forward",
    extensions: tuple[str, ...] = (".png", ".jpg"),
    check_images: bool = False,
) -> CIRSplit:
    """Loads one FashionIQ category and split (use ``cirlab.data.benchmark.load_splits`` for all three).

    Args:
        annotations_dir: folder containing ``captions/`` and ``image_splits/``.
        image_root: the flat folder of ``<ASIN>.<ext>`` images; None to load annotations only.
        split: ``train``, ``val`` or ``test``.
        category: ``dress``, ``shirt`` or ``toptee``.
        caption_join: "forward" (``"<c1> and <c2>"``, default), "reverse" (``"<c2> and <c1>"``) or "both"
            (``extra["text_variants"]`` holds both orders, whose normalised queries the evaluator averages; ``text``
            is the forward one). A method's own convention (``fashioniq_join``) re-joins the split when evaluated.
        extensions: image file extensions tried in order for each ASIN.
        check_images: verify now that every image exists with one of ``extensions``.

    Raises:
        AnnotationError: malformed entry (named by file and index), unknown ASIN, or only empty captions.
        FileNotFoundError: an annotation file is missing, or ``check_images`` found missing images.
    """
    if category not in FASHIONIQ_CATEGORIES:
        raise ValueError(f"unknown FashionIQ category {category!r}; expected one of {', '.join(FASHIONIQ_CATEGORIES)}")
    _check_join(caption_join)
    captions_path, split_path = fashioniq_files(annotations_dir, category, split)
    gallery = _read_gallery(split_path)
    entries = read_json_list(captions_path)
    has_gt = ground_truth_presence(entries, "target", captions_path, lambda i, e: f"entry {i}")
    known = set(gallery)
    queries = [_parse_triplet(e, i, captions_path, known, has_gt, caption_join) for i, e in enumerate(entries)]
    protocol = Protocol(
        family="fashioniq",
        remove_reference=False,
        has_ground_truth=has_gt,
        recall_ks=RECALL_KS,
        conventions=(
            _join_convention(caption_join),
            "reference kept in the gallery (SEARLE/LinCIR); averages are over the three categories",
            f"image files: <ASIN>{' or <ASIN>'.join(extensions)} (first that exists)",
        ),
    )
    result = CIRSplit(
        dataset="fashioniq",
        split=split,
        category=category,
        queries=queries,
        gallery=gallery,
        protocol=protocol,
        image_root=Path(image_root) if image_root is not None else None,
        image_templates=tuple(f"{{name}}{ext}" for ext in extensions),
        sources={"captions": captions_path, "image_split": split_path},
    )
    if check_images:
        result.check_images()
    return result
