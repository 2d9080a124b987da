"""Submission files: writers, the validator (``cirlab check-submission``) and the scorer (``cirlab score``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cirlab.cli.main import main
from cirlab.data.circo import load_circo
from cirlab.data.cirr import load_cirr
from cirlab.evaluation import metrics as M
from cirlab.evaluation import submission as S
from cirlab.evaluation.protocols import SplitRanking, evaluate_ranking, rank_split

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real benchmark annotations not found at {REAL_DATA}")
    return REAL_DATA


def _check(path: Path, dataset: str, split: str, annotations: Path, capsys) -> tuple[int, str]:
    code = main(
        ["check-submission", str(path), "--dataset", dataset, "--split", split, "--annotations", str(annotations)]
    )
    return code, capsys.readouterr().out


def _score_json(files: list[Path], dataset: str, annotations: Path, capsys, *extra: str) -> dict[str, float]:
    args = ["score", *map(str, files), "--dataset", dataset, "--split", "val", "--annotations", str(annotations)]
    assert main([*args, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _tied_scores(n_queries: int, n_gallery: int, seed: int = 0) -> np.ndarray:
    """Scores with many exact ties, so that tie-breaking is exercised end to end."""
    return np.random.default_rng(seed).integers(0, 4, size=(n_queries, n_gallery)).astype(np.float32)


def _embed(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Queries and a gallery whose inner products are exactly ``scores``: the rows, against the identity."""
    return scores.astype(np.float32), np.eye(scores.shape[1], dtype=np.float32)


def evaluate_scores(split, scores: np.ndarray) -> dict[str, float]:
    """The evaluator's ranking and metrics on hand-made scores."""
    return evaluate_ranking(split, rank_split(split, *_embed(scores)))


def _corrupt(src: Path, dst: Path, edit) -> Path:
    data = json.loads(src.read_text())
    edit(data)
    dst.write_text(json.dumps(data))
    return dst


# --- writers and round trips on the fixtures (always run) ---------------------------------------------------------


def test_cirr_val_round_trip_score_equals_the_metric_functions(tmp_path, capsys):
    split = load_cirr(FIXTURES / "cirr", None, "val")
    scores = _tied_scores(len(split.queries), len(split.gallery))
    paths = S.write_cirr_submission(split, *_embed(scores), tmp_path)
    assert sorted(p.name for p in paths.values()) == ["val_pred_ranks_recall.json", "val_pred_ranks_recall_subset.json"]
    for path in paths.values():
        assert _check(path, "cirr", "val", FIXTURES / "cirr", capsys)[0] == 0

    scored = _score_json(list(paths.values()), "cirr", FIXTURES / "cirr", capsys)
    expected = evaluate_scores(split, scores)
    recalls = {f"recall_at_{k}" for k in (1, 5, 10, 50)} | {f"recall_subset_at_{k}" for k in (1, 2, 3)}
    assert set(scored) == recalls | {"avg"}  # both files: CIRR's average too, as the evaluator reports it
    for key, value in scored.items():
        assert value == pytest.approx(expected[key]), key

    recall = json.loads(paths["recall"].read_text())
    rankings = [recall[q.qid] for q in split.queries]
    targets = [q.targets[0] for q in split.queries]
    assert scored["recall_at_5"] == M.recall_at_k(rankings, targets, 5)
    # One file alone gives only its own metrics.
    only_subset = _score_json([paths["recall_subset"]], "cirr", FIXTURES / "cirr", capsys)
    assert set(only_subset) == {"recall_subset_at_1", "recall_subset_at_2", "recall_subset_at_3"}


def test_cirr_written_files_follow_the_server_format(tmp_path):
    split = load_cirr(FIXTURES / "cirr", None, "test1")
    paths = S.write_cirr_submission(split, *_embed(_tied_scores(2, 8, seed=1)), tmp_path)
    recall = json.loads(paths["recall"].read_text())
    subset = json.loads(paths["recall_subset"].read_text())
    assert list(recall)[:2] == ["version", "metric"] and recall["version"] == "rc2" and recall["metric"] == "recall"
    assert subset["metric"] == "recall_subset"
    assert set(recall) - {"version", "metric"} == {"200", "201"}
    for q in split.queries:
        assert len(recall[q.qid]) == 7 and q.reference not in recall[q.qid]  # gallery of 8 less the reference
        assert len(subset[q.qid]) == 3 and set(subset[q.qid]) <= set(q.subset) - {q.reference}
    assert S.check_submission(paths["recall"], "cirr", "test1", FIXTURES / "cirr") == []


def test_circo_val_round_trip(tmp_path, capsys):
    split = load_circo(FIXTURES / "circo", None, "val")
    scores = _tied_scores(len(split.queries), len(split.gallery), seed=2)
    path = S.write_circo_submission(split, *_embed(scores), tmp_path / "circo_val.json")
    written = json.loads(path.read_text())
    assert list(written) == ["0", "1", "2"]
    assert all(len(v) == 50 and len(set(v)) == 50 and all(type(i) is int for i in v) for v in written.values())
    assert _check(path, "circo", "val", FIXTURES / "circo", capsys)[0] == 0

    scored = _score_json([path], "circo", FIXTURES / "circo", capsys)
    expected = evaluate_scores(split, scores)
    assert set(scored) == {f"map_at_{k}" for k in (5, 10, 25, 50)} | {f"recall_at_{k}" for k in (5, 10, 25, 50)}
    for key, value in scored.items():
        assert value == pytest.approx(expected[key]), key
    per_aspect = _score_json([path], "circo", FIXTURES / "circo", capsys, "--per-aspect")
    assert per_aspect["map_at_10/viewpoint"] == pytest.approx(expected["map_at_10/viewpoint"])


def test_circo_test_submission_from_the_writer_is_valid(tmp_path):
    split = load_circo(FIXTURES / "circo", None, "test")
    path = S.write_circo_submission(split, *_embed(_tied_scores(2, 60, seed=3)), tmp_path / "sub.json")
    assert S.check_submission(path, "circo", "test", FIXTURES / "circo") == []


def test_writer_validates_before_writing(tmp_path, monkeypatch):
    split = load_circo(FIXTURES / "circo", None, "test")
    monkeypatch.setattr(S, "rank_split", lambda *_, **__: SplitRanking(np.zeros((2, 50), dtype=np.int64)))
    target = tmp_path / "sub.json"
    with pytest.raises(S.SubmissionError, match="duplicate entries"):
        S.write_circo_submission(split, *_embed(_tied_scores(2, 60)), target)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_fixture_corruptions_are_all_listed(tmp_path, capsys):
    split = load_cirr(FIXTURES / "cirr", None, "test1")
    paths = S.write_cirr_submission(split, *_embed(_tied_scores(2, 8)), tmp_path / "ok")
    ref = split.queries[1].reference

    def edit(data):
        del data["200"]
        data["201"][0] = ref
        data["version"] = "rc1"
        data["999"] = []

    bad = _corrupt(paths["recall"], tmp_path / "bad.json", edit)
    code, out = _check(bad, "cirr", "test1", FIXTURES / "cirr", capsys)
    assert code == 1
    lines = out.strip().splitlines()
    assert "query 200: missing" in lines
    assert f"query 201: contains its own reference image {ref!r}" in lines
    assert '"version" is \'rc1\', expected "rc2"' in lines
    assert "unknown key '999': not a pairid of cirr/test1" in lines


def test_score_refuses_invalid_or_unscorable_input(tmp_path, capsys):
    split = load_cirr(FIXTURES / "cirr", None, "val")
    paths = S.write_cirr_submission(split, *_embed(_tied_scores(4, 12)), tmp_path)
    bad = _corrupt(paths["recall"], tmp_path / "bad.json", lambda d: d["100"].append(d["100"][0]))
    args = ["--dataset", "cirr", "--split", "val", "--annotations", str(FIXTURES / "cirr")]
    assert main(["score", str(bad), *args]) == 1
    assert "query 100: duplicate entries" in capsys.readouterr().out
    with pytest.raises(S.SubmissionError, match="a second 'recall' file"):
        S.score_submission([paths["recall"], paths["recall"]], "cirr", "val", FIXTURES / "cirr")
    test_paths = S.write_cirr_submission(
        load_cirr(FIXTURES / "cirr", None, "test1"), *_embed(_tied_scores(2, 8)), tmp_path
    )
    with pytest.raises(ValueError, match="no public ground truth"):
        S.score_submission([test_paths["recall"]], "cirr", "test1", FIXTURES / "cirr")
    with pytest.raises(ValueError, match="cirr and circo"):
        S.check_submission(paths["recall"], "fashioniq", "val", FIXTURES / "cirr")  # type: ignore[arg-type]


def test_metric_is_detected_without_the_metric_key():
    assert S.detect_cirr_metric({"version": "rc2", "1": ["a", "b", "c"]}) == "recall_subset"
    assert S.detect_cirr_metric({"version": "rc2", "1": [str(i) for i in range(50)]}) == "recall"
    assert S.detect_cirr_metric({"metric": "recall_subset", "1": []}) == "recall_subset"


def test_circo_ids_are_checked_against_the_gallery(tmp_path):
    split = load_circo(FIXTURES / "circo", None, "test")
    path = S.write_circo_submission(split, *_embed(_tied_scores(2, 60)), tmp_path / "sub.json")
    bad = _corrupt(path, tmp_path / "bad.json", lambda d: d["1"].__setitem__(3, 42))
    assert S.check_submission(bad, "circo", "test", FIXTURES / "circo") == ["query 1: ids not in the gallery: 42"]
    # An explicit image folder as the gallery listing.
    images = tmp_path / "unlabeled2017"
    images.mkdir()
    for name in split.gallery:
        (images / f"{int(name):012d}.jpg").write_bytes(b"")
    assert S.check_submission(path, "circo", "test", FIXTURES / "circo", gallery=images) == []


# --- the upstream example submissions (real files; skipped when absent) -------------------------------------------


@pytest.mark.parametrize(
    ("relative", "dataset", "split"),
    [
        ("cirr/demo_files/test1_pred_ranks_recall.json", "cirr", "test1"),
        ("cirr/demo_files/test1_pred_ranks_recall_subset.json", "cirr", "test1"),
        ("circo/submission_examples/submission_test.json", "circo", "test"),
        ("circo/submission_examples/submission_val.json", "circo", "val"),
    ],
)
def test_upstream_examples_pass(real_data, capsys, relative, dataset, split):
    code, out = _check(real_data / relative, dataset, split, real_data / dataset, capsys)
    assert code == 0, out
    assert "valid" in out
    if dataset == "cirr":
        assert ("(recall_subset)" in out) == relative.endswith("subset.json")


def _cirr_demo(real_data: Path, metric: str) -> Path:
    suffix = "recall" if metric == "recall" else "recall_subset"
    return real_data / "cirr" / "demo_files" / f"test1_pred_ranks_{suffix}.json"


def _add_duplicate(data):
    data["12063"][1] = data["12063"][0]


def _add_reference(data):
    data["12063"][4] = "test1-147-1-img1"  # the reference of pairid 12063


def _subset_outsider(data):
    data["12063"][0] = "test1-38-2-img1"  # a test1 image outside the img_set of pairid 12063


def _drop_query(data):
    del data["12063"]


def _shorten(data):
    data["12063"].pop()


@pytest.mark.parametrize(
    ("metric", "edit", "message"),
    [
        ("recall", _drop_query, "query 12063: missing"),
        ("recall", _add_duplicate, "query 12063: duplicate entries"),
        ("recall", _add_reference, "query 12063: contains its own reference image 'test1-147-1-img1'"),
        ("recall", _shorten, "query 12063: 49 entries, expected exactly 50"),
        ("recall", lambda d: d.pop("metric"), 'missing key "metric"'),
        ("recall", lambda d: d["12063"].__setitem__(2, "dev-244-0-img0"), "names not in the test1 image split"),
        ("recall_subset", _subset_outsider, "query 12063: names outside its non-reference img_set members"),
        ("recall_subset", _add_duplicate, "query 12063: duplicate entries"),
        ("recall_subset", lambda d: d["12063"].__setitem__(2, "test1-147-1-img1"), "contains its own reference"),
        ("recall_subset", _drop_query, "query 12063: missing"),
    ],
)
def test_corrupted_cirr_demo_files_fail(real_data, tmp_path, capsys, metric, edit, message):
    bad = _corrupt(_cirr_demo(real_data, metric), tmp_path / "bad.json", edit)
    code, out = _check(bad, "cirr", "test1", real_data / "cirr", capsys)
    assert code == 1
    assert any(message in line for line in out.splitlines()), out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("5"), "query 5: missing"),
        (lambda d: d["7"].__setitem__(1, d["7"][0]), "query 7: duplicate entries"),
        (lambda d: d.__setitem__("800", d["0"]), "unknown key '800'"),
        # A digit string is an id the official scorer casts (accepted with a note); anything else is not.
        (lambda d: d["3"].__setitem__(0, f"coco{d['3'][0]}"), "query 3: entries that are not integer image ids"),
        (lambda d: d["9"].pop(), "query 9: 49 entries, expected exactly 50"),
    ],
)
def test_corrupted_circo_example_fails(real_data, tmp_path, capsys, edit, message):
    src = real_data / "circo" / "submission_examples" / "submission_test.json"
    bad = _corrupt(src, tmp_path / "bad.json", edit)
    code, out = _check(bad, "circo", "test", real_data / "circo", capsys)
    assert code == 1
    assert any(message in line for line in out.splitlines()), out


def test_real_circo_val_example_scores_like_the_official_arithmetic(real_data, capsys):
    path = real_data / "circo" / "submission_examples" / "submission_val.json"
    scored = _score_json([path], "circo", real_data / "circo", capsys)
    predictions = json.loads(path.read_text())
    queries = json.loads((real_data / "circo" / "annotations" / "val.json").read_text())
    for k in (5, 10, 25, 50):
        aps, hits = [], []
        for qid, preds in predictions.items():
            gts = queries[int(qid)]["gt_img_ids"]
            labels = np.isin(np.array(preds), gts)
            precisions = np.cumsum(labels) * labels / np.arange(1, len(labels) + 1)
            aps.append(float(np.sum(precisions[:k]) / min(len(gts), k)))
            hits.append(float(queries[int(qid)]["target_img_id"] in preds[:k]))
        assert scored[f"map_at_{k}"] == pytest.approx(float(np.mean(aps)) * 100, abs=1e-12)
        assert scored[f"recall_at_{k}"] == pytest.approx(float(np.mean(hits)) * 100, abs=1e-12)


def test_real_cirr_val_round_trip(real_data, tmp_path, capsys):
    split = load_cirr(real_data / "cirr", None, "val")
    scores = np.random.default_rng(0).standard_normal((len(split.queries), len(split.gallery)), dtype=np.float32)
    # Make the target win for about a third of the queries so the numbers are not all near zero.
    for i, q in enumerate(split.queries[::3]):
        scores[3 * i, split.gallery_index[q.targets[0]]] += 10.0
    paths = S.write_cirr_submission(split, *_embed(scores), tmp_path)
    assert all(p.stat().st_size < S.CIRR_SERVER_LIMIT_BYTES for p in paths.values())
    scored = _score_json(list(paths.values()), "cirr", real_data / "cirr", capsys)
    expected = evaluate_scores(split, scores)
    for key, value in scored.items():
        assert value == pytest.approx(expected[key]), key
    assert 30.0 < expected["recall_at_1"] < 40.0
