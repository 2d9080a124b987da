"""The multimodal-LLM backbone (``mllm:<dir>``, a tiny random Qwen2.5-VL saved offline) and Fusion-Diff in its joint
space: the backbone protocol, features and pair embeddings through the feature cache, refusals, both training
stages through the one training loop, and save/load."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import cirlab
from cirlab.backbones import create_backbone
from cirlab.backbones.mllm import MLLMBackbone
from cirlab.backbones.mllm_space import MLLMJointSpace, MLLMJointSpaceConfig
from cirlab.features.cache import FeatureCache
from cirlab.features.images import ArrayImages, ImageEncoder, cached_pair_table, image_features
from cirlab.features.table import PairTable
from cirlab.methods import METHODS, create_method, load_method
from cirlab.methods.base import checkpoint_info
from cirlab.training.data import FeatureTable, Triplet, make_batch_fn
from cirlab.training.loop import TrainConfig, train
from cirlab.training.run_config import load_run_config
from cirlab.training.sources import ShapesSource
from cirlab.types import Backbone, PairEncoder, PairFeatures

TEXTS = ["make the red circle blue", "remove the square", "add a small green star at the top right"]
CAPTIONS = [
    ["a large red circle at the top left", "top left: a big red circle"],
    ["a small blue square at the center"],
    ["a large green star at the bottom right", "a small red circle at the top"],
    ["a small yellow triangle on the left"],
]
SMALL = {"width": 32, "layers": 2, "heads": 2, "adapter_width": 32, "adapter_heads": 2}
N_IMAGES = 8


@pytest.fixture(scope="module")
def mllm(tiny_mllm_dir) -> MLLMBackbone:
    return create_backbone(f"mllm:{tiny_mllm_dir}", dtype="float32", image_size=56, batch_size=4).freeze()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (N_IMAGES, 56, 56, 3), dtype=np.uint8)  # (N, H, W, 3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> FeatureCache:
    return FeatureCache(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def table(mllm, images, cache) -> FeatureTable:
    return _image_table(mllm, images, cache)


@pytest.fixture(scope="module")
def pairs(mllm, images, cache) -> tuple:
    return cached_pair_table(mllm, images, [CAPTIONS[i % len(CAPTIONS)] for i in range(N_IMAGES)], cache)


def _image_table(backbone, images: np.ndarray, cache: FeatureCache) -> FeatureTable:
    feats = image_features(ImageEncoder.of_backbone(backbone), ArrayImages(images), cache)
    return feats.table([str(i) for i in range(len(images))])


def _triplets() -> list[Triplet]:
    return [Triplet(str(i), TEXTS[i % 3], str((i * 3 + 1) % N_IMAGES)) for i in range(N_IMAGES)]


def _method(backbone, **config):
    return create_method("fusion-diff", backbone, {**SMALL, **config}).eval()


def test_mllm_backbone_loads_from_a_local_dir_and_serves_the_joint_space(mllm, tiny_mllm_dir, images):
    assert "mllm" in cirlab.list_backbones()
    assert isinstance(mllm, Backbone) and isinstance(mllm, PairEncoder) and not mllm.has_image_tokens
    assert mllm.name == f"mllm:{tiny_mllm_dir}" and mllm.embed_dim == 64 and mllm.image_transform.size == 56
    space = MLLMJointSpace.from_pretrained(MLLMJointSpaceConfig(model_id=str(tiny_mllm_dir), dtype="float32"))
    pil = [Image.fromarray(im) for im in images[:3]]
    with torch.no_grad():
        pixels = mllm.preprocess(pil)  # (3, 3, 56, 56)
        feats = mllm.encode_image(pixels)
        text = mllm.encode_text(TEXTS).embeds
        pair = mllm.encode_pair(pixels, TEXTS)
    assert feats.embeds.shape == (3, 64) and feats.tokens.shape == (3, 0, 64)
    # The fixed-size backbone path (own transform, own patch layout) gives what the processor-fed space gives.
    torch.testing.assert_close(feats.embeds, space.embed(image=pil), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text, space.embed(text=TEXTS), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pair, space.embed(image=pil, text=TEXTS), atol=1e-5, rtol=1e-4)
    for z in (feats.embeds, text, pair):
        assert torch.isfinite(z).all()
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(pair, feats.embeds) and not torch.allclose(pair, text)
    with pytest.raises(ValueError, match="images but"):
        mllm.encode_pair(pixels, TEXTS[:2])


def test_features_and_pair_embeddings_go_through_the_cache(mllm, images, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "features")
    calls = {"image": 0, "pair": 0}
    encode_image, encode_pair = mllm.encode_image, mllm.encode_pair

    def counted_image(pixels):
        calls["image"] += len(pixels)
        return encode_image(pixels)

    def counted_pair(pixels, texts):
        calls["pair"] += len(texts)
        return encode_pair(pixels, texts)

    monkeypatch.setattr(mllm, "encode_image", counted_image)
    monkeypatch.setattr(mllm, "encode_pair", counted_pair)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(N_IMAGES)]
    first = _image_table(mllm, images, cache)
    pair_table, pair_captions = cached_pair_table(mllm, images, captions, cache)
    n_pairs = sum(len(c) for c in captions)
    assert calls == {"image": N_IMAGES, "pair": n_pairs}
    again = _image_table(mllm, images, cache)
    pair_again, _ = cached_pair_table(mllm, images, captions, cache)
    assert calls == {"image": N_IMAGES, "pair": n_pairs}, "cached features were encoded again"
    assert torch.equal(again.embeds, first.embeds) and torch.equal(pair_again.fused, pair_table.fused)
    with torch.no_grad():
        direct = encode_image(mllm.image_transform.from_uint8(images)).embeds
    torch.testing.assert_close(first.embeds, direct)
    # Row "i/j" is image i with its j-th caption: its image features and the pair prompt's embedding.
    assert len(pair_table) == n_pairs and pair_captions[pair_table.index["2/1"]] == [captions[2][1]]
    row = pair_table.index["2/1"]
    torch.testing.assert_close(pair_table.embeds[row], first.embeds[2])
    with torch.no_grad():
        expected = encode_pair(mllm.image_transform.from_uint8(images[2:3]), [captions[2][1]])[0]
    torch.testing.assert_close(pair_table.fused[row], expected)
    # Image files (a real corpus) give the same table: PNG is lossless, and files are keyed by their bytes.
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(im).save(paths[-1])
    from_files, _ = cached_pair_table(mllm, paths, captions, cache)
    assert calls == {"image": 2 * N_IMAGES, "pair": 2 * n_pairs}
    torch.testing.assert_close(from_files.fused, pair_table.fused, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(from_files.embeds, pair_table.embeds, atol=1e-5, rtol=1e-4)


def test_methods_that_need_patch_tokens_refuse_the_mllm_backbone(mllm, tiny_backbone):
    token_methods = [name for name in METHODS.list() if METHODS.get(name).needs_image_tokens]
    assert token_methods
    for name in token_methods:
        with pytest.raises(ValueError, match="patch tokens"):
            create_method(name, mllm)
    with pytest.raises(ValueError, match="pairs"):
        create_method("fusion-diff", tiny_backbone, {"fused": "pair"})
    with pytest.raises(ValueError, match="mix_weight"):
        _method(mllm, fused="pair", mix_weight=0.3)


@pytest.mark.parametrize("config", [{"fused": "pair"}, {"fused": "sum", "mix_weight": 0.3, "init_strength": 0.6}])
def test_fusion_diff_composes_normalised_queries_in_the_mllm_space(mllm, table, config):
    method = _method(mllm, **config)
    with torch.no_grad():
        q = method.compose(table.gather(torch.arange(3)), TEXTS)
        g = method.encode_gallery(table.gather(torch.arange(5)))
    assert q.shape == (3, 64) and g.shape == (5, 64)
    assert torch.isfinite(q).all() and torch.isfinite(g).all()
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(3))


def test_pair_stage_one_targets_are_the_pair_embeddings(mllm, table, pairs):
    pair_table, pair_captions = pairs
    method = _method(mllm, fused="pair")
    assert method.pair_embeddings("prior") and not method.pair_embeddings("adapter")
    assert not _method(mllm).pair_embeddings("prior")
    batch = make_batch_fn("pairs", 6, seed=0, images=pair_table, captions=pair_captions)(0, 0)
    assert isinstance(batch["image"], PairFeatures)
    summed = _method(mllm)
    summed.load_state_dict(method.state_dict())
    with torch.no_grad():
        # Same weights, same noise: only the target differs (the pair embedding vs the normalised sum).
        assert method.training_loss("prior", batch)["loss"] != summed.training_loss("prior", batch)["loss"]
        plain = make_batch_fn("pairs", 6, seed=0, images=table, captions=[["a"]] * len(table))(0, 0)
        with pytest.raises(ValueError, match="pair embeddings"):
            method.training_loss("prior", plain)


class _Corpus:
    """The parts of the Shapes corpus a ``pairs`` stage reads."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def caption(self, i: int, rng) -> str:
        return rng.choice(CAPTIONS[i % len(CAPTIONS)])


def test_the_shapes_source_serves_pair_rows_when_the_method_asks(mllm, images, cache):
    world = SimpleNamespace(corpus=lambda: _Corpus(images))
    source = ShapesSource(world, cache, captions_per_image=2)
    method = _method(mllm, fused="pair")
    method.prepare_stage("prior")
    data = source.stage_data(method.data_request("prior"))
    assert isinstance(data.images, PairTable) and len(data.images) == len(data.captions) == 2 * N_IMAGES
    assert data.info == {"pairs": 2 * N_IMAGES}
    assert all(len(c) == 1 for c in data.captions)
    plain = source.stage_data(_method(mllm).data_request("prior"))
    assert isinstance(plain.images, FeatureTable) and len(plain.images) == N_IMAGES


def test_both_stages_train_through_the_loop_without_re_encoding(mllm, table, pairs, tmp_path, monkeypatch):
    pair_table, pair_captions = pairs
    method = _method(mllm, fused="pair")
    data = {
        "prior": make_batch_fn("pairs", len(pair_table), seed=0, images=pair_table, captions=pair_captions),
        "adapter": make_batch_fn("synthetic_triplets", N_IMAGES, seed=0, images=table, triplets=_triplets()),
    }

    def refuse(*args, **kwargs):
        raise AssertionError("training encoded an image")

    monkeypatch.setattr(mllm, "encode_image", refuse)
    monkeypatch.setattr(mllm, "encode_pair", refuse)
    for stage in ("prior", "adapter"):
        method.prepare_stage(stage)
        batch = data[stage](0, 0)
        torch.manual_seed(0)
        method.eval()
        with torch.no_grad():
            before = method.training_loss(stage, batch)["loss"].item()
        cfg = TrainConfig(steps=30, batch_size=N_IMAGES, lr=3e-3, warmup=0.0, progress=False, log_every=100)
        result = train(
            method,
            method.trainable_parameters(stage),
            lambda step, micro, batch=batch: batch,
            lambda b, stage=stage: method.training_loss(stage, b),
            cfg,
            tmp_path / stage,
            resume=False,
        )
        assert result.steps == 30
        method.eval()
        with torch.no_grad():
            after = method.training_loss(stage, batch)["loss"].item()
        assert after < before, f"{stage}: loss {before:.4f} -> {after:.4f}"


def test_save_load_round_trip_reproduces_queries(mllm, table, tmp_path):
    method = _method(mllm, fused="pair", adapter_kind="mlp")
    with torch.no_grad():
        for p in [*method.prior.parameters(), *method.adapter.parameters()]:
            p.add_(0.01 * torch.randn_like(p))
    method.save(tmp_path / "ckpt")
    info = checkpoint_info(tmp_path / "ckpt")
    assert info["backbone"] == mllm.name and info["config"]["fused"] == "pair"
    assert not any(k.startswith("backbone.") for k in method.trained_state_dict())
    loaded = load_method(tmp_path / "ckpt", backbone=mllm)
    ref = table.gather(torch.arange(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded.compose(ref, TEXTS), method.compose(ref, TEXTS))


def test_the_mllm_preset_asks_for_the_pair_fused_feature():
    run_cfg = load_run_config("fusion-diff", "qwen25vl-72b")
    assert run_cfg.method.fused == "pair" and run_cfg.method.mix_weight == 0 and run_cfg.method.init_strength == 1
    assert run_cfg.prior.bf16 and run_cfg.adapter.bf16
