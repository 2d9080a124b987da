"""Backbone protocol: hf-clip save/load offline, placeholder splicing, batching, freezing, preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import cirlab
from cirlab.backbones import parse_spec
from cirlab.backbones.transforms import ImageTransform
from cirlab.methods.base import load_method
from cirlab.placeholder import PLACEHOLDER, fill_prompt, splice_pseudo_tokens
from cirlab.types import Backbone


def _images(n: int, size: int = 40, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 7, 3), dtype=np.uint8)) for _ in range(n)]


TEXTS = ["a photo of a cat", "make the red circle blue and move it to the top left", "a"]


def test_registered_names():
    assert {"hf-clip", "open-clip", "tiny"} <= set(cirlab.list_backbones())
    assert parse_spec("hf-clip:org/name") == ("hf-clip", "org/name")
    assert parse_spec("tiny") == ("tiny", None)


def test_tiny_follows_protocol(tiny_backbone):
    assert isinstance(tiny_backbone, Backbone)
    pixels = tiny_backbone.preprocess(_images(3))
    feats = tiny_backbone.encode_image(pixels)
    assert feats.embeds.shape == (3, tiny_backbone.embed_dim)
    assert feats.tokens.shape[0] == 3 and feats.tokens.shape[2] == tiny_backbone.vision_width
    text = tiny_backbone.encode_text(TEXTS)
    assert text.embeds.shape == (3, tiny_backbone.embed_dim)
    assert text.tokens.shape[2] == tiny_backbone.token_dim
    assert torch.isfinite(text.embeds).all() and torch.isfinite(feats.embeds).all()


def test_saved_dir_loads_offline_with_same_embeddings(tiny_backbone, tiny_backbone_dir):
    loaded = cirlab.create_backbone(f"hf-clip:{tiny_backbone_dir}").freeze()
    assert (tiny_backbone_dir / "config.json").is_file()
    assert list(tiny_backbone_dir.glob("*.safetensors"))
    assert loaded.image_transform == tiny_backbone.image_transform
    pixels = tiny_backbone.preprocess(_images(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels).embeds, tiny_backbone.encode_image(pixels).embeds)
        torch.testing.assert_close(loaded.encode_text(TEXTS).embeds, tiny_backbone.encode_text(TEXTS).embeds)
        # ...and our text path (which can start from embeddings) equals transformers' own forward.
        tokens = tiny_backbone.tokenize(TEXTS)
        ref = tiny_backbone.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        torch.testing.assert_close(tiny_backbone.encode_text(tokens).embeds, ref.pooler_output)
        ref_img = tiny_backbone.model.get_image_features(pixel_values=pixels)
        torch.testing.assert_close(tiny_backbone.encode_image(pixels).embeds, ref_img.pooler_output)


def test_missing_model_dir_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        cirlab.create_backbone(f"hf-clip:{tmp_path}")


def test_splicing_a_real_word_equals_writing_it(tiny_backbone):
    word = "cat"
    word_ids = tiny_backbone.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    assert len(word_ids) == 1, "test word must be a single token"
    with_word = tiny_backbone.tokenize([fill_prompt("a photo of $ that {text}", "is red").replace(PLACEHOLDER, word)])
    with_slot = tiny_backbone.tokenize([fill_prompt("a photo of $ that {text}", "is red")])
    assert with_word.input_ids.shape == with_slot.input_ids.shape
    embeds = tiny_backbone.token_embeddings(with_slot.input_ids)
    pseudo = tiny_backbone.token_embeddings(torch.tensor(word_ids))  # (1, w)
    spliced = splice_pseudo_tokens(embeds, with_slot.input_ids, tiny_backbone.placeholder_token_id, pseudo)
    with torch.no_grad():
        got = tiny_backbone.encode_text_embeds(spliced, with_slot).embeds
        want = tiny_backbone.encode_text(with_word).embeds
    torch.testing.assert_close(got, want)


def test_splice_rejects_missing_placeholder_and_bad_shapes(tiny_backbone):
    tokens = tiny_backbone.tokenize(["no slot here"])
    embeds = tiny_backbone.token_embeddings(tokens.input_ids)
    with pytest.raises(ValueError, match="no placeholder"):
        splice_pseudo_tokens(embeds, tokens.input_ids, tiny_backbone.placeholder_token_id, embeds[:, 0])
    with pytest.raises(ValueError, match="pseudo tokens must be"):
        splice_pseudo_tokens(embeds, tokens.input_ids, tiny_backbone.placeholder_token_id, embeds[:, 0, :3])
    with pytest.raises(ValueError, match="exactly once"):
        fill_prompt("a photo of {text}")


def test_batched_and_single_encoding_agree(tiny_backbone):
    with torch.no_grad():
        batched = tiny_backbone.encode_text(TEXTS).embeds
        single = torch.cat([tiny_backbone.encode_text([t]).embeds for t in TEXTS])
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
        pixels = tiny_backbone.preprocess(_images(3))
        img_b = tiny_backbone.encode_image(pixels).embeds
        img_s = torch.cat([tiny_backbone.encode_image(pixels[i : i + 1]).embeds for i in range(3)])
        torch.testing.assert_close(img_b, img_s, atol=1e-5, rtol=1e-5)


def test_frozen_parameters_get_no_gradient():
    backbone = cirlab.create_backbone("tiny", seed=1).freeze()
    tokens = backbone.tokenize(["a photo of $"])
    pseudo = torch.zeros(1, backbone.token_dim, requires_grad=True)
    embeds = splice_pseudo_tokens(
        backbone.token_embeddings(tokens.input_ids), tokens.input_ids, backbone.placeholder_token_id, pseudo
    )
    loss = (
        backbone.encode_text_embeds(embeds, tokens).embeds.sum()
        + backbone.encode_image(torch.randn(1, 3, 32, 32)).embeds.sum()
    )
    loss.backward()
    assert pseudo.grad is not None and pseudo.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())


def test_transform_matches_transformers_image_processor():
    # The PIL backend of transformers' CLIP processor: the reference our torchvision-free transform must match.
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as CLIPImageProcessor

    transform = ImageTransform(size=24, resize_to=26, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    processor = CLIPImageProcessor(**{k: v for k, v in transform.to_hf_config().items() if k != "image_processor_type"})
    for size in (50, 26, 97):
        images = _images(2, size=size)
        want = processor(images=images, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(transform(images), want, atol=1e-6, rtol=0)
    assert ImageTransform.from_hf_config(transform.to_hf_config()) == transform


def test_identity_changes_with_weights(tiny_backbone):
    other = cirlab.create_backbone("tiny", seed=3)
    assert tiny_backbone.identity() != other.identity()
    assert tiny_backbone.identity() == tiny_backbone.identity()


def test_open_clip_missing_extra_names_it():
    try:
        import open_clip  # noqa: F401
    except ImportError:
        from cirlab._optional import MissingExtraError

        with pytest.raises(MissingExtraError, match=r"cirlab\[openclip\]"):
            cirlab.create_backbone("open-clip:ViT-B-32")
    else:
        backbone = cirlab.create_backbone("open-clip:ViT-B-32")
        assert backbone.encode_text(["a photo of a cat"]).embeds.shape == (1, backbone.embed_dim)


def test_text_encoding_emits_no_warning_from_transformers(tiny_backbone):
    """transformers warned on every text encoding (the old name of create_causal_mask's cache argument); a server
    logged it for every query."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_backbone.encode_text(["a red circle", "two blue squares"])


def test_a_modality_gap_scales_every_image_text_cosine_and_keeps_clip_logits_and_rankings(
    tiny_backbone, tiny_backbone_dir, tmp_path
):
    gap = 1.5
    factor = float(np.hypot(1.0, gap))
    gapped = cirlab.create_backbone(f"hf-clip:{tiny_backbone_dir}", modality_gap=gap).freeze()
    plain = cirlab.create_backbone(f"hf-clip:{tiny_backbone_dir}").freeze()
    assert gapped.embed_dim == plain.embed_dim + 1
    assert gapped.identity() != plain.identity()
    pixels = plain.preprocess(_images(4))
    with torch.no_grad():
        image, image_gap = plain.encode_image(pixels).embeds, gapped.encode_image(pixels).embeds
        text, text_gap = plain.encode_text(TEXTS).embeds, gapped.encode_text(TEXTS).embeds
    torch.testing.assert_close(image_gap[:, :-1], image)
    assert torch.all(image_gap[:, -1] == 0)
    torch.testing.assert_close(text_gap[:, :-1], text)
    cos = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    cos_gap = torch.nn.functional.normalize(image_gap, dim=-1) @ torch.nn.functional.normalize(text_gap, dim=-1).T
    torch.testing.assert_close(cos_gap, cos / factor)
    torch.testing.assert_close(gapped.logit_scale.exp() * cos_gap, plain.logit_scale.exp() * cos)
    assert torch.equal(cos_gap.argsort(dim=0), cos.argsort(dim=0))  # images ranked by a text: as before
    # The normalised texts all share the offset: their cosines move towards 1, their rankings stay.
    t = torch.nn.functional.normalize(text_gap, dim=-1)
    assert torch.allclose(t[:, -1], torch.full((len(TEXTS),), gap / factor))
    # Saved without the gap: the checkpoint is the plain one again.
    gapped.save_pretrained(tmp_path / "saved")
    reloaded = cirlab.create_backbone(f"hf-clip:{tmp_path / 'saved'}").freeze()
    torch.testing.assert_close(reloaded.logit_scale, plain.logit_scale)
    torch.testing.assert_close(gapped.logit_scale.exp(), plain.logit_scale.exp() * factor)


@pytest.mark.parametrize("gap", [-0.5, float("nan"), float("inf")])
def test_a_bad_modality_gap_is_refused(tiny_backbone_dir, gap):
    with pytest.raises(ValueError, match="modality_gap"):
        cirlab.create_backbone(f"hf-clip:{tiny_backbone_dir}", modality_gap=gap)


def test_a_modality_gap_travels_with_the_backbone_spec_and_checkpoints_rebuild_it(tiny_backbone_dir, tmp_path):
    spec = f"hf-clip:{tiny_backbone_dir}#gap=2"
    gapped = cirlab.create_backbone(spec).freeze()
    assert gapped.name == spec and gapped.modality_gap == 2.0 and gapped.embed_dim == 33
    method = cirlab.create_method("sum", gapped)
    method.save(tmp_path / "run")
    loaded = load_method(tmp_path / "run")
    assert loaded.backbone.name == spec and loaded.backbone.modality_gap == 2.0
    assert loaded.backbone.identity() == gapped.identity()
    # Built by the factory, with the gap as an argument: the name carries it all the same.
    direct = cirlab.backbones.BACKBONES.get("hf-clip")(str(tiny_backbone_dir), modality_gap=2.0)
    assert direct.name == f"hf-clip:{tiny_backbone_dir}#gap=2.0" and direct.identity() == gapped.identity()
    assert cirlab.create_backbone(direct.name).modality_gap == 2.0
    for bad, message in [
        ("#gap", "gap needs a length"),
        ("#gap=-1", "finite number >= 0"),
        ("#gap=nan", "finite number >= 0"),
        ("#gap=x", "needs a number"),
    ]:
        with pytest.raises(ValueError, match=message):
            cirlab.create_backbone(f"hf-clip:{tiny_backbone_dir}{bad}")
    with pytest.raises(ValueError, match="gap applies to"):
        cirlab.create_backbone("open-clip#gap=1")


def test_a_gap_given_as_an_argument_is_named_and_a_spec_keeps_it_everywhere(tiny_backbone_dir):
    import numpy as np

    from cirlab.index.model import absolute_spec

    padded = cirlab.create_backbone(f"hf-clip:{tiny_backbone_dir}#targetpad=1.25", modality_gap=1.5)
    rebuilt = cirlab.create_backbone(padded.name)
    assert rebuilt.modality_gap == 1.5 and rebuilt.image_transform.pad_ratio == 1.25
    assert cirlab.create_backbone("tiny", modality_gap=np.float64(0.5)).name == "tiny#gap=0.5"
    assert cirlab.create_backbone("tiny#gap=0.5").embed_dim == cirlab.create_backbone("tiny").embed_dim + 1
    with pytest.raises(ValueError, match="differs from modality_gap"):
        cirlab.create_backbone("tiny#gap=0.5", modality_gap=1.0)
    local = f"hf-clip:{tiny_backbone_dir}#gap=1.5"
    assert absolute_spec(local).endswith("#gap=1.5")
    gapped = cirlab.create_backbone(local)
    assert gapped.max_logit_scale == pytest.approx(100 * np.hypot(1, 1.5))


def test_a_checkpoint_trained_with_a_gap_is_not_evaluated_on_the_plain_shapes_clip(tiny_backbone, tmp_path):
    from types import SimpleNamespace

    import typer

    from cirlab.cli.train import _shapes_model

    cirlab.create_method("sum", cirlab.create_backbone("tiny#gap=0.5")).save(tmp_path / "run")
    with pytest.raises(typer.BadParameter, match=r"modality gap 0\.5"):
        _shapes_model(None, tmp_path / "run", SimpleNamespace(backbone=tiny_backbone), False, [])
