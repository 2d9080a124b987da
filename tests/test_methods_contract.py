"""Contract tests run over every registered method (STYLE.md rule 11)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cirlab
from cirlab.config import shrink_budgets
from cirlab.methods import METHODS, create_method, load_method
from cirlab.methods.base import compose_with_context, needs_context
from cirlab.training.data import FeatureTable, PixelTable, Triplet, make_batch_fn
from cirlab.training.loop import TrainConfig, train
from cirlab.types import QueryContext, ReferenceImage

CAPTIONS = [
    ["a large red circle at the top left", "top left: a big red circle"],
    ["a small blue square at the center", "center: a little blue square"],
    ["a large green star at the bottom right and a small red circle at the top"],
    ["a small yellow triangle on the left", "left: a small yellow triangle"],
]
TEXTS = ["make the red circle blue", "remove the square", "add a small green star at the top right"]


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def table(tiny_backbone, pixels) -> FeatureTable:
    with torch.no_grad():
        feats = tiny_backbone.encode_image(pixels)
    return FeatureTable([f"img{i}" for i in range(24)], feats.embeds, feats.tokens.half())


def _images(method, stage: str, table: FeatureTable, pixels: torch.Tensor) -> FeatureTable | PixelTable:
    """Cached features, or for a stage that trains the image encoder the same images encoded by it at every access
    (as training serves them), so that gradients can reach the encoder; then through the method's ``prepare_data``
    (SEARLE computes its OTI teacher tokens there), as ``fit`` does."""
    images = (
        table
        if method.image_encoder_frozen
        else PixelTable(table.names, lambda rows: pixels[rows], method.encode_images)
    )
    return method.prepare_data(stage, images)


def _batch_fn(kind: str, table: FeatureTable | PixelTable, batch_size: int = 8):
    triplets = [Triplet(f"img{i}", TEXTS[i % 3], f"img{(i * 7 + 3) % 24}") for i in range(24)]
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(len(table))]
    if kind == "captions":
        captions = [c for group in CAPTIONS for c in group]
    return make_batch_fn(kind, batch_size, seed=0, images=table, captions=captions, triplets=triplets)


def _method(name: str, backbone, generative_configs: dict | None = None):
    """The method with its default config, its compute budgets capped as a dry run caps them (SEARLE's OTI: a few
    steps, which the contract does not need converged); a generative one runs the tiny random generators instead of
    its default (downloaded) models."""
    cls = METHODS.get(name)
    config = (generative_configs or {}).get(name) if cls.generators else shrink_budgets(cls.config_class(), 5, 24)
    return create_method(name, copy.deepcopy(backbone), config).eval()


@pytest.fixture(scope="module")
def references(pixels) -> list[ReferenceImage]:
    """The fixture's images as reference images (for methods that caption them)."""
    as_uint8 = ((pixels.clamp(-2, 2) + 2) / 4 * 255).byte().permute(0, 2, 3, 1).numpy()
    return [ReferenceImage.from_image(Image.fromarray(np.ascontiguousarray(a))) for a in as_uint8]


def _compose(method, table: FeatureTable, rows: list[int], texts: list[str], references) -> torch.Tensor:
    """``method.compose`` of the table's ``rows``, with the reference images and gallery a method declares it reads."""
    context = None
    if needs_context(method):
        context = QueryContext(images=[references[i] for i in rows], gallery=F.normalize(table.embeds.float(), dim=-1))
    return compose_with_context(method, table.gather(torch.tensor(rows)), texts, context)


ALL = METHODS.list()


@pytest.mark.parametrize("name", ALL)
def test_compose_shapes_and_norm(name, tiny_backbone, table, references, generative_configs):
    method = _method(name, tiny_backbone, generative_configs)
    with torch.no_grad():
        q = _compose(method, table, [0, 1, 2], TEXTS, references)
        g = method.encode_gallery(table.gather(torch.arange(5)))
    assert q.shape == (3, tiny_backbone.embed_dim) and g.shape == (5, tiny_backbone.embed_dim)
    assert torch.isfinite(q).all() and torch.isfinite(g).all()
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("name", ALL)
def test_batched_and_single_composition_agree(name, tiny_backbone, table, references, generative_configs):
    method = _method(name, tiny_backbone, generative_configs)
    # Generative methods get a second instance for the single queries, so that its texts are generated anew
    # rather than read from the first one's cache.
    other = _method(name, tiny_backbone, generative_configs) if method.generators else method
    with torch.no_grad():
        batched = _compose(method, table, [0, 1, 2], TEXTS, references)
        single = torch.cat([_compose(other, table, [i], [TEXTS[i]], references) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


STAGES = [(name, stage.name) for name in ALL for stage in METHODS.get(name).stages]


@pytest.mark.parametrize(("name", "stage"), STAGES)
def test_only_intended_parameters_train(name, stage, tiny_backbone, table, pixels):
    method = _method(name, tiny_backbone)
    method.prepare_stage(stage)
    trainable = {id(p) for p in method.trainable_parameters(stage)}
    assert trainable, f"{name}/{stage} trains nothing"
    frozen_before = {n: p.detach().clone() for n, p in method.named_parameters() if id(p) not in trainable}
    batch = _batch_fn(method.stage(stage).data, _images(method, stage, table, pixels))(0, 0)
    method.train()
    loss = method.training_loss(stage, batch)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    for n, p in method.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None, f"{name}/{stage}: no gradient reaches {n}"
        else:
            assert p.grad is None, f"{name}/{stage}: frozen {n} got a gradient"
    torch.optim.SGD(list(method.trainable_parameters(stage)), lr=0.1).step()
    for n, p in method.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"{name}/{stage}: frozen {n} changed"


@pytest.mark.parametrize(("name", "stage"), STAGES)
def test_a_few_steps_reduce_the_loss(name, stage, tiny_backbone, table, pixels, tmp_path):
    method = _method(name, tiny_backbone)
    method.prepare_stage(stage)
    kind = method.stage(stage).data
    batch_fn = _batch_fn(kind, _images(method, stage, table, pixels), batch_size=24 if kind != "captions" else 7)

    def fixed(step: int = 0, micro: int = 0) -> dict:
        # The same examples at every step, gathered anew: pixel-served images are re-encoded by the current weights.
        return batch_fn(0, 0)

    torch.manual_seed(0)
    method.eval()  # no dropout: measure the loss itself, not its noise
    with torch.no_grad():
        before = method.training_loss(stage, fixed())["loss"].item()
    cfg = TrainConfig(steps=40, batch_size=24, lr=3e-3, warmup=0.0, progress=False, log_every=100)
    train(
        method,
        method.trainable_parameters(stage),
        fixed,
        lambda b: method.training_loss(stage, b),
        cfg,
        tmp_path / "run",
        resume=False,
    )
    method.eval()
    with torch.no_grad():
        after = method.training_loss(stage, fixed())["loss"].item()
    assert after < before, f"{name}/{stage}: loss {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("name", ALL)
def test_save_load_round_trip(name, tiny_backbone, table, references, generative_configs, tmp_path):
    method = _method(name, tiny_backbone, generative_configs)
    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad or not any(p is q for q in method.backbone.parameters()):
                p.add_(0.01 * torch.randn_like(p))
    method.save(tmp_path / "ckpt")
    loaded = load_method(tmp_path / "ckpt", backbone=copy.deepcopy(tiny_backbone))
    assert loaded.config == method.config
    with torch.no_grad():
        torch.testing.assert_close(
            _compose(loaded, table, [0, 1, 2], TEXTS, references), _compose(method, table, [0, 1, 2], TEXTS, references)
        )
    # Only what the method trained is saved: none of the (frozen) backbone's own tensors.
    saved = set(method.trained_state_dict())
    backbone_own = {f"backbone.{k}" for k in tiny_backbone.state_dict()}
    assert not (saved & backbone_own - method._finetuned_keys)


def test_list_shows_methods():
    expected = {"image-only", "text-only", "sum", "pic2word", "searle", "searle-oti", "lincir", "combiner"}
    assert expected | {"cirevl", "ldre", "osrcir"} <= set(cirlab.list_methods())


def test_the_index_offers_the_training_free_methods_the_registry_holds(monkeypatch):
    """The index's list of training-free methods is read from the registry, not typed out: a method registered
    without stages that embeds the gallery as the plain backbone does is offered; a trained or costly one is not."""
    import cirlab.index.model as index_model
    from cirlab.methods.baselines import Sum
    from cirlab.registry import Registry

    registry = Registry("method")
    for name in METHODS.list():
        registry.add(name, METHODS.get(name))
    registry.add("new-free", type("NewFree", (Sum,), {}))
    monkeypatch.setattr(index_model, "METHODS", registry)
    cheap, costly = index_model.training_free_methods(), index_model.training_free_methods(costly=True)
    assert {"sum", "image-only", "text-only", "new-free"} <= set(cheap) < set(costly)
    assert {"searle-oti", "cirevl", "ldre", "osrcir"} <= set(costly) - set(cheap)
    assert all(not registry.get(n).stages for n in costly) and "pic2word" not in costly


@pytest.mark.parametrize("name", [n for n in ALL if METHODS.get(n).reads_reference_images])
def test_methods_that_read_images_refuse_to_compose_without_them(name, tiny_backbone, table, generative_configs):
    method = _method(name, tiny_backbone, generative_configs)
    with pytest.raises(ValueError, match="reads the reference images"):
        compose_with_context(method, table.gather(torch.arange(3)), TEXTS, None)


@pytest.fixture(scope="module")
def gapped(tiny_backbone_dir):
    """The tiny CLIP with a modality gap: its joint space has one more dimension, which only texts use."""
    return cirlab.create_backbone(f"hf-clip:{tiny_backbone_dir}#gap=1.5").freeze()


@pytest.mark.parametrize("name", ALL)
def test_every_method_composes_and_trains_on_a_backbone_with_a_modality_gap(
    name, gapped, pixels, references, generative_configs
):
    with torch.no_grad():
        feats = gapped.encode_image(pixels)
    table = FeatureTable([f"img{i}" for i in range(24)], feats.embeds, feats.tokens.half())
    method = _method(name, gapped, generative_configs)
    with torch.no_grad():
        q = _compose(method, table, [0, 1, 2], TEXTS, references)
        g = method.encode_gallery(table.gather(torch.arange(5)))
    assert q.shape == (3, gapped.embed_dim) and g.shape == (5, gapped.embed_dim)
    assert torch.isfinite(q).all() and torch.isfinite(g).all()
    for stage in (s.name for s in METHODS.get(name).stages):
        method.prepare_stage(stage)
        batch = _batch_fn(method.stage(stage).data, _images(method, stage, table, pixels))(0, 0)
        method.train()
        loss = method.training_loss(stage, batch)["loss"]
        assert torch.isfinite(loss), f"{name}/{stage} on the gapped backbone: loss {loss}"
        loss.backward()
