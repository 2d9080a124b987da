"""Contract tests run over every registered backbone (STYLE.md rules 4 and 11), as test_methods_contract runs over
every method: each is built tiny and random (or, for the Shapes CLIP, as shipped) in a temporary directory, offline.

A backbone registered without a builder here fails ``test_every_registered_backbone_has_a_builder``: adding one to
the registry means adding it to this contract.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cirlab
from cirlab.backbones import BACKBONES
from cirlab.placeholder import PLACEHOLDER, splice_pseudo_tokens
from cirlab.types import Backbone

TEXTS = ["a photo of a red circle", "make the square blue and move it to the left", "a"]


def _tiny_open_clip(tmp: Path) -> str:
    """A random open_clip model of a tiny architecture registered from a config file (the extra is optional)."""
    open_clip = pytest.importorskip("open_clip", reason="the [openclip] extra is not installed")
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (tmp / "cirlab-tiny-test.json").write_text(json.dumps({"model_cfg": config, **config}))
    open_clip.add_model_config(tmp)
    return "open-clip:cirlab-tiny-test"


def _saved_tiny(tmp: Path) -> str:
    cirlab.create_backbone("tiny", seed=1).save_pretrained(tmp / "clip")
    return f"hf-clip:{tmp / 'clip'}"


def _tiny_mllm(tmp: Path) -> str:
    from cirlab.backbones.tiny import save_tiny_mllm

    return f"mllm:{save_tiny_mllm(tmp / 'mllm')}"


# name -> (builds a spec from a temporary directory, the registered name its save_pretrained directory loads with,
# or None when the family is loaded by name only and methods save what they train).
BUILDERS: dict[str, tuple[Callable[[Path], str], str | None]] = {
    "tiny": (lambda tmp: "tiny", "hf-clip"),
    "hf-clip": (_saved_tiny, "hf-clip"),
    "shapes-clip": (lambda tmp: "shapes-clip", "hf-clip"),
    "open-clip": (_tiny_open_clip, None),
    "mllm": (_tiny_mllm, None),
}


def test_every_registered_backbone_has_a_builder():
    assert set(BUILDERS) == set(BACKBONES.list())


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def built(request, tmp_path_factory) -> tuple[str, Backbone]:
    build, _ = BUILDERS[request.param]
    spec = build(tmp_path_factory.mktemp(request.param))
    # The multimodal LLM loads in bfloat16 by default; float32 keeps batched-vs-single comparisons exact.
    options = {"dtype": "float32"} if request.param == "mllm" else {}
    return request.param, cirlab.create_backbone(spec, **options).freeze()


def _images(backbone: Backbone, n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    size = backbone.image_transform.size
    return [Image.fromarray(rng.integers(0, 255, (size + 5 * i, size + 7, 3), dtype=np.uint8)) for i in range(n)]


def test_the_backbone_follows_the_protocol(built):
    name, backbone = built
    assert isinstance(backbone, Backbone), name
    assert backbone.name.startswith(name)
    assert min(backbone.embed_dim, backbone.token_dim, backbone.vision_width) > 0
    assert isinstance(backbone.placeholder_token_id, int)
    assert backbone.truncate(["a b c"])[0].startswith("a")
    assert backbone.identity() == backbone.identity() and isinstance(backbone.identity(), str)


def test_image_and_text_features_have_the_declared_shapes(built):
    _, backbone = built
    pixels = backbone.preprocess(_images(backbone))
    size = backbone.image_transform.size
    assert pixels.shape == (3, 3, size, size) and pixels.device == backbone.device
    with torch.no_grad():
        image = backbone.encode_image(pixels)
        text = backbone.encode_text(backbone.tokenize(TEXTS))
    assert image.embeds.shape == (3, backbone.embed_dim) and torch.isfinite(image.embeds).all()
    assert image.tokens.shape[0] == 3 and image.tokens.shape[2] == backbone.vision_width
    assert (image.tokens.shape[1] > 0) == backbone.has_image_tokens
    assert text.embeds.shape == (3, backbone.embed_dim) and torch.isfinite(text.embeds).all()


def test_batched_and_single_encoding_agree(built):
    _, backbone = built
    pixels = backbone.preprocess(_images(backbone))
    with torch.no_grad():
        images = backbone.encode_image(pixels).embeds
        one_by_one = torch.cat([backbone.encode_image(pixels[i : i + 1]).embeds for i in range(3)])
        texts = backbone.encode_text(backbone.tokenize(TEXTS)).embeds
        single = torch.cat([backbone.encode_text(backbone.tokenize([t])).embeds for t in TEXTS])
    torch.testing.assert_close(images, one_by_one, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(texts, single, atol=1e-4, rtol=1e-4)


def test_text_from_embeddings_equals_text_from_ids_and_a_pseudo_token_gets_gradient(built):
    """What every pseudo-word method relies on: the text tower run from input embeddings is the text tower, and a
    token spliced at the placeholder is differentiated through while the frozen weights get no gradient."""
    _, backbone = built
    tokens = backbone.tokenize(TEXTS)
    with torch.no_grad():
        from_ids = backbone.encode_text(tokens).embeds
        from_embeds = backbone.encode_text_embeds(backbone.token_embeddings(tokens.input_ids), tokens).embeds
    torch.testing.assert_close(from_embeds, from_ids)
    slot = backbone.tokenize([f"a photo of {PLACEHOLDER} that is red"])
    pseudo = torch.zeros(1, backbone.token_dim, requires_grad=True)
    embeds = splice_pseudo_tokens(
        backbone.token_embeddings(slot.input_ids), slot.input_ids, backbone.placeholder_token_id, pseudo
    )
    backbone.encode_text_embeds(embeds, slot).embeds.float().sum().backward()
    assert pseudo.grad is not None and pseudo.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())


def test_a_saved_backbone_loads_with_the_same_features(built, tmp_path):
    name, backbone = built
    loader = BUILDERS[name][1]
    if loader is None:
        with pytest.raises(NotImplementedError):
            backbone.save_pretrained(tmp_path / "saved")
        return
    backbone.save_pretrained(tmp_path / "saved")
    # A checkpoint is written without the modality gap (the shipped Shapes CLIP has one): the spec carries it back.
    gap = getattr(backbone, "modality_gap", 0.0)
    spec = f"{loader}:{tmp_path / 'saved'}" + (f"#gap={gap!r}" if gap else "")
    loaded = cirlab.create_backbone(spec).freeze()
    assert loaded.image_transform == backbone.image_transform
    pixels = backbone.preprocess(_images(backbone, 2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels).embeds, backbone.encode_image(pixels).embeds)
        torch.testing.assert_close(loaded.encode_text(TEXTS[:2]).embeds, backbone.encode_text(TEXTS[:2]).embeds)
