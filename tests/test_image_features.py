"""The one image-feature path (``cirlab.features.images``): cache hits and misses, the namespaces every caller shares,
the same features as the bare model, unreadable images, fine-tuned encoders, and split features computed once."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from cirlab.data.benchmark import CIRQuery, CIRSplit, Protocol
from cirlab.data.images import ImageReadError, load_image
from cirlab.features.cache import FeatureCache, encoder_key
from cirlab.features.images import (
    ArrayImages,
    FileImages,
    ImageEncoder,
    image_features,
    split_features,
    split_image_names,
)
from cirlab.methods import create_method
from imagefiles import make_gallery


@pytest.fixture()
def files(tmp_path) -> list[Path]:
    return make_gallery(tmp_path / "images", 10)


def bare(backbone, files: list[Path]):
    """The bare model's features of ``files``, computed without the cache."""
    with torch.no_grad():
        return backbone.encode_image(backbone.preprocess([load_image(f) for f in files]))


class Counting:
    """A backbone whose ``encode_image`` counts the images it encodes."""

    def __init__(self, backbone) -> None:
        self.backbone = backbone
        self.encoded = 0
        self.encoder = ImageEncoder(backbone, self.encode, ImageEncoder.of_backbone(backbone).namespace)

    def encode(self, pixels: torch.Tensor):
        self.encoded += len(pixels)
        return self.backbone.encode_image(pixels)


def test_a_miss_encodes_and_a_hit_reads_the_same_features_back(files, tmp_path, tiny_backbone):
    cache, counting = FeatureCache(tmp_path / "cache"), Counting(tiny_backbone)
    first = image_features(counting.encoder, FileImages(files), cache, tokens=True, batch_size=4)
    assert counting.encoded == 2 * len(files) and first.n_encoded == len(files)  # one pass per stored part
    again = image_features(counting.encoder, FileImages(files), cache, tokens=True)
    assert counting.encoded == 2 * len(files) and again.n_encoded == 0
    expected = bare(tiny_backbone, files)
    for feats in (first, again):
        assert feats.positions.tolist() == list(range(len(files))) and not feats.failed
        torch.testing.assert_close(feats.tensor("embeds"), expected.embeds.float(), atol=1e-5, rtol=1e-5)
        assert feats.tensor("tokens").dtype == torch.float16
        torch.testing.assert_close(feats.tensor("tokens").float(), expected.tokens.half().float())
    part = image_features(counting.encoder, FileImages(files[3:6]), cache)  # a subset: all hits
    assert counting.encoded == 2 * len(files)
    torch.testing.assert_close(part.tensor(), first.tensor()[3:6])


def test_the_namespaces_are_the_ones_the_cache_already_holds(tiny_backbone, tmp_path, files):
    # Caches written before the one path existed stay valid: a frozen backbone keeps its namespaces.
    encoder = ImageEncoder.of_backbone(tiny_backbone)
    transform = tiny_backbone.image_transform.identity()
    for part in ("embeds", "tokens"):
        assert encoder.namespace(part) == encoder_key(tiny_backbone.identity(), part, transform)
    cache = FeatureCache(tmp_path / "cache")
    image_features(encoder, FileImages(files), cache)
    assert cache.list_encoder_keys() == [encoder.namespace("embeds")]


def test_without_a_cache_the_same_features_are_encoded_afresh(files, tmp_path, tiny_backbone):
    encoder = ImageEncoder.of_backbone(tiny_backbone)
    cached = image_features(encoder, FileImages(files), FeatureCache(tmp_path / "cache"), tokens=True, batch_size=3)
    fresh = image_features(encoder, FileImages(files), None, tokens=True, batch_size=3)
    assert fresh.n_encoded == len(files) and not (tmp_path / "none").exists()
    torch.testing.assert_close(fresh.tensor("embeds"), cached.tensor("embeds"))
    torch.testing.assert_close(fresh.tensor("tokens"), cached.tensor("tokens"))


def test_threads_decoding_ahead_give_the_same_features(files, tmp_path, tiny_backbone):
    encoder = ImageEncoder.of_backbone(tiny_backbone)
    inline = image_features(encoder, FileImages(files), None, batch_size=3)
    threaded = image_features(encoder, FileImages(files, decode_threads=3), None, batch_size=3)
    torch.testing.assert_close(threaded.tensor(), inline.tensor())


@pytest.mark.parametrize("cached", [True, False])
def test_unreadable_images_are_skipped_or_raised(files, tmp_path, tiny_backbone, cached):
    broken = files[0].parent / "broken.jpg"
    broken.write_bytes(b"not an image")
    missing = files[0].parent / "missing.jpg"
    request = [files[0], broken, files[1], missing, files[2]]
    cache = FeatureCache(tmp_path / "cache") if cached else None
    encoder = ImageEncoder.of_backbone(tiny_backbone)
    feats = image_features(encoder, FileImages(request), cache, on_error="skip", batch_size=2)
    assert feats.positions.tolist() == [0, 2, 4] and set(feats.failed) == {1, 3}
    assert "broken.jpg" in feats.failed[1] and "missing.jpg" in feats.failed[3]
    torch.testing.assert_close(feats.tensor(), bare(tiny_backbone, [files[0], files[1], files[2]]).embeds.float())
    assert feats.table([p.name for p in request]).names == [files[0].name, files[1].name, files[2].name]
    with pytest.raises(ImageReadError, match=r"broken\.jpg"):
        image_features(encoder, FileImages(request[:2]), cache)
    with pytest.raises((FileNotFoundError, ImageReadError), match=r"missing\.jpg"):
        image_features(encoder, FileImages(request[2:4]), cache)


def test_in_memory_images_are_keyed_by_their_pixels(tmp_path, tiny_backbone):
    images = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)  # (N, H, W, 3)
    cache, counting = FeatureCache(tmp_path / "cache"), Counting(tiny_backbone)
    first = image_features(counting.encoder, ArrayImages(images), cache)
    changed = images.copy()
    changed[2] = 255 - changed[2]
    again = image_features(counting.encoder, ArrayImages(changed), cache)
    assert counting.encoded == 7 and again.n_encoded == 1  # only the changed image is new
    torch.testing.assert_close(again.tensor()[[0, 1, 3, 4, 5]], first.tensor()[[0, 1, 3, 4, 5]])
    with torch.no_grad():
        expected = tiny_backbone.encode_image(tiny_backbone.image_transform.from_uint8(images)).embeds
    torch.testing.assert_close(first.tensor(), expected.float(), atol=1e-5, rtol=1e-5)


def test_a_fine_tuned_image_encoder_never_reads_the_frozen_backbones_features(files, tmp_path, tiny_backbone):
    cache = FeatureCache(tmp_path / "cache")
    method = create_method("image-only", copy.deepcopy(tiny_backbone))
    frozen = ImageEncoder.of_method(method)
    assert frozen.namespace("embeds") == ImageEncoder.of_backbone(tiny_backbone).namespace("embeds")
    for p in method.backbone.image_encoder_parameters():
        p.requires_grad_(True)
    assert ImageEncoder.of_method(method).namespace is None  # weights without an identity: nothing cached
    image_features(ImageEncoder.of_method(method), FileImages(files), cache)
    assert cache.list_encoder_keys() == []
    tuned = ImageEncoder.of_method(method, weights_id="sha256:abc")
    assert tuned.namespace("embeds") != frozen.namespace("embeds")
    assert tuned.namespace("embeds") != ImageEncoder.of_method(method, weights_id="sha256:def").namespace("embeds")


def test_split_features_cover_gallery_and_references_once(files, tmp_path, tiny_backbone):
    root = files[0].parent.parent if files[0].parent.name == "sub" else files[0].parent
    names = [p.relative_to(root).as_posix() for p in files]
    queries = [
        CIRQuery("q0", names[8], "make it red", ["make it red"], [names[0]]),
        CIRQuery("q1", names[0], "bigger", ["bigger"], [names[1]]),
    ]
    split = CIRSplit(
        "cirr", "val", None, queries, names[:6], Protocol("cirr", True, True, (1,)), root,
        image_templates=("{name}",),
    )  # fmt: skip
    assert split_image_names(split) == [*names[:6], names[8]]
    cache = FeatureCache(tmp_path / "cache")
    table = split_features(tiny_backbone, split, cache, tokens=True)
    assert table.names == [*names[:6], names[8]] and table.tokens is not None
    expected = bare(tiny_backbone, [files[i] for i in [0, 1, 2, 3, 4, 5, 8]]).embeds.float()
    torch.testing.assert_close(table.embeds, expected, atol=1e-5, rtol=1e-5)
    method = create_method("image-only", tiny_backbone)
    through_method = split_features(method, split, cache)
    assert through_method.tokens is None
    torch.testing.assert_close(through_method.embeds, table.embeds)
