"""Gallery index: build, search, incremental rebuilds, unreadable files, approximate search, crash safety, CLI."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cirlab
import cirlab.features.images
import cirlab.index.encode
from cirlab.backbones import create_backbone
from cirlab.cli.main import main
from cirlab.data.images import ImageReadError, load_image
from cirlab.features.cache import FeatureCache
from cirlab.features.hashing import hash_files
from cirlab.index import AnnConfig, IndexFormatError, build_index, find_images, load_index
from cirlab.index.ann import ann_recall_at_k, build_ann, sample_queries
from cirlab.index.store import INDEX_FILE
from imagefiles import draw_image, make_gallery


def quiet(_message: str) -> None:
    """Swallows build messages."""


def build(images: Path, out: Path, cache: Path, **kwargs):
    kwargs.setdefault("backbone", "tiny")
    return build_index(images, out, cache=FeatureCache(cache), log=quiet, **kwargs)


@pytest.fixture()
def gallery(tmp_path) -> Path:
    make_gallery(tmp_path / "images", 24)
    return tmp_path / "images"


def direct_embeddings(backbone, files: list[Path]) -> np.ndarray:
    """The bare model's normalised image embeddings, computed without the index or the cache."""
    with torch.no_grad():
        embeds = backbone.encode_image(backbone.preprocess([load_image(f) for f in files])).embeds
    return F.normalize(embeds.float(), dim=-1).numpy()


def test_build_matches_the_bare_model_and_search_ranks_by_score(gallery, tmp_path, tiny_backbone):
    report = build(gallery, tmp_path / "index", tmp_path / "cache")
    assert report.count == report.encoded == 24 and not report.unreadable
    index = cirlab.load_index(tmp_path / "index")
    assert index.paths == find_images(gallery) and len(index) == 24
    expected = direct_embeddings(tiny_backbone, [gallery / p for p in index.paths])
    np.testing.assert_allclose(np.asarray(index.embeddings), expected, atol=1e-5)

    query = index.compose(gallery / "img001.jpg", "a red circle")
    hits = index.search(query, k=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    scores = np.asarray(index.embeddings) @ query.vector
    expected_ids = [i for i in np.argsort(-scores, kind="stable") if i not in query.exclude][:5]
    assert [h.id for h in hits] == expected_ids
    assert [h.score for h in hits] == pytest.approx([float(scores[i]) for i in expected_ids], abs=1e-5)
    assert all(h.file == gallery / h.path for h in hits)


def test_a_multimodal_llm_backbone_builds_an_index(gallery, tmp_path, tiny_mllm_dir):
    # The mllm backbone has no logit_scale; the build must take the device from the backbone protocol's ``device``.
    spec = f"mllm:{tiny_mllm_dir}"
    report = build(gallery, tmp_path / "index", tmp_path / "cache", backbone=spec, method="image-only")
    assert report.count == report.encoded == 24 and not report.unreadable
    index = cirlab.load_index(tmp_path / "index")
    backbone = create_backbone(spec).freeze()
    expected = direct_embeddings(backbone, [gallery / p for p in index.paths])
    np.testing.assert_allclose(np.asarray(index.embeddings), expected, atol=1e-5)


def test_a_gallery_image_is_the_reference_by_its_indexed_path(gallery, tmp_path):
    build(gallery, tmp_path / "index", tmp_path / "cache", method="image-only")
    index = load_index(tmp_path / "index")
    ref = index.paths[5]
    query = index.compose(ref, "ignored by image-only")  # relative to the gallery root, not the working directory
    assert query.exclude == [5]
    assert 5 not in [h.id for h in index.search(query, k=24)]
    top = index.search(query, k=1, exclude_reference=False)[0]
    assert top.id == 5 and top.score == pytest.approx(1.0, abs=1e-5)
    assert index.compose(5, "").vector.tolist() == pytest.approx(query.vector.tolist(), abs=1e-6)


def test_rebuild_encodes_only_new_or_changed_files_and_drops_removed_ones(gallery, tmp_path):
    out, cache = tmp_path / "index", tmp_path / "cache"
    build(gallery, out, cache)
    make_gallery(gallery, 2, start=100)  # two new files
    (gallery / "img004.png").unlink()  # one removed
    draw_image(gallery / "sub" / "img006.png", seed=999)  # one changed
    report = build(gallery, out, cache)
    assert (report.encoded, report.reused, report.removed, report.count) == (3, 22, 2, 25)
    index = load_index(out)
    assert "img004.png" not in index.paths and "img100.png" in index.paths
    again = build(gallery, out, cache)
    assert (again.encoded, again.reused, again.removed) == (0, 25, 0)
    fresh = build(gallery, tmp_path / "other-index", cache)  # a new index over cached content encodes nothing
    assert (fresh.encoded, fresh.from_cache) == (0, 25)
    np.testing.assert_array_equal(np.asarray(load_index(tmp_path / "other-index").embeddings), index.embeddings)


def test_a_different_model_embeds_everything_again(gallery, tmp_path):
    out, cache = tmp_path / "index", tmp_path / "cache"
    build(gallery, out, cache, method="sum")
    report = build(gallery, out, cache, method="text-only")
    assert report.reused == 0 and report.from_cache == 24  # same image encoder: raw features come from the cache
    assert load_index(out).method_name == "text-only"


def test_unreadable_files_are_listed_and_skipped(gallery, tmp_path, monkeypatch):
    (gallery / "empty.png").write_bytes(b"")
    (gallery / "notes.jpg").write_text("not an image")
    good = (gallery / "img001.jpg").read_bytes()
    (gallery / "truncated.jpg").write_bytes(good[: len(good) // 3])
    report = build(gallery, tmp_path / "index", tmp_path / "cache")
    assert set(report.unreadable) == {"empty.png", "notes.jpg", "truncated.jpg"}
    assert all("cannot read image" in why for why in report.unreadable.values())
    index = load_index(tmp_path / "index")
    assert len(index) == 24 and "notes.jpg" not in index.paths
    assert {u["path"] for u in index.manifest["unreadable"]} == set(report.unreadable)
    decoded = []
    load = cirlab.features.images.load_image
    monkeypatch.setattr(cirlab.features.images, "load_image", lambda p: decoded.append(p) or load(p))
    again = build(gallery, tmp_path / "index", tmp_path / "cache")  # unchanged bad files are not decoded again
    assert again.unreadable == report.unreadable and again.encoded == 0 and not decoded
    draw_image(gallery / "notes.jpg", seed=5)  # fixed: now it is an image
    fixed = build(gallery, tmp_path / "index", tmp_path / "cache")
    assert set(fixed.unreadable) == {"empty.png", "truncated.jpg"} and fixed.count == 25


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_reports_recall_and_agrees_with_exact(gallery, tmp_path, kind):
    build(gallery, tmp_path / "index", tmp_path / "cache", approximate=AnnConfig(kind=kind, k=10))
    index = load_index(tmp_path / "index")
    ann = index.manifest["approximate"]
    assert ann["kind"] == kind and ann["recall"] >= ann["target"] and ann["queries"] > 0
    query = index.compose(index.paths[0], "add a blue square")
    approx, exact = index.search(query, k=10), index.search(query, k=10, exact=True)
    assert query.exclude and all(h.id not in query.exclude for h in approx)
    assert ann_recall_at_k(np.array([[h.score for h in approx]]), np.array([[h.score for h in exact]]), 10) == 1.0


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_search_tunes_its_knob_to_the_target_recall(kind):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32)).astype(np.float32)
    x = centres[rng.integers(0, 40, 6000)] + 0.3 * rng.normal(size=(6000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index, report = build_ann(x, AnnConfig(kind=kind, k=50, target_recall=0.95, sample_queries=100, hnsw_m=16))
    assert report.recall >= 0.95 and report.tuning[-1]["recall"] == report.recall
    if kind == "ivf":
        assert report.params["nlist"] > 1 and report.params["nprobe"] <= report.params["nlist"]
    # The recall stored is what a fresh measurement sees.
    queries = sample_queries(x, 100, seed=0)
    exact = np.sort(queries @ x.T, axis=1)[:, ::-1][:, :50]
    assert ann_recall_at_k(index.search(queries, 50)[0], exact, 50) == pytest.approx(report.recall)


def test_a_trained_checkpoint_directory_is_a_method(gallery, tmp_path, tiny_backbone):
    ckpt = tmp_path / "ckpt"
    cirlab.create_method("sum", tiny_backbone).save(ckpt)
    build(gallery, tmp_path / "index", tmp_path / "cache", backbone=None, method=str(ckpt))
    index = load_index(tmp_path / "index")
    assert index.manifest["model"]["checkpoint"] == str(ckpt.resolve())
    assert index.methods() == ["sum", "image-only", "text-only"]
    assert len(index.search(index.compose(index.paths[0], "make it green", method="text-only"), k=3)) == 3


def test_bad_inputs_get_clear_errors(gallery, tmp_path):
    with pytest.raises(IndexFormatError, match="index directory not found"):
        load_index(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs training"):
        build(gallery, tmp_path / "index", tmp_path / "cache", method="pic2word")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        build(gallery, tmp_path / "index", tmp_path / "cache", method="nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        build(tmp_path / "empty", tmp_path / "index", tmp_path / "cache")
    build(gallery, tmp_path / "index", tmp_path / "cache")
    index = load_index(tmp_path / "index")
    with pytest.raises(ValueError, match="cannot query this index"):
        index.compose(index.paths[0], "x", method="pic2word")
    with pytest.raises(ImageReadError, match="not found"):
        index.compose(tmp_path / "missing.png", "x")
    (tmp_path / "index" / INDEX_FILE).write_text('{"format": "cirlab-gallery-index", "vers')
    with pytest.raises(IndexFormatError, match=r"index\.json: malformed JSON"):
        load_index(tmp_path / "index")


def _build_in_child(images: Path, out: Path, cache: Path) -> None:
    torch.set_num_threads(1)
    build(images, out, cache)


def test_sigkill_during_build_never_leaves_a_half_written_index(gallery, tmp_path, tiny_backbone):
    """Kills builds at random moments (and right as their files appear); every committed index must load whole."""
    out, cache = tmp_path / "index", tmp_path / "cache"
    extra = [p.relative_to(tmp_path / "extra") for p in make_gallery(tmp_path / "extra", 12, start=200)]
    every = tmp_path / "all"  # the union of both gallery contents, to know every image's true embedding
    make_gallery(every, 24)
    make_gallery(every, 12, start=200)
    names = find_images(every)
    truth = dict(zip(names, direct_embeddings(tiny_backbone, [every / p for p in names]), strict=True))
    ctx = multiprocessing.get_context("fork")
    t0 = time.perf_counter()
    _build_in_child(gallery, tmp_path / "timing", tmp_path / "timing-cache")
    duration = time.perf_counter() - t0
    rng = random.Random(0)
    kills = 0
    for trial in range(16):
        # Alternate the gallery between two contents so every build writes a new generation.
        for rel in extra[: 6 + trial % 6]:
            target = gallery / rel
            if target.exists():
                target.unlink()
            else:
                target.write_bytes((tmp_path / "extra" / rel).read_bytes())
        child = ctx.Process(target=_build_in_child, args=(gallery, out, cache))
        child.start()
        time.sleep(rng.uniform(0.0, 1.2 * duration))
        if child.exitcode is None:
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.join()
        if (out / INDEX_FILE).exists():
            index = load_index(out)
            assert len(index.paths) == len(index.embeddings) == index.manifest["count"]
            expected = np.stack([truth[p] for p in index.paths])
            np.testing.assert_allclose(np.asarray(index.embeddings), expected, atol=1e-5)
    assert kills >= 8, f"only {kills} of 16 builds were killed before finishing; the timing is off"
    build(gallery, out, cache)
    final = load_index(out)
    assert final.paths == find_images(gallery)
    np.testing.assert_allclose(np.asarray(final.embeddings), np.stack([truth[p] for p in final.paths]), atol=1e-5)
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    generations = [p.name for p in out.iterdir() if p.name.startswith("embeddings-")]
    assert not leftovers and len(generations) == 1


def test_cli_build_and_search(gallery, tmp_path, capsys):
    out, cache = tmp_path / "index", tmp_path / "cache"
    args = ["index", "build", str(gallery), "--out", str(out), "--backbone", "tiny", "--cache", str(cache)]
    assert main([*args, "--approximate", "hnsw"]) == 0
    printed = capsys.readouterr().out
    assert "indexed 24 images" in printed and "recall@24 vs exact search" in printed
    ref = str(gallery / "img001.jpg")
    assert main(["search", str(out), "--image", ref, "--text", "a red square", "-k", "3", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in payload["results"]] == [1, 2, 3] and payload["method"] == "sum"
    assert all(Path(r["file"]).is_file() and r["path"] != "img001.jpg" for r in payload["results"])
    assert main(["search", str(out), "--image", "img001.jpg", "--text", "red", "-k", "2"]) == 0
    assert "rank" in capsys.readouterr().out


def test_cli_without_a_backbone_uses_the_shipped_clip_or_says_what_to_pass(gallery, tmp_path, monkeypatch, capsys):
    import cirlab.backbones.shapes_clip as shapes_clip

    monkeypatch.chdir(tmp_path)  # no runs/shapes here
    assert main(["index", "build", str(gallery), "--out", str(tmp_path / "index")]) == 0
    assert "backbone: shapes-clip" in capsys.readouterr().out
    # An install without the shipped CLIP (and nothing built) gets told what to pass.
    monkeypatch.setattr(shapes_clip, "shipped_dir", lambda: tmp_path / "no-asset")
    assert main(["index", "build", str(gallery), "--out", str(tmp_path / "index2")]) != 0
    err = capsys.readouterr().err
    assert "--backbone hf-clip:" in err and "cirlab demo --quick" in err


def _build_with_timeout(images: Path, out: Path, cache: Path, seconds: float = 60.0):
    """Builds in a thread so that a build that hangs fails the test instead of hanging it."""
    import threading

    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(build(images, out, cache)), daemon=True)
    worker.start()
    worker.join(seconds)
    return outcome[0] if outcome else None


def test_special_files_and_links_out_of_the_folder_are_skipped_unopened(gallery, tmp_path):
    outside = tmp_path / "secret.png"
    draw_image(outside, seed=77)
    os.mkfifo(gallery / "pipe.png")
    (gallery / "zero.png").symlink_to("/dev/zero")
    (gallery / "escape.png").symlink_to(outside)
    (gallery / "alias.png").symlink_to(gallery / "img002.png")  # a link inside the folder is followed
    report = _build_with_timeout(gallery, tmp_path / "index", tmp_path / "cache")
    if report is None:
        with open(gallery / "pipe.png", "wb"):  # release a build blocked on the pipe
            pass
        pytest.fail("index build blocked on a named pipe or a device")
    assert set(report.unreadable) == {"pipe.png", "zero.png", "escape.png"}
    assert "a named pipe, not a regular file" in report.unreadable["pipe.png"]
    assert "a symbolic link to /dev/zero, outside the indexed folder" in report.unreadable["zero.png"]
    assert "outside the indexed folder" in report.unreadable["escape.png"]
    (device,) = hash_files(["/dev/zero"])  # a device reached some other way is not read either
    assert isinstance(device, OSError) and "/dev/zero: a character device, not a regular file" in str(device)
    assert "alias.png" in load_index(tmp_path / "index").paths and report.count == 25


def test_build_refuses_a_directory_that_is_not_an_index_and_deletes_nothing(gallery, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    mine = {"items-2024-01.json": "[]", "embeddings-0001.npy": "x", "ann-1.faiss": "y", "notes.txt": "z"}
    for name, text in mine.items():
        (out / name).write_text(text)
    args = ["index", "build", str(gallery), "--out", str(out), "--backbone", "tiny", "--cache", str(tmp_path / "c")]
    assert main(args) == 1
    assert "not empty and not a cirlab index" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in out.iterdir()} == mine

    index = tmp_path / "index"  # files a user drops into a real index that look like its own are kept too
    build(gallery, index, tmp_path / "cache")
    for name, text in mine.items():
        (index / name).write_text(text)
    make_gallery(gallery, 1, start=300)
    build(gallery, index, tmp_path / "cache")
    assert all((index / name).read_text() == text for name, text in mine.items())
    assert len(load_index(index)) == 25


def test_unreadable_reasons_belong_to_their_own_file(gallery, tmp_path):
    (gallery / "empty.jpg").write_bytes(b"")
    build(gallery, tmp_path / "index", tmp_path / "cache")
    (gallery / "empty.png").write_bytes(b"")  # the same (empty) bytes under another name
    report = build(gallery, tmp_path / "index", tmp_path / "cache")
    assert str(gallery / "empty.png") in report.unreadable["empty.png"]
    assert str(gallery / "empty.jpg") in report.unreadable["empty.jpg"]


def test_the_unreadable_file_report_cannot_be_forged_by_file_names(gallery, tmp_path, capsys):
    forged = "x.png\nskipped 0 unreadable file(s):\n  img001.jpg: fine.png"
    (gallery / forged).write_bytes(b"")
    args = ["index", "build", str(gallery), "--out", str(tmp_path / "i"), "--backbone", "tiny"]
    assert main([*args, "--cache", str(tmp_path / "c")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("skipped")] == ["skipped 1 unreadable file(s):"]
    assert not any(line.startswith("  img001.jpg") for line in lines)
    assert any(line.startswith("  x.png\\nskipped 0 unreadable") for line in lines)


def _slow_build_in_child(images: Path, out: Path, cache: Path) -> None:
    """A build whose model takes 0.3 s per batch of 4 (so the parent has over a second to interrupt it after the
    second batch, even on a busy machine), committing its encoding as it goes."""
    import cirlab.index.encode as encode

    # Ctrl-C must reach the build as Python's KeyboardInterrupt, whatever SIGINT handler the forked test process
    # inherited: in two whole-suite CI runs the SIGINT child ran to the end with exit code 0 (never when this file
    # runs alone), which points at a handler left by an earlier test.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(1)
    real = encode.encode_gallery_files

    def slow(method, *args, **kwargs):
        forward = method.encode_images

        def slow_forward(pixels):
            time.sleep(0.3)
            return forward(pixels)

        method.encode_images = slow_forward
        return real(method, *args, **kwargs)

    encode.encode_gallery_files = slow
    import cirlab.index.build as build_module

    build_module.encode_gallery_files = slow
    build_index(images, out, cache=FeatureCache(cache, commit_seconds=0.0), backbone="tiny", batch_size=4, log=quiet)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_an_interrupted_build_resumes_where_it_stopped(gallery, tmp_path, how):
    """Killed (or Ctrl-C'ed) part-way, a build of a gallery far smaller than a shard keeps what it encoded."""
    out, cache = tmp_path / "index", tmp_path / "cache"
    child = multiprocessing.get_context("fork").Process(target=_slow_build_in_child, args=(gallery, out, cache))
    child.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.exitcode is None:
        manifests = list(cache.glob("*/manifest.json"))
        if manifests and sum(s["rows"] for s in json.loads(manifests[0].read_text())["shards"]) >= 8:
            break
        time.sleep(0.02)
    os.kill(child.pid, how)
    child.join(60)
    assert child.exitcode != 0, "the build finished before it could be interrupted"
    committed = len(FeatureCache(cache).lookup(sorted(p for p in gallery.rglob("*") if p.is_file()), _key(cache)))
    assert 8 <= committed < 24
    report = build(gallery, out, cache)
    assert report.encoded == 24 - committed and report.from_cache == committed and report.count == 24


def _key(cache: Path) -> str:
    (manifest,) = cache.glob("*/manifest.json")
    return manifest.parent.name
