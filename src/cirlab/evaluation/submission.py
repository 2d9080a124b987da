"""Test-server submission files: writers (validated before they are written), a validator for any file, a scorer.

Formats (FORMATS.md 1.4 and 2.3):

* CIRR: two JSON objects, ``{"version": "rc2", "metric": "recall", "<pairid>": [50 names], ...}`` (the top 50 of
  the full gallery, the reference excluded) and the same with ``"metric": "recall_subset"`` and the top 3 of the
  query's 5 non-reference ``img_set`` members; every pairid of the split present; at most 5 MB each.
* CIRCO: ``{"0": [50 unique int COCO ids], ..., "799": [...]}``; every query id, no other key. Ids written as digit
  strings (``"397133"``) are accepted, with a note: the official scorer casts every id to int, and SEARLE's and
  LinCIR's submission scripts write strings.

Writers rank the split's query and gallery embeddings with :func:`cirlab.evaluation.protocols.rank_split` (the
same path as validation metrics), check the object with the same validator :func:`check_submission` uses, and
write atomically. :func:`score_submission` scores a file of a split with ground truth with the evaluator's
:func:`cirlab.evaluation.protocols.ranking_metrics`.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from cirlab.data.benchmark import CIRSplit, load_splits
from cirlab.evaluation.protocols import rank_split, ranking_metrics
from cirlab.io import atomic_path, read_json

SubmissionDataset = Literal["cirr", "circo"]

CIRR_RECALL_K = 50
CIRR_SUBSET_K = 3
CIRR_METRICS = ("recall", "recall_subset")
CIRR_SERVER_LIMIT_BYTES = 5 * 1024 * 1024
CIRCO_K = 50


class SubmissionError(ValueError):
    """A submission is invalid; ``problems`` lists every problem found, one sentence each."""

    def __init__(self, where: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{where}: {len(problems)} problem(s):\n" + "\n".join(problems))


def _short(items: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(x) for x in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _non_reference_members(query: Any) -> list[str]:
    return [m for m in (query.subset or []) if m != query.reference]


# --- validation ---------------------------------------------------------------------------------------------------


def detect_cirr_metric(obj: Any) -> str | None:
    """The CIRR metric a submission object is for: its ``metric`` key, else guessed from its list lengths."""
    if not isinstance(obj, dict):
        return None
    if obj.get("metric") in CIRR_METRICS:
        return str(obj["metric"])
    lengths = Counter(len(v) for v in obj.values() if isinstance(v, list))
    if not lengths:
        return None
    return "recall_subset" if lengths.most_common(1)[0][0] <= CIRR_SUBSET_K else "recall"


def _list_problems(qid: str, value: Any, length: int, kind: type, kind_name: str) -> list[str]:
    """Type, length and duplicate checks shared by both benchmarks."""
    if not isinstance(value, list):
        return [f"query {qid}: expected a list of {kind_name}, got {type(value).__name__}"]
    problems = []
    if len(value) != length:
        problems.append(f"query {qid}: {len(value)} entries, expected exactly {length}")
    wrong = [v for v in value if not isinstance(v, kind) or isinstance(v, bool)]
    if wrong:
        problems.append(f"query {qid}: entries that are not {kind_name}: {_short(wrong)}")
    counts = Counter(v for v in value if isinstance(v, (str, int, float)))
    dups = sorted((v for v, n in counts.items() if n > 1), key=str)
    if dups:
        problems.append(f"query {qid}: duplicate entries {_short(dups)}")
    return problems


def cirr_problems(obj: Any, split: CIRSplit, metric: str | None = None) -> list[str]:
    """Every problem of a CIRR submission object for ``split`` (empty when valid).

    Args:
        obj: the parsed JSON.
        split: the CIRR split the file is for (its image split file is the set of known names).
        metric: the expected metric ("recall" / "recall_subset"); None to accept either and detect it.
    """
    if not isinstance(obj, dict):
        return [f"the top level must be a JSON object, got {type(obj).__name__}"]
    problems: list[str] = []
    if "version" not in obj:
        problems.append(f'missing key "version" (expected "{split.version}")')
    elif obj["version"] != split.version:
        problems.append(f'"version" is {obj["version"]!r}, expected "{split.version}"')
    if "metric" not in obj:
        problems.append('missing key "metric" (expected "recall" or "recall_subset")')
    elif obj["metric"] not in CIRR_METRICS:
        problems.append(f'"metric" is {obj["metric"]!r}, expected "recall" or "recall_subset"')
    detected = detect_cirr_metric(obj) or metric or "recall"
    if metric is not None and detected != metric:
        problems.append(f'the file is a "{detected}" submission, expected "{metric}"')
    queries = {q.qid: q for q in split.queries}
    for key in obj:
        if key not in ("version", "metric") and key not in queries:
            problems.append(f"unknown key {key!r}: not a pairid of {split.name}")
    known = split.gallery_index
    for qid, q in queries.items():
        if qid not in obj:
            problems.append(f"query {qid}: missing")
            continue
        value = obj[qid]
        if detected == "recall":
            length = min(CIRR_RECALL_K, len(split.gallery) - 1)
            problems += _list_problems(qid, value, length, str, "image names")
            if not isinstance(value, list):
                continue
            unknown = [v for v in value if isinstance(v, str) and v not in known]
            if unknown:
                problems.append(f"query {qid}: names not in the {split.split} image split: {_short(unknown)}")
            if q.reference in value:
                problems.append(f"query {qid}: contains its own reference image {q.reference!r}")
        else:
            allowed = _non_reference_members(q)
            problems += _list_problems(qid, value, min(CIRR_SUBSET_K, len(allowed)), str, "image names")
            if not isinstance(value, list):
                continue
            if q.reference in value:
                problems.append(f"query {qid}: contains its own reference image {q.reference!r}")
            outside = [v for v in value if v not in allowed and v != q.reference]
            if outside:
                problems.append(f"query {qid}: names outside its non-reference img_set members: {_short(outside)}")
    return problems


def circo_id(value: Any) -> int | None:
    """A CIRCO image id as the official scorer reads it: an int, or a string of digits cast to int; else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


def circo_notes(obj: Any) -> list[str]:
    """Remarks on a valid CIRCO submission that do not make it invalid (ids given as digit strings)."""
    if not isinstance(obj, dict):
        return []
    stringly = sorted(
        (k for k, v in obj.items() if isinstance(v, list) and any(isinstance(x, str) for x in v)), key=str
    )
    if not stringly:
        return []
    return [
        f"note: {len(stringly)} queries give image ids as digit strings (e.g. query {stringly[0]}); accepted, since "
        "the official CIRCO scorer casts every id to int (SEARLE's and LinCIR's scripts write strings)"
    ]


def circo_problems(obj: Any, split: CIRSplit) -> list[str]:
    """Every problem of a CIRCO submission object for ``split`` (empty when valid).

    Ids are ints or digit strings (see :func:`circo_id`). They are checked against the gallery when the split has
    one (the COCO image list was found).
    """
    if not isinstance(obj, dict):
        return [f"the top level must be a JSON object, got {type(obj).__name__}"]
    problems: list[str] = []
    queries = [q.qid for q in split.queries]
    ids = set(queries)
    for key in obj:
        if key not in ids:
            problems.append(f'unknown key {key!r}: query ids of {split.name} are "0".."{len(queries) - 1}"')
    known = split.gallery_index
    for qid in queries:
        if qid not in obj:
            problems.append(f"query {qid}: missing")
            continue
        value = obj[qid]
        length = min(CIRCO_K, len(split.gallery)) if split.gallery else CIRCO_K
        if isinstance(value, list):
            # Digit strings count as the ids they cast to (duplicates included), as the official scorer reads them.
            value = [circo_id(v) if circo_id(v) is not None else v for v in value]
        problems += _list_problems(qid, value, length, int, "integer image ids (or digit strings)")
        if isinstance(value, list) and known:
            unknown = [v for v in value if isinstance(v, int) and str(v) not in known]
            if unknown:
                problems.append(f"query {qid}: ids not in the gallery: {_short(unknown)}")
    return problems


def submission_problems(obj: Any, split: CIRSplit, metric: str | None = None) -> list[str]:
    """Every problem of a parsed submission for ``split`` (CIRR or CIRCO format, by ``split.dataset``)."""
    if split.dataset == "cirr":
        return cirr_problems(obj, split, metric)
    if split.dataset == "circo":
        return circo_problems(obj, split)
    raise ValueError(f"no test-server submission format for {split.dataset!r} (expected cirr or circo)")


def _load_split(dataset: str, split: str, annotations_dir: str | Path, gallery: str | Path | None) -> CIRSplit:
    if dataset not in ("cirr", "circo"):
        raise ValueError(f"submission files exist for cirr and circo, not {dataset!r}")
    image_root, options = None, {}
    if dataset == "circo" and gallery is not None:
        if Path(gallery).is_dir():
            image_root = gallery
        else:
            options["image_info"] = gallery
    with warnings.catch_warnings():
        # Caption warnings (CIRR test1 has one blank caption) are irrelevant to checking a submission.
        warnings.simplefilter("ignore", UserWarning)
        return load_splits(dataset, annotations_dir, image_root, split, **options)[0]


UNREADABLE = object()
"""What :func:`_read_submission` returns for a file that is not JSON (a file holding ``null`` parses to None)."""


def _read_submission(path: Path, dataset: str) -> tuple[Any, list[str]]:
    """The parsed file (or ``UNREADABLE``) and problems found before looking inside (bad JSON, CIRR size limit)."""
    try:
        obj = read_json(path)
    except (FileNotFoundError, ValueError) as err:
        return UNREADABLE, [str(err)]
    problems = []
    if dataset == "cirr" and path.stat().st_size > CIRR_SERVER_LIMIT_BYTES:
        problems.append(f"{path}: {path.stat().st_size} bytes, over the server's 5 MB limit")
    return obj, problems


def check_submission(
    path: str | Path,
    dataset: SubmissionDataset,
    split: str,
    annotations_dir: str | Path,
    *,
    gallery: str | Path | None = None,
) -> list[str]:
    """Validates a submission file against a split's annotations; the CIRR metric is detected from the file.

    Args:
        path: the JSON file.
        dataset: "cirr" or "circo".
        split: split name (CIRR "test1" or "val"; CIRCO "test" or "val").
        annotations_dir: the benchmark root (CIRR: containing ``captions/`` and ``image_splits/``; CIRCO:
            containing ``annotations/``).
        gallery: CIRCO only: the COCO ``image_info_unlabeled2017.json`` or the image folder to check ids against
            (by default the image list is looked for in the official layout; without one, ids are only checked to
            be ints).

    Returns:
        Every problem found, one sentence each; empty when the file is valid.
    """
    path = Path(path)
    the_split = _load_split(dataset, split, annotations_dir, gallery)
    obj, problems = _read_submission(path, dataset)
    if obj is UNREADABLE:
        return problems
    return problems + submission_problems(obj, the_split)


# --- scoring ------------------------------------------------------------------------------------------------------


def score_submission(
    files: Sequence[str | Path],
    dataset: SubmissionDataset,
    split: str,
    annotations_dir: str | Path,
    *,
    gallery: str | Path | None = None,
    per_aspect: bool = False,
) -> dict[str, float]:
    """Scores submission files of a split with ground truth, with the evaluator's metric functions.

    Args:
        files: CIRR: the ``recall`` file and/or the ``recall_subset`` file (detected from ``metric``); CIRCO: one.
        dataset: "cirr" or "circo".
        split: a split with public ground truth (``val``).
        annotations_dir: the benchmark root, as for :func:`check_submission`.
        gallery: CIRCO only, see :func:`check_submission`.
        per_aspect: CIRCO only: add ``map_at_10/<aspect>`` for each semantic aspect.

    Returns:
        Percentages. CIRR: ``recall_at_{1,5,10,50}`` from a recall file, ``recall_subset_at_{1,2,3}`` from a
        subset file, ``avg`` from both. CIRCO: ``map_at_{5,10,25,50}``, ``recall_at_{5,10,25,50}``.

    Raises:
        SubmissionError: a file is invalid (every problem listed), or the files do not fit together.
        ValueError: the split has no public ground truth.
    """
    the_split = _load_split(dataset, split, annotations_dir, gallery)
    if not the_split.protocol.has_ground_truth:
        raise ValueError(f"{the_split.name} has no public ground truth; only the test server can score it")
    if not files or (dataset == "circo" and len(files) != 1) or len(files) > 2:
        raise ValueError(f"score takes {'one file' if dataset == 'circo' else 'one or two files'}, got {len(files)}")
    parsed: dict[str, Any] = {}
    for file in map(Path, files):
        obj, problems = _read_submission(file, dataset)
        problems += submission_problems(obj, the_split) if obj is not UNREADABLE else []
        if problems:
            raise SubmissionError(str(file), problems)
        kind = detect_cirr_metric(obj) if dataset == "cirr" else "circo"
        if kind in parsed:
            raise SubmissionError(str(file), [f"a second {kind!r} file was given"])
        parsed[str(kind)] = obj
    queries = the_split.queries
    if "circo" in parsed:
        rankings = [[circo_id(v) for v in parsed["circo"][q.qid]] for q in queries]
        return ranking_metrics(the_split, rankings, item=int, per_aspect=per_aspect)
    recall = [parsed["recall"][q.qid] for q in queries] if "recall" in parsed else None
    subset = [parsed["recall_subset"][q.qid] for q in queries] if "recall_subset" in parsed else None
    return ranking_metrics(the_split, recall, subset, item=str)


# --- writers ------------------------------------------------------------------------------------------------------


def _write_validated(obj: dict[str, Any], split: CIRSplit, out_path: Path) -> Path:
    problems = submission_problems(obj, split)
    if problems:
        raise SubmissionError(f"refusing to write {out_path}", problems)
    with atomic_path(out_path) as tmp:
        # Compact separators keep the CIRR recall file (4,148 x 50 names) well under the server's 5 MB limit.
        tmp.write_text(json.dumps(obj, separators=(",", ":")) + "\n", encoding="utf-8")
    return out_path


def cirr_submission_objects(split: CIRSplit, queries: Any, gallery: Any) -> dict[str, dict[str, Any]]:
    """The two CIRR submission objects ("recall", "recall_subset") from the split's (Q, d) query and (N, d) gallery
    embeddings (numpy arrays or torch tensors, row j of ``gallery`` for ``split.gallery[j]``)."""
    if split.dataset != "cirr" or not split.protocol.remove_reference:
        raise ValueError(f"{split.name}: a CIRR submission needs a CIRR split with the reference removed")
    names = split.gallery
    ranking = rank_split(split, queries, gallery, CIRR_RECALL_K, subsets=True)
    members = ranking.subsets or []  # always ranked here (subsets=True)
    recall: dict[str, Any] = {"version": split.version, "metric": "recall"}
    subset: dict[str, Any] = {"version": split.version, "metric": "recall_subset"}
    for i, q in enumerate(split.queries):
        recall[q.qid] = [names[j] for j in ranking.top[i]]
        subset[q.qid] = [names[j] for j in members[i][:CIRR_SUBSET_K]]
    return {"recall": recall, "recall_subset": subset}


def write_cirr_submission(split: CIRSplit, queries: Any, gallery: Any, out_dir: str | Path) -> dict[str, Path]:
    """Writes ``<split>_pred_ranks_recall.json`` and ``<split>_pred_ranks_recall_subset.json`` into ``out_dir``.

    Args:
        split: a CIRR split (``test1`` for the server; ``val`` works too, e.g. to check with ``cirlab score``).
        queries: (Q, d) composed queries, numpy array or torch tensor, row i for ``split.queries[i]``.
        gallery: (N, d) gallery embeddings, row j for ``split.gallery[j]``; higher inner product is better.
        out_dir: destination folder (created if needed).

    Returns:
        Metric name -> written path.

    Raises:
        SubmissionError: the objects failed validation (nothing is written then).
    """
    objects = cirr_submission_objects(split, queries, gallery)
    out = Path(out_dir)
    return {
        metric: _write_validated(obj, split, out / f"{split.split}_pred_ranks_{metric}.json")
        for metric, obj in objects.items()
    }


def circo_submission_object(split: CIRSplit, queries: Any, gallery: Any) -> dict[str, list[int]]:
    """The CIRCO submission object (query id -> top-50 COCO ids) from the split's query and gallery embeddings."""
    if split.dataset != "circo":
        raise ValueError(f"{split.name}: a CIRCO submission needs a CIRCO split")
    top = rank_split(split, queries, gallery, CIRCO_K).top
    return {q.qid: [int(split.gallery[j]) for j in top[i]] for i, q in enumerate(split.queries)}


def write_circo_submission(split: CIRSplit, queries: Any, gallery: Any, out_path: str | Path) -> Path:
    """Writes the CIRCO submission file for ``split`` (``test`` for the server, or ``val``).

    Args:
        split: a CIRCO split whose gallery is known (the COCO image list or the image folder).
        queries: (Q, d) composed queries, numpy array or torch tensor, row i for ``split.queries[i]``.
        gallery: (N, d) gallery embeddings, row j for ``split.gallery[j]``; higher inner product is better.
        out_path: the JSON file to write.

    Raises:
        SubmissionError: the object failed validation (nothing is written then).
    """
    return _write_validated(circo_submission_object(split, queries, gallery), split, Path(out_path))
