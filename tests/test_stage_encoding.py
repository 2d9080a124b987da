"""How often a training stage decodes and encodes its images: once per image where the encoder is frozen in that
stage, at every read where it trains; and the cheaper paths give the same numbers as the plain ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cirlab.features.images as feature_images
from cirlab.data.cirr import load_cirr
from cirlab.features.table import FeatureTable
from cirlab.methods import create_method
from cirlab.modules.text import length_grouped_embeds
from cirlab.training.data import PixelTable, Triplet
from cirlab.training.run import fit
from cirlab.training.run_config import load_run_config
from cirlab.training.sources import StageData, file_pixels

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"


def _pixels(backbone, n: int, seed: int) -> torch.Tensor:
    size = backbone.image_transform.size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class _CountingSource:
    """The parts of a training source ``fit`` reads, serving pixels of random images and counting every image the
    method encodes for training (``reads``) and every validation fetch (``fetches``)."""

    def __init__(self, backbone) -> None:
        self.val = load_cirr(FIXTURES / "cirr", None, "val")
        self.val_names = list(dict.fromkeys([*self.val.gallery, *(q.reference for q in self.val.queries)]))
        self.val_pixels = _pixels(backbone, len(self.val_names), seed=2)
        self.names = [f"img{i}" for i in range(12)]
        self.train_pixels = _pixels(backbone, len(self.names), seed=3)
        self.reads: list[int] = []
        self.fetches = 0

    def split(self, name: str):
        return self.val

    def _read(self, rows: torch.Tensor) -> torch.Tensor:
        self.reads.append(len(rows))
        return self.train_pixels[rows]

    def stage_data(self, request, synthetic=None) -> StageData:
        assert request.encode is not None  # the combiner's stage 1 fine-tunes the image encoder
        triplets = [Triplet(f"img{i}", "make it red", f"img{(i + 1) % 12}") for i in range(12)]
        return StageData(images=PixelTable(self.names, self._read, request.encode), triplets=triplets)

    def features_for(self, method, name: str) -> FeatureTable:
        self.fetches += 1
        with torch.no_grad():
            feats = method.encode_images(self.val_pixels)
        return FeatureTable(self.val_names, feats.embeds)


def test_a_stage_that_freezes_a_fine_tuned_encoder_encodes_each_image_once(tiny_backbone, tmp_path):
    steps, batch = 3, 4
    overrides = [f"{s}.{k}={v}" for s in ("finetune", "combiner") for k, v in (("steps", steps), ("batch_size", batch))]
    overrides += ["finetune.eval_every=1", "combiner.eval_every=1"]
    run_cfg = load_run_config("combiner", None, overrides)
    method = create_method("combiner", tiny_backbone, run_cfg.method)
    source = _CountingSource(tiny_backbone)

    fit(method, source, run_cfg, tmp_path / "finetune", stages=["finetune"], progress=False)
    # Stage 1 trains the image encoder: every batch reads its references and targets, every evaluation
    # re-encodes the validation images.
    assert source.reads == [batch, batch] * steps and source.fetches == steps
    assert not method.image_encoder_frozen

    source.reads, source.fetches = [], 0
    method.prepare_stage("combiner")
    assert not method.image_encoder_training and not method.image_encoder_frozen
    fit(method, source, run_cfg, tmp_path / "finetune", stages=["combiner"], progress=False)
    # The Combiner stage leaves the fine-tuned encoder frozen: each training image once, the validation split once.
    assert sum(source.reads) == len(source.names) and source.fetches == 1


def test_encoded_once_equals_encoding_at_every_read_and_declines_when_dearer(tiny_backbone):
    pixels = _pixels(tiny_backbone, 10, seed=0)
    table = PixelTable([f"i{k}" for k in range(10)], lambda rows: pixels[rows], tiny_backbone.encode_image)
    once = table.encoded_once(reads=100, batch_size=4)
    assert isinstance(once, FeatureTable) and once.names == table.names
    rows = torch.tensor([7, 0, 3])
    with torch.no_grad():
        plain = table.gather(rows)
    torch.testing.assert_close(once.gather(rows).embeds, plain.embeds)
    torch.testing.assert_close(once.gather(rows).tokens, plain.tokens)
    assert table.encoded_once(reads=9) is table  # fewer reads than images: encoding everything costs more
    assert table.encoded_once(reads=100, max_bytes=100) is table  # over the memory bound


def test_file_pixels_decode_each_image_once_and_match_preprocessing(tiny_backbone, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    paths = []
    for k, shape in enumerate([(40, 40), (30, 50), (70, 20)]):
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(paths[-1])
    decoded: list[str] = []
    load = feature_images.load_image
    monkeypatch.setattr(feature_images, "load_image", lambda p: decoded.append(Path(p).name) or load(p))
    pixels = file_pixels(tiny_backbone, paths)
    rows = torch.tensor([2, 0, 1, 0])
    expected = tiny_backbone.preprocess([Image.open(paths[i]) for i in rows.tolist()])
    assert torch.equal(pixels(rows), expected)
    assert torch.equal(pixels(rows), expected)
    assert sorted(decoded) == ["0.png", "1.png", "2.png"]  # each file decoded once, at its first read

    decoded.clear()
    uncached = file_pixels(tiny_backbone, paths, max_bytes=0)
    assert torch.equal(uncached(rows), expected) and len(decoded) == 4


def test_uint8_crops_finish_to_the_same_pixels_as_preprocessing(tiny_backbone):
    transform = tiny_backbone.image_transform
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(33, 90), (64, 64)]]
    crops = np.stack([transform.to_uint8(im) for im in images])
    assert crops.dtype == np.uint8 and crops.shape == (2, transform.size, transform.size, 3)
    assert torch.equal(transform.from_uint8(crops), transform(images))


@pytest.mark.parametrize("group", [1, 2, 3, 64])
def test_length_grouped_embeddings_are_the_plain_ones_in_order(tiny_backbone, group):
    texts = ["red", "a big blue circle left of a small green square", "make it red", "a", "two stars and a moon"]
    plain = tiny_backbone.encode_text(tiny_backbone.tokenize(texts)).embeds.float()
    grouped = length_grouped_embeds(tiny_backbone, texts, group=group)
    torch.testing.assert_close(grouped, plain, rtol=1e-4, atol=1e-5)
    weight = tiny_backbone.model.text_projection.weight
    weight.requires_grad_(True)
    try:
        length_grouped_embeds(tiny_backbone, texts, group=group).sum().backward()
        assert weight.grad is not None
    finally:
        weight.requires_grad_(False)
        weight.grad = None


def test_a_fine_tuned_encoders_validation_split_is_decoded_once(tiny_backbone, tmp_path, monkeypatch):
    from cirlab.features.images import split_features, split_image_names
    from cirlab.training.sources import SplitSource
    from imagefiles import draw_image

    split = load_cirr(FIXTURES / "cirr", tmp_path, "val")
    names = split_image_names(split)
    for i, name in enumerate(names):
        draw_image(split.image_path(name), seed=i)

    class OneSplit(SplitSource):
        def __init__(self) -> None:
            self.cache, self._features, self._crops = None, {}, {}

        def split(self, name: str):
            return split

        def servers(self):
            return {}

    method = create_method("combiner", tiny_backbone)  # stage 1 fine-tunes the image encoder
    assert not method.image_encoder_frozen
    plain = split_features(method.eval(), split)
    decoded: list[str] = []
    load = feature_images.load_image
    monkeypatch.setattr(feature_images, "load_image", lambda p: decoded.append(str(p)) or load(p))
    source = OneSplit()
    first = source.features_for(method, "cirr/val")
    assert torch.equal(first.embeds, plain.embeds) and first.names == plain.names
    with torch.no_grad():  # the encoder trains between two evaluations: new features, same pixels
        for p in method.backbone.image_encoder_parameters():
            p.add_(0.01)
    second = source.features_for(method, "cirr/val")
    assert not torch.allclose(second.embeds, first.embeds)
    assert sorted(decoded) == sorted(str(split.image_path(n)) for n in names)  # each file once
