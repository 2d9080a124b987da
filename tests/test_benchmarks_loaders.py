"""Benchmark loaders: tiny official-format fixtures (always run) and the real annotation files (when present)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cirlab.data import BENCHMARKS, CORPORA
from cirlab.data.benchmark import AnnotationError, load_splits, with_protocol
from cirlab.data.circo import load_circo
from cirlab.data.cirr import load_cirr
from cirlab.data.fashioniq import clean_caption, join_captions, load_fashioniq

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _tiny_png() -> bytes:
    """A 1x1 PNG: placeholder images only need to exist (and be readable)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    return buffer.getvalue()


TINY_PNG = _tiny_png()


@pytest.fixture
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real benchmark annotations not found at {REAL_DATA}")
    return REAL_DATA


def _copy_fixture(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def _placeholders(folder: Path, relative_paths: list[str]) -> None:
    for rel in relative_paths:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(TINY_PNG)


# --- registry and import hygiene -----------------------------------------------------------------------------------


def test_loaders_are_registered_and_listed(capsys):
    from cirlab.cli.main import main

    assert {"cirr", "fashioniq", "circo", "shapes"} <= set(BENCHMARKS.list())
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    # Benchmarks and corpora are listed apart: each name under its own heading only.
    benchmarks = out.split("benchmarks:\n")[1].split("corpora:\n")[0]
    corpora = out.split("corpora:\n")[1].split("captioners:\n")[0]
    assert {line.strip() for line in benchmarks.splitlines()} == set(BENCHMARKS.list())
    assert {line.strip() for line in corpora.splitlines()} == set(CORPORA.list()) >= {"imagefolder", "webdataset"}


@pytest.mark.parametrize("command", ["eval", "submit"])
def test_a_corpus_given_as_a_benchmark_is_refused_by_name(command, tmp_path, capsys):
    """`cirlab eval --dataset imagefolder` called the image-folder corpus's constructor as a benchmark loader and
    failed with its error; now corpora are registered apart and the CLI says what the name is."""
    from cirlab.cli.main import main

    args = [command, "sum", "--dataset", "imagefolder", "--split", "val", "--annotations", str(tmp_path)]
    assert main([*args, "--images", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'imagefolder' is a training corpus, not a benchmark" in err and "cirr" in err and "--dataset" in err
    with pytest.raises(ValueError, match="unknown benchmark 'nope'; benchmarks: circo, cirr, fashioniq, shapes"):
        load_splits("nope", tmp_path)


def test_data_and_harness_do_not_import_torch():
    code = (
        "import sys; import cirlab.data, cirlab.evaluation.submission, cirlab.cli.harness; "
        "assert 'torch' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --- CIRR ----------------------------------------------------------------------------------------------------------


def test_cirr_fixture_val(tmp_path):
    split = load_cirr(FIXTURES / "cirr", tmp_path / "img_raw", "val")
    assert (len(split.queries), len(split.gallery)) == (4, 12)
    q = split.queries[0]
    assert q.qid == "100" and q.reference == "dev-10-0-img0" and q.targets == ["dev-10-1-img0"]
    assert len(q.subset) == 6 and q.reference in q.subset
    assert q.text == q.texts[0] == "caption of pair 100"
    assert split.queries[1].extra["target_soft"] == {"dev-11-1-img0": 1.0, "dev-10-0-img1": 0.5}
    assert split.image_path("dev-10-0-img0") == tmp_path / "img_raw" / "dev" / "dev-10-0-img0.png"
    assert split.protocol.remove_reference and split.protocol.has_ground_truth
    text = split.describe()
    assert "REMOVED" in text and "Recall_subset@{1,2,3}" in text and "4 queries" in text


def test_cirr_fixture_test1_and_train(tmp_path):
    test1 = load_cirr(FIXTURES / "cirr", None, "test1")
    assert not test1.protocol.has_ground_truth
    assert all(q.targets == [] for q in test1.queries)
    assert "withheld" in test1.describe()
    with pytest.raises(FileNotFoundError, match="no image root"):
        test1.image_path(test1.gallery[0])
    # Train images sit in NLVR2's numbered sub-folders, known only from the split file.
    train = load_cirr(FIXTURES / "cirr", tmp_path, "train")
    assert train.image_path("train-6-0-img1") == tmp_path / "train" / "3" / "train-6-0-img1.png"


def test_cirr_check_images(tmp_path):
    names = json.loads((FIXTURES / "cirr" / "image_splits" / "split.rc2.val.json").read_text())
    _placeholders(tmp_path, list(names.values())[:-1])
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) missing .*dev-12-1-img1"):
        load_cirr(FIXTURES / "cirr", tmp_path, "val", check_images=True)
    _placeholders(tmp_path, list(names.values()))
    assert load_cirr(FIXTURES / "cirr", tmp_path, "val", check_images=True).missing_images() == []


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


def _set(index: int, key: str, value):
    def edit(data):
        if value is None:
            del data[index][key]
        else:
            data[index][key] = value
        return data

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set(1, "caption", None), r"entry 1 \(pairid 101\): missing key 'caption'"),
        (_set(2, "reference", "dev-99-0-img0"), r"entry 2 \(pairid 102\): image 'dev-99-0-img0' is not in"),
        (_set(3, "target_hard", "nope"), r"entry 3 \(pairid 103\): target 'nope' is not in"),
        (_set(0, "pairid", "100"), r"entry 0: key 'pairid' should be int"),
        (_set(3, "pairid", 100), r"entry 3 \(pairid 100\): duplicate pairid"),
        (lambda d: {"pairs": d}, r"expected a JSON list at the top level"),
        (lambda d: [*d[:2], {k: v for k, v in d[2].items() if k != "target_hard"}], r"entry 2 .*lacks key"),
    ],
)
def test_cirr_annotation_errors_name_file_and_entry(tmp_path, edit, message):
    root = _copy_fixture(tmp_path, "cirr")
    path = root / "captions" / "cap.rc2.val.json"
    _edit_json(path, edit)
    with pytest.raises(AnnotationError, match=message) as info:
        load_cirr(root, None, "val")
    assert str(path) in str(info.value)


def test_cirr_malformed_json_and_empty_caption(tmp_path):
    root = _copy_fixture(tmp_path, "cirr")
    path = root / "captions" / "cap.rc2.val.json"
    _edit_json(path, _set(2, "caption", "  "))
    with pytest.warns(UserWarning, match=r"cap\.rc2\.val\.json: entry 2 \(pairid 102\): empty caption"):
        load_cirr(root, None, "val")
    path.write_text(path.read_text()[:-5])
    with pytest.raises(ValueError, match=r"cap\.rc2\.val\.json: malformed JSON"):
        load_cirr(root, None, "val")
    with pytest.raises(FileNotFoundError, match=r"rc2\.nosplit\.json: file not found"):
        load_cirr(root, None, "nosplit")


# --- FashionIQ -----------------------------------------------------------------------------------------------------


def test_fashioniq_caption_conventions():
    assert clean_caption(" is shiny and silver. ") == "is shiny and silver"
    assert join_captions(["is shiny and silver.", " fit and flare "]) == "is shiny and silver and fit and flare"
    assert join_captions(["a?", "b,"], "reverse") == "b and a"
    assert join_captions(["", "has buttons on it"]) == "has buttons on it"


def test_fashioniq_fixture_and_caption_options():
    split = load_fashioniq(FIXTURES / "fashioniq", None, "val", category="dress")
    assert split.name == "fashioniq/dress/val"
    assert (len(split.queries), len(split.gallery)) == (3, 6)
    q0, q1, q2 = split.queries
    assert q0.text == "is shiny and silver and fit and flare"
    assert q0.texts == ["is shiny and silver.", " fit and flare "]  # raw captions kept
    assert q1.text == "has buttons on it"  # the empty caption is skipped
    assert q2.text == "Is darker and is exactly the same!"  # only . ? , are trimmed (as the peer code does)
    assert q0.qid == "0" and q0.targets == [split.gallery[1]]
    assert not split.protocol.remove_reference
    assert '"<caption 1> and <caption 2>"' in split.describe()

    reverse = load_fashioniq(FIXTURES / "fashioniq", None, "val", category="dress", caption_join="reverse")
    assert reverse.queries[0].text == "fit and flare and is shiny and silver"
    assert '"<caption 2> and <caption 1>"' in reverse.describe()
    both = load_fashioniq(FIXTURES / "fashioniq", None, "val", category="dress", caption_join="both")
    assert both.queries[0].extra["text_variants"] == [q0.text, reverse.queries[0].text]

    test = load_fashioniq(FIXTURES / "fashioniq", None, "test", category="toptee")
    assert not test.protocol.has_ground_truth and all(not q.targets for q in test.queries)


def test_fashioniq_all_categories_and_bad_options():
    splits = load_splits("fashioniq", FIXTURES / "fashioniq", None, "val")
    assert [s.category for s in splits] == ["dress", "shirt", "toptee"]
    with pytest.raises(ValueError, match="unknown FashionIQ category 'shoes'"):
        load_fashioniq(FIXTURES / "fashioniq", None, "val", category="shoes")
    with pytest.raises(ValueError, match="caption_join"):
        load_fashioniq(FIXTURES / "fashioniq", None, "val", category="dress", caption_join="random")


def test_fashioniq_png_or_jpg(tmp_path):
    split = load_fashioniq(FIXTURES / "fashioniq", tmp_path, "val", category="shirt")
    png, jpg, missing = split.gallery[:3]
    _placeholders(tmp_path, [f"{png}.png", f"{jpg}.jpg"])
    assert split.image_path(png) == tmp_path / f"{png}.png"
    assert split.image_path(jpg) == tmp_path / f"{jpg}.jpg"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.png, .*{missing}.jpg"):
        split.image_path(missing)
    with pytest.raises(FileNotFoundError, match=r"4 image\(s\) missing"):
        load_fashioniq(FIXTURES / "fashioniq", tmp_path, "val", category="shirt", check_images=True)
    _placeholders(tmp_path, [f"{name}.png" for name in split.gallery[2:]])
    load_fashioniq(FIXTURES / "fashioniq", tmp_path, "val", category="shirt", check_images=True)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set(1, "captions", ["", " "]), r"entry 1: every caption is empty"),
        (_set(0, "candidate", "B0NOTTHERE"), r"entry 0: candidate 'B0NOTTHERE' is not in"),
        (_set(2, "captions", None), r"entry 2: missing key 'captions'"),
        (_set(2, "captions", ["ok", 3]), r"entry 2: captions\[1\] should be a string"),
    ],
)
def test_fashioniq_annotation_errors(tmp_path, edit, message):
    root = _copy_fixture(tmp_path, "fashioniq")
    path = root / "captions" / "cap.dress.val.json"
    _edit_json(path, edit)
    with pytest.raises(AnnotationError, match=message) as info:
        load_fashioniq(root, None, "val", category="dress")
    assert str(path) in str(info.value)


# --- CIRCO ---------------------------------------------------------------------------------------------------------


def test_circo_fixture_gallery_from_coco_image_list(tmp_path):
    split = load_circo(FIXTURES / "circo", tmp_path / "unlabeled2017", "val")
    assert (len(split.queries), len(split.gallery)) == (3, 60)
    assert [len(q.targets) for q in split.queries] == [1, 3, 14]
    q = split.queries[1]
    assert q.qid == "1" and q.reference == "100014" and q.targets[0] == "100021"
    assert q.aspects == ["addition", "negation"] and q.extra["shared_concept"] == "a street"
    assert split.image_path("100014") == tmp_path / "unlabeled2017" / "000000100014.jpg"
    text = split.describe()
    assert "OFF (official protocol)" in text and "image_info_unlabeled2017.json" in text
    assert not split.protocol.remove_reference
    on = load_circo(FIXTURES / "circo", None, "val", remove_reference=True)
    assert on.protocol.remove_reference and "ON (non-official variant)" in on.describe()
    assert with_protocol(split, remove_reference=True).protocol.remove_reference


def test_circo_gallery_from_an_image_folder_or_unavailable(tmp_path):
    root = tmp_path / "CIRCO"
    (root / "annotations").mkdir(parents=True)
    shutil.copy(FIXTURES / "circo" / "annotations" / "val.json", root / "annotations" / "val.json")
    ids = [100000 + 7 * i for i in range(60)]
    images = tmp_path / "unlabeled2017"
    _placeholders(images, [f"{i:012d}.jpg" for i in reversed(ids)] + ["notes.txt"])
    split = load_circo(root, images, "val", check_images=True)
    assert split.gallery == [str(i) for i in ids]  # sorted by id, other files ignored
    assert "listed in" in split.describe()
    annotations_only = load_circo(root, None, "val")
    assert annotations_only.gallery == [] and "UNAVAILABLE" in annotations_only.describe()
    # Without a listing, names still resolve by the 12-digit rule once an image root is known.
    elsewhere = load_circo(root, tmp_path / "elsewhere", "val")
    assert elsewhere.gallery == [] and elsewhere.image_path("100000") == tmp_path / "elsewhere" / "000000100000.jpg"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set(1, "id", 5), r"entry 1 \(id 5\): id should equal the list position 1"),
        (_set(2, "target_img_id", 100007), r"entry 2 \(id 2\): target_img_id 100007 is not gt_img_ids\[0\]"),
        (_set(0, "gt_img_ids", []), r"entry 0 \(id 0\): gt_img_ids should be a non-empty list"),
        (_set(0, "gt_img_ids", [100007, 100007]), r"entry 0 \(id 0\): gt_img_ids has duplicates"),
        (_set(1, "reference_img_id", 5), r"entry 1 \(id 1\): image id 5 is not in the gallery"),
        (_set(1, "relative_caption", None), r"entry 1 \(id 1\): missing key 'relative_caption'"),
    ],
)
def test_circo_annotation_errors(tmp_path, edit, message):
    root = _copy_fixture(tmp_path, "circo")
    path = root / "annotations" / "val.json"
    _edit_json(path, edit)
    with pytest.raises(AnnotationError, match=message) as info:
        load_circo(root, None, "val")
    assert str(path) in str(info.value)


# --- the real annotation files (skipped when shared/data is absent) -----------------------------------------------


def test_real_cirr_counts(real_data, tmp_path):
    val = load_cirr(real_data / "cirr", tmp_path, "val")
    assert (len(val.queries), len(val.gallery)) == (4181, 2297)
    assert len({q.reference for q in val.queries}) == 2165
    assert len({q.targets[0] for q in val.queries}) == 2206
    assert all(q.targets[0] in q.subset and len(q.subset) == 6 for q in val.queries)
    with pytest.warns(UserWarning, match=r"pairid 27098\): empty caption"):
        test1 = load_cirr(real_data / "cirr", None, "test1")
    assert (len(test1.queries), len(test1.gallery)) == (4148, 2315)
    assert not test1.protocol.has_ground_truth
    first = val.queries[0]
    assert (first.qid, first.reference, first.targets) == ("12060", "dev-244-0-img0", ["dev-1028-1-img1"])
    # Placeholder images for one query only: the paths come from the split file.
    _placeholders(tmp_path, [f"dev/{n}.png" for n in first.subset])
    assert all(val.image_path(n).is_file() for n in first.subset)


def test_real_cirr_train_captions_absent_but_split_file_reads(real_data):
    # The train caption file is missing from shared/data (FORMATS.md 1); the loader names it.
    with pytest.raises(FileNotFoundError, match=r"cap\.rc2\.train\.json"):
        load_cirr(real_data / "cirr", None, "train")


def test_real_circo_counts(real_data):
    val = load_circo(real_data / "circo", None, "val")
    assert len(val.queries) == 220
    assert sum(len(q.targets) for q in val.queries) == 916
    assert {len(q.targets) for q in val.queries} >= {1, 14}
    aspects: dict[str, int] = {}
    for q in val.queries:
        for a in q.aspects:
            aspects[a] = aspects.get(a, 0) + 1
    assert aspects["statement_with_conjunction"] == 164 and aspects["negation"] == 21
    test = load_circo(real_data / "circo", None, "test")
    assert len(test.queries) == 800 and not test.protocol.has_ground_truth


@pytest.mark.parametrize(
    ("category", "split", "triplets", "images"),
    [
        ("dress", "train", 5985, 11452),
        ("dress", "val", 2017, 3817),
        ("dress", "test", 2024, 3818),
        ("shirt", "train", 5988, 19036),
        ("shirt", "val", 2038, 6346),
        ("shirt", "test", 2038, 6346),
        ("toptee", "train", 6027, 16121),
        ("toptee", "val", 1961, 5373),
        ("toptee", "test", 2056, 5374),
    ],
)
def test_real_fashioniq_counts(real_data, category, split, triplets, images):
    loaded = load_fashioniq(real_data / "fashioniq", None, split, category=category)
    assert (len(loaded.queries), len(loaded.gallery)) == (triplets, images)
    assert loaded.protocol.has_ground_truth == (split != "test")


def test_real_fashioniq_text_matches_the_peer_convention(real_data):
    for split in load_splits("fashioniq", real_data / "fashioniq", None, "val"):
        for q in split.queries:
            first, second = q.texts
            if first.strip() and second.strip():
                assert q.text == f"{first.strip('.?, ')} and {second.strip('.?, ')}"


# --- the contract every registered benchmark loader keeps ---------------------------------------------------------


def _shapes_world(tmp: Path) -> Path:
    from cirlab.data.shapes import CircoConfig, CirrConfig, CorpusConfig, ShapesConfig, SyntheticConfig, build_world

    small = ShapesConfig(
        cirr=CirrConfig(train_queries=30, val_queries=12, test_queries=24, extra_gallery=10),
        circo=CircoConfig(val_queries=8, test_queries=16, extra_gallery=20),
        corpus=CorpusConfig(images=20),
        synthetic=SyntheticConfig(triplets=10),
    )
    return build_world(small, tmp / "world").root


# name -> (the fixture's benchmark root from a temporary directory, whether the root holds the images too, the
# splits to load, and the options each needs); the real annotation files are read too when shared/data has them.
LOADER_FIXTURES = {
    "cirr": (lambda tmp: _copy_fixture(tmp, "cirr"), False, ["val", "test1", "train"], {}),
    "fashioniq": (lambda tmp: _copy_fixture(tmp, "fashioniq"), False, ["val", "test"], {"category": "dress"}),
    "circo": (lambda tmp: _copy_fixture(tmp, "circo"), False, ["val", "test"], {}),
    "shapes": (_shapes_world, True, ["val", "test1", "circo-val", "circo-test"], {"check_images": True}),
}


def test_every_registered_benchmark_has_a_fixture():
    assert set(LOADER_FIXTURES) == set(BENCHMARKS.list())


def _check_split(split, name: str, split_name: str) -> None:
    """What the evaluator and the submission writers rely on, whatever the benchmark. A gallery may be empty only
    when its image list is absent (CIRCO's COCO list is a separate download): then the names are not checked."""
    assert split.dataset.startswith(name) and split_name.endswith(split.split) and split.queries, split_name
    assert len({q.qid for q in split.queries}) == len(split.queries), "query ids are unique"
    assert len(set(split.gallery)) == len(split.gallery), "gallery names are unique"
    gallery = set(split.gallery)
    for q in split.queries:
        assert isinstance(q.text, str) and q.texts and all(isinstance(t, str) for t in q.texts), q.qid
        assert (len(q.targets) > 0) == split.protocol.has_ground_truth, q.qid
        if gallery:
            assert q.reference in gallery or split.dataset == "fashioniq", q.qid
            assert set(q.targets) <= gallery and (q.subset is None or set(q.subset) <= gallery), q.qid
    assert split.protocol.recall_ks or split.protocol.map_ks
    assert split.name in split.describe()


@pytest.mark.parametrize("name", sorted(LOADER_FIXTURES))
def test_every_benchmark_loader_keeps_the_contract(name, tmp_path):
    make_root, holds_images, splits, options = LOADER_FIXTURES[name]
    root = make_root(tmp_path)
    loader = BENCHMARKS.get(name)
    for split_name in splits:
        split = loader(root, None, split_name, **options)
        _check_split(split, name, split_name)
        assert (split.image_root is not None) == holds_images
        assert load_splits(name, root, None, split_name, **options)[0].queries == split.queries
        if not holds_images:
            with_images = loader(root, tmp_path / "images", split_name, **options)
            assert with_images.image_root == tmp_path / "images" and with_images.queries == split.queries


REAL_SPLITS = {"cirr": ["val", "test1"], "fashioniq": ["val", "test"], "circo": ["val", "test"]}


@pytest.mark.parametrize("name", sorted(REAL_SPLITS))
def test_every_benchmark_loader_keeps_the_contract_on_the_real_annotations(name, shared_data, tmp_path):
    for split_name in REAL_SPLITS[name]:
        for split in load_splits(name, shared_data / name, None, split_name):
            _check_split(split, name, split_name)
