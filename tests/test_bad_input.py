"""Bad input gets a clear message naming the file or value, through the Python API and through ``cirlab``.

Images: corrupt, truncated, zero-byte, non-image, decompression bombs. Annotations and submissions: wrong JSON
schemas (and, property-based, arbitrary JSON). Texts: empty and far over the context length. Names: unknown methods
and backbones. Checkpoints: from another method, truncated, a resumable state of other parameters.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cirlab.cli.main import main
from cirlab.data.benchmark import AnnotationError, load_splits
from cirlab.data.circo import load_circo
from cirlab.data.cirr import load_cirr
from cirlab.data.fashioniq import load_fashioniq
from cirlab.data.images import ImageReadError, load_image
from cirlab.evaluation.submission import SubmissionError, check_submission, score_submission, submission_problems
from cirlab.methods import create_method, load_method
from cirlab.methods.base import load_weights

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"


# --- images ---------------------------------------------------------------------------------------------------------


def _png(width: int = 40, height: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG of a few dozen bytes whose header claims ``width x height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


BAD_IMAGES = {
    "zero-byte": (b"", "the file is empty"),
    "truncated": (_png()[:200], "truncated"),
    "not-an-image": (b"pairid,caption\n1,a dog\n", "cannot identify image file"),
    "corrupt": (_png()[:60] + bytes(range(256)) * 4, "cannot read image"),
    "bomb": (_bomb(20_000, 20_000), "decompression bomb"),
    "over-the-limit": (_bomb(10_000, 10_000), "10000 x 10000 = 100,000,000 pixels, over the limit"),
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_images_raise_an_error_naming_the_file(tmp_path, kind):
    data, message = BAD_IMAGES[kind]
    path = tmp_path / f"{kind}.png"
    path.write_bytes(data)
    with pytest.raises(ImageReadError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_a_custom_pixel_limit_is_applied_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_png(64, 64))
    assert load_image(path, max_pixels=64 * 64).size == (64, 64)
    with pytest.raises(ImageReadError, match="64 x 64 = 4,096 pixels, over the limit of 4,095"):
        load_image(path, max_pixels=64 * 64 - 1)


def _jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with orientation 6 ("rotate 90 clockwise to view") reads upright."""
    upright = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 32, 3), dtype=np.uint8))  # 32 x 48
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: 48 x 32, sideways
    (tmp_path / "phone.jpg").write_bytes(_jpeg_with_orientation(stored, 6))
    (tmp_path / "plain.jpg").write_bytes(_jpeg_with_orientation(upright, 1))
    read, plain = load_image(tmp_path / "phone.jpg"), load_image(tmp_path / "plain.jpg")
    assert read.size == plain.size == (32, 48)
    assert np.abs(np.asarray(read, np.int16) - np.asarray(plain, np.int16)).mean() < 8  # equal up to JPEG noise


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    grey = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520, mean 32760
    Image.fromarray(grey).save(tmp_path / "scan.png")
    pixels = np.asarray(load_image(tmp_path / "scan.png"), dtype=np.float64)
    assert pixels.shape == (64, 64, 3)
    assert pixels.mean() == pytest.approx(grey.mean() / 257, abs=1.0)  # convert("RGB") alone gave 254 (white)


def test_an_animation_is_read_as_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "green", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=40, loop=0)
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:], duration=40)  # APNG
    for name in ("anim.gif", "anim.png"):
        assert load_image(tmp_path / name).getpixel((8, 8)) == (255, 0, 0), name


def test_a_named_pipe_is_refused_without_blocking(tmp_path):
    import os
    import threading

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            load_image(fifo)
        except ImageReadError as err:
            outcome.append(err)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # opening the pipe for reading blocks until a writer comes: be that writer, then fail
        with open(fifo, "wb"):
            pass
        reader.join(10)
        pytest.fail("load_image blocked on a named pipe")
    assert outcome and "a named pipe, not a regular file" in str(outcome[0]) and str(fifo) in str(outcome[0])


def test_extreme_aspect_ratios_never_resize_to_a_huge_intermediate(monkeypatch):
    """A 1 x 40000 image: CLIP's rule would resize it to 224 x 8,960,000 before the crop (gigabytes, a minute)."""
    from cirlab.backbones.transforms import ImageTransform

    resize = Image.Image.resize
    largest = []

    def bounded_resize(self, size, *args, **kwargs):
        largest.append(size[0] * size[1])
        if size[0] * size[1] > 16 * 224 * 224:
            raise AssertionError(f"resize to {size}: the work is not bounded")
        return resize(self, size, *args, **kwargs)

    new = Image.new

    def bounded_new(mode, size, *args, **kwargs):
        if size[0] * size[1] > 16 * 224 * 224:
            raise AssertionError(f"a {size} canvas: target padding is not bounded")
        return new(mode, size, *args, **kwargs)

    strips = [
        Image.fromarray(np.tile(np.arange(w, dtype=np.uint8)[None, :, None], (h, 1, 3)))
        for w, h in [(1, 40_000), (40_000, 1), (7, 30_000), (224, 100_000)]
    ]
    monkeypatch.setattr(Image.Image, "resize", bounded_resize)
    monkeypatch.setattr(Image, "new", bounded_new)
    # Target padding (CLIP4Cir's and SEARLE's 1.25) would pad a 1 x 40000 strip to a 32000 x 40000 canvas.
    for transform in (ImageTransform(size=224, resize_to=224), ImageTransform(size=224, resize_to=224, pad_ratio=1.25)):
        for strip in strips:
            assert transform.to_array(strip).shape == (3, 224, 224)
    monkeypatch.undo()
    transform = ImageTransform(size=224, resize_to=224)
    # Ordinary shapes keep CLIP's exact path: resize the short side, then crop.
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8))
    expected = photo.resize((298, 224), Image.Resampling.BICUBIC).crop((37, 0, 261, 224))
    got = transform.to_array(photo)
    want = (np.asarray(expected, np.float32) / 255.0 - np.array(transform.mean, np.float32)) / np.array(
        transform.std, np.float32
    )
    np.testing.assert_allclose(got, want.transpose(2, 0, 1), atol=1e-6)


def test_a_long_strip_keeps_the_centre_crop_of_the_reference_rule():
    """Resampling only the crop's region gives what resizing everything and cropping gives (up to rounding)."""
    from cirlab.backbones.transforms import ImageTransform

    rng = np.random.default_rng(0)
    strip = Image.fromarray(rng.integers(0, 255, (3000, 20, 3), dtype=np.uint8))  # 20 x 3000
    transform = ImageTransform(size=32, resize_to=32)
    new_h = int(32 * 3000 / 20)
    top = (new_h - 32) // 2
    reference = strip.resize((32, new_h), Image.Resampling.BICUBIC).crop((0, top, 32, top + 32))
    want = (np.asarray(reference, np.float32) / 255.0 - np.array(transform.mean, np.float32)) / np.array(
        transform.std, np.float32
    )
    diff = np.abs(transform.to_array(strip) - want.transpose(2, 0, 1)) * np.array(transform.std)[:, None, None] * 255
    assert diff.mean() < 1.0 and diff.max() <= 32  # a fraction of one grey level on average, on pure noise


@pytest.fixture
def cirr_copy(tmp_path, monkeypatch):
    """A CIRR-format fixture copy with readable images, the tiny backbone and a private feature cache."""
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    annotations = tmp_path / "cirr"
    shutil.copytree(FIXTURES / "cirr", annotations)
    images = tmp_path / "images"
    (split,) = load_splits("cirr", annotations, images, "val")
    for i, name in enumerate(sorted(set(split.gallery) | {q.reference for q in split.queries})):
        path = split.image_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 40, 3), i * 9, dtype=np.uint8)).save(path)
    return annotations, images, split


def _eval(annotations: Path, images: Path, *extra: str) -> int:
    args = ["eval", "sum", "--dataset", "cirr", "--split", "val", "--annotations", str(annotations)]
    return main([*args, "--images", str(images), "--backbone", "tiny", *extra])


@pytest.mark.parametrize("kind", ["zero-byte", "truncated", "not-an-image", "bomb"])
def test_cirlab_eval_names_a_bad_image(cirr_copy, capsys, kind):
    annotations, images, split = cirr_copy
    victim = split.image_path(split.gallery[3])
    victim.write_bytes(BAD_IMAGES[kind][0])
    assert _eval(annotations, images) == 1
    err = capsys.readouterr().err
    assert f"error: {victim}: " in err and BAD_IMAGES[kind][1] in err
    assert "Traceback" not in err


# --- texts ----------------------------------------------------------------------------------------------------------


def test_empty_and_very_long_texts_are_truncated_not_fatal(tiny_backbone):
    long_text = " ".join(["a red square moves left of the blue circle"] * 400)  # thousands of tokens
    tokens = tiny_backbone.tokenize(["", long_text])
    assert tokens.input_ids.shape[1] == tiny_backbone.context_length
    for name in ("sum", "pic2word"):
        method = create_method(name, tiny_backbone).eval()
        reference = method.backbone.encode_image(torch.zeros(2, 3, 32, 32))
        with torch.no_grad():
            q = method.compose(reference, ["", long_text])
        assert q.shape == (2, tiny_backbone.embed_dim) and torch.isfinite(q).all()
        torch.testing.assert_close(q.norm(dim=-1), torch.ones(2))


def test_cirlab_eval_accepts_empty_and_very_long_captions(cirr_copy):
    annotations, images, _split = cirr_copy
    path = annotations / "captions" / "cap.rc2.val.json"
    entries = json.loads(path.read_text())
    entries[0]["caption"] = ""
    entries[1]["caption"] = "make it bigger and " * 2000
    path.write_text(json.dumps(entries))
    with pytest.warns(UserWarning, match="empty"):
        assert _eval(annotations, images) == 0


# --- annotation and submission schemas ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e[0].pop("reference"), r"cap\.rc2\.val\.json: .*missing key 'reference'"),
        (lambda e: e[1].update(pairid="seven"), r"cap\.rc2\.val\.json: .*key 'pairid' should be int"),
        (lambda e: e[2].update(target_hard="no-such-image"), r"cap\.rc2\.val\.json: .*no-such-image"),
    ],
)
def test_cirlab_eval_names_the_annotation_file_and_entry(cirr_copy, capsys, mutate, message):
    annotations, images, _split = cirr_copy
    path = annotations / "captions" / "cap.rc2.val.json"
    entries = json.loads(path.read_text())
    mutate(entries)
    path.write_text(json.dumps(entries))
    assert _eval(annotations, images) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_truncated_annotation_json_names_line_and_column(cirr_copy, capsys):
    annotations, images, _split = cirr_copy
    path = annotations / "captions" / "cap.rc2.val.json"
    path.write_text(path.read_text()[:150])
    assert _eval(annotations, images) == 1
    assert f"error: {path}: malformed JSON at line" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2, 3]", "the top level must be a JSON object, got list"),
        ('{"version": "rc2", "metric": "recall"', "malformed JSON"),
        ("", "malformed JSON"),
        ("null", "the top level must be a JSON object, got NoneType"),  # was reported valid; found by hypothesis
    ],
)
def test_check_submission_reports_a_wrong_file(tmp_path, capsys, content, message):
    path = tmp_path / "sub.json"
    path.write_text(content)
    args = ["check-submission", str(path), "--dataset", "cirr", "--split", "test1"]
    assert main([*args, "--annotations", str(FIXTURES / "cirr")]) == 1
    captured = capsys.readouterr()
    assert message in captured.out and f"{path}: INVALID" in captured.err


def test_check_submission_refuses_duplicate_keys(tmp_path, capsys):
    """JSON objects that name a key twice mean different things to different parsers (Python keeps the last)."""
    from cirlab.evaluation.submission import write_cirr_submission

    split = load_cirr(FIXTURES / "cirr", None, "val")
    rng = np.random.default_rng(0)
    queries, gallery = rng.random((len(split.queries), 4)), rng.random((len(split.gallery), 4))
    path = write_cirr_submission(split, queries, gallery, tmp_path)["recall"]
    first = str(split.queries[0].qid)
    ranking = json.loads(path.read_text())[first]
    path.write_text(path.read_text().replace("{", "{" + json.dumps(first) + ": " + json.dumps(ranking[::-1]) + ", ", 1))
    args = ["check-submission", str(path), "--dataset", "cirr", "--split", "val"]
    assert main([*args, "--annotations", str(FIXTURES / "cirr")]) == 1
    captured = capsys.readouterr()
    assert f"duplicate key {first!r}" in captured.out and f"{path}: INVALID" in captured.err


# --- names ----------------------------------------------------------------------------------------------------------


def test_unknown_names_are_listed_with_the_known_ones(tiny_backbone, capsys):
    import cirlab

    with pytest.raises(KeyError, match=r"unknown method 'no-such-method'; registered: .*pic2word"):
        create_method("no-such-method", tiny_backbone)
    with pytest.raises(KeyError, match=r"unknown backbone 'no-such-backbone'; registered: .*tiny"):
        cirlab.create_backbone("no-such-backbone")
    assert main(["train", "no-such-method"]) == 1
    assert "unknown method 'no-such-method'; registered:" in capsys.readouterr().err


def test_cirlab_eval_names_an_unknown_backbone(cirr_copy, capsys):
    annotations, images, _split = cirr_copy
    args = ["eval", "sum", "--dataset", "cirr", "--split", "val", "--annotations", str(annotations)]
    assert main([*args, "--images", str(images), "--backbone", "no-such-backbone"]) == 1
    assert "unknown backbone 'no-such-backbone'" in capsys.readouterr().err


@pytest.fixture
def no_world(monkeypatch):
    """Building the Shapes world takes minutes: the checks below must refuse before they get there."""
    import cirlab.experiments.shapes_env

    def refuse(*args, **kwargs):
        raise AssertionError("the Shapes world was being built")

    monkeypatch.setattr(cirlab.experiments.shapes_env, "prepare_shapes", refuse)


def test_cirlab_eval_on_shapes_names_an_unknown_backbone(no_world, tmp_path, capsys):
    assert main(["eval", "sum", "--dataset", "shapes", "--backbone", "nosuch:x", "--root", str(tmp_path)]) == 1
    assert "unknown backbone 'nosuch'" in capsys.readouterr().err
    assert main(["eval", "sum", "--dataset", "shapes", "--backbone", "tiny", "--root", str(tmp_path)]) == 2
    assert "Shapes world is evaluated with its own CLIP" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("mapping.batch_size=0", "mapping.batch_size=0 (must be at least 1)"),
        ("mapping.steps=-5", "mapping.steps=-5 (must be at least 1)"),
        ("mapping.warmup=2", "mapping.warmup=2.0 (must be in [0, 1])"),
        ("mapping.lr=-1", "mapping.lr=-1.0 (must not be negative)"),
    ],
)
def test_train_refuses_unusable_loop_settings(no_world, tmp_path, capsys, setting, message):
    args = ["train", "pic2word", "--set", setting, "--root", str(tmp_path), "--out", str(tmp_path / "run")]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_with_an_unknown_stage_leaves_the_checkpoint_alone(no_world, tiny_backbone, tmp_path, capsys):
    ckpt = tmp_path / "p2w"
    create_method("pic2word", tiny_backbone).save(ckpt)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert main(["train", "pic2word", "--stage", "nosuch", "--root", str(tmp_path), "--out", str(ckpt)]) == 2
    assert "pic2word has no stage 'nosuch'; its stages: mapping" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def test_a_second_training_into_the_same_directory_is_refused(no_world, tmp_path, capsys):
    from cirlab.cli.train import TRAIN_LOCK
    from cirlab.io import file_lock

    out = tmp_path / "run"
    with file_lock(out / TRAIN_LOCK):  # a first run is writing there
        assert main(["train", "pic2word", "--root", str(tmp_path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"holds this lock (training into {out})" in err


# --- checkpoints ------------------------------------------------------------------------------------------------------


@pytest.fixture
def two_checkpoints(tmp_path, tiny_backbone):
    """Saved Pic2Word and SEARLE checkpoints (random weights) on the tiny backbone."""
    dirs = {}
    for name in ("pic2word", "searle"):
        dirs[name] = tmp_path / name
        create_method(name, copy.deepcopy(tiny_backbone)).save(dirs[name])
    return dirs


def test_weights_of_another_method_are_refused_by_name(two_checkpoints, tiny_backbone):
    searle = create_method("searle", tiny_backbone)
    with pytest.raises(ValueError, match=r"pic2word: a checkpoint of method 'pic2word', not of 'searle'"):
        load_weights(searle, two_checkpoints["pic2word"])
    mixed = two_checkpoints["pic2word"]
    shutil.copy(two_checkpoints["searle"] / "model.safetensors", mixed / "model.safetensors")
    # Pic2Word's and SEARLE's mappers share tensor names; the shapes tell them apart.
    with pytest.raises(ValueError, match=r"model\.safetensors: (missing tensors|tensors whose shapes do not fit)"):
        load_method(mixed, backbone=tiny_backbone)


def test_cirlab_eval_names_a_truncated_checkpoint(two_checkpoints, cirr_copy, capsys):
    annotations, images, _split = cirr_copy
    weights = two_checkpoints["pic2word"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    args = ["eval", "--checkpoint", str(two_checkpoints["pic2word"]), "--dataset", "cirr", "--split", "val"]
    assert main([*args, "--annotations", str(annotations), "--images", str(images)]) == 1
    err = capsys.readouterr().err
    assert f"error: {weights}: cannot read weights" in err and "Traceback" not in err


def test_resuming_from_another_models_training_state_is_refused(tmp_path):
    from cirlab.training.loop import TrainConfig, train

    cfg = TrainConfig(steps=2, progress=False, checkpoint_every=1)

    def run(module: torch.nn.Module) -> None:
        x = torch.ones(4, 3)
        train(module, list(module.parameters()), lambda s, m: x, lambda b: {"loss": module(b).sum()}, cfg, tmp_path)

    run(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"trainer_state\.pt: this checkpoint was written for other parameters"):
        run(torch.nn.Sequential(torch.nn.Linear(3, 2)))
    with pytest.raises(ValueError, match=r"different shapes \['bias', 'weight'\]"):
        run(torch.nn.Linear(3, 1))
    (tmp_path / "trainer_state.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match=r"trainer_state\.pt: cannot read this training checkpoint"):
        run(torch.nn.Linear(3, 2))


# --- property-based: arbitrary JSON into the loaders and the submission checker -----------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)
KEYS = st.sampled_from(
    [
        "pairid",
        "reference",
        "target_hard",
        "caption",
        "img_set",
        "members",
        "candidate",
        "target",
        "captions",
        "id",
        "reference_img_id",
        "target_img_id",
        "relative_caption",
        "gt_img_ids",
        "images",
        "file_name",
        "shared_concept",
    ]
)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
COCO_INFO = "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json"


def _fashioniq(root: Path):
    return load_fashioniq(root, None, "val", category="dress")


def _cirr(root: Path):
    return load_cirr(root, None, "val")


def _circo(root: Path):
    return load_circo(root, None, "val")


LOADERS = {
    "cirr": ("captions/cap.rc2.val.json", _cirr),
    "cirr-split": ("image_splits/split.rc2.val.json", _cirr),
    "fashioniq": ("captions/cap.dress.val.json", _fashioniq),
    "fashioniq-split": ("image_splits/split.dress.val.json", _fashioniq),
    "circo": ("annotations/val.json", _circo),
    "circo-images": (COCO_INFO, _circo),
}


def _mutated(original: object, draw_value: object, path: list[object]) -> object:
    """``original`` with the value at ``path`` (indices/keys, wrapped around) replaced, or the whole of it."""
    if not path or not isinstance(original, (list, dict)) or not original:
        return draw_value
    out = copy.deepcopy(original)
    step, rest = path[0], path[1:]
    index = step if isinstance(step, int) else len(step)  # stable across runs, unlike hash()
    if isinstance(out, list):
        out[index % len(out)] = _mutated(out[index % len(out)], draw_value, rest)
    else:
        key = step if step in out else sorted(out)[index % len(out)]
        out[key] = _mutated(out[key], draw_value, rest)
    return out


@pytest.mark.parametrize("which", sorted(LOADERS))
@SETTINGS
@given(value=JSON, path=st.lists(st.integers(0, 50) | KEYS, max_size=4), whole=st.booleans())
def test_loaders_on_arbitrary_json_return_a_split_or_an_annotation_error(tmp_path_factory, which, value, path, whole):
    root = tmp_path_factory.mktemp("ann")
    family = which.split("-")[0]
    shutil.copytree(FIXTURES / family, root, dirs_exist_ok=True)
    relative, load = LOADERS[which]
    target = root / relative
    original = json.loads(target.read_text())
    target.write_text(json.dumps(value if whole else _mutated(original, value, path)))
    try:
        split = load(root)
    except AnnotationError as err:
        assert str(target) in str(err) or str(root) in str(err)
    else:
        assert split.queries is not None and isinstance(split.gallery, list)


@SETTINGS
@given(value=JSON, path=st.lists(st.integers(0, 50) | KEYS, max_size=3), whole=st.booleans())
def test_submission_checker_on_arbitrary_json_lists_problems_and_never_crashes(tmp_path_factory, value, path, whole):
    root = tmp_path_factory.mktemp("sub")
    (split,) = load_splits("cirr", FIXTURES / "cirr", None, "val")
    valid = {"version": "rc2", "metric": "recall", **{q.qid: split.gallery[:10] for q in split.queries}}
    obj = value if whole else _mutated(valid, value, path)
    problems = submission_problems(obj, split)
    assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
    file = root / "sub.json"
    file.write_text(json.dumps(obj))
    assert check_submission(file, "cirr", "val", FIXTURES / "cirr") == problems
    try:
        score_submission([file], "cirr", "val", FIXTURES / "cirr")
    except SubmissionError as err:
        assert err.problems
