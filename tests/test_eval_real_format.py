"""`cirlab eval` and `cirlab submit` on benchmark-format fixtures with placeholder images and the tiny backbone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from cirlab.cli.main import main
from cirlab.data.benchmark import load_splits

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"


def _placeholder_images(split, root: Path) -> None:
    rng = np.random.default_rng(0)
    names = set(split.gallery) | {q.reference for q in split.queries}
    for name in names:
        path = split.image_path(name) if split.image_root else root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)


def test_eval_and_submit_cirr_format(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    annotations = tmp_path / "cirr"
    shutil.copytree(FIXTURES / "cirr", annotations)
    images = tmp_path / "img_raw"
    for split_name in ("val", "test1"):
        (split,) = load_splits("cirr", annotations, images, split_name)
        _placeholder_images(split, images)
    out_json = tmp_path / "val.json"
    common = ["--annotations", str(annotations), "--images", str(images), "--backbone", "tiny"]
    assert main(["eval", "sum", "--dataset", "cirr", "--split", "val", "--json", str(out_json), *common]) == 0
    metrics = json.loads(out_json.read_text())["all"]
    assert set(metrics) >= {"recall_at_1", "recall_subset_at_1", "avg"}
    assert "reference image REMOVED" in capsys.readouterr().out

    out = tmp_path / "submission"
    assert main(["submit", "sum", "--dataset", "cirr", "--split", "test1", "--out", str(out), *common]) == 0
    files = sorted(out.glob("*.json"))
    assert [f.name for f in files] == ["test1_pred_ranks_recall.json", "test1_pred_ranks_recall_subset.json"]
    for f in files:
        assert (
            main(
                ["check-submission", str(f), "--dataset", "cirr", "--split", "test1", "--annotations", str(annotations)]
            )
            == 0
        )


def test_eval_reports_a_missing_image_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    annotations = tmp_path / "cirr"
    shutil.copytree(FIXTURES / "cirr", annotations)
    images = tmp_path / "img_raw"
    (split,) = load_splits("cirr", annotations, images, "val")
    _placeholder_images(split, images)
    victim = split.image_path(split.gallery[0])
    victim.write_bytes(b"not a png")
    code = main(
        [
            "eval",
            "sum",
            "--dataset",
            "cirr",
            "--split",
            "val",
            "--annotations",
            str(annotations),
            "--images",
            str(images),
            "--backbone",
            "tiny",
        ]
    )
    assert code != 0
    assert victim.name in capsys.readouterr().err
