"""TMCIR: adaptive token fusion, the two stages' parameters, fine-tuned checkpoints, pseudo-target generation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cirlab.cli.main import main
from cirlab.data import pseudo_targets as pt
from cirlab.data.shapes import (
    CircoConfig,
    CirrConfig,
    CorpusConfig,
    Edit,
    RenderConfig,
    Scene,
    ShapesConfig,
    SyntheticConfig,
    build_world,
)
from cirlab.features.cache import FeatureCache
from cirlab.methods import create_method, load_method
from cirlab.modules.token_fusion import AdaptiveTokenFusion, match_tokens
from cirlab.training.data import PixelTable, Triplet, make_batch_fn
from cirlab.training.loop import TrainConfig, param_groups
from cirlab.training.sources import ShapesSource

TEXTS = ["make the red circle blue", "remove the square", "add a small green star at the top right"]


# ------------------------------------------------------------------------------------------------ token fusion


def _fusion(**kwargs) -> AdaptiveTokenFusion:
    torch.manual_seed(0)
    return AdaptiveTokenFusion(24, 16, 12, max_text_tokens=10, width=32, heads=4, **kwargs).eval()


def _tokens(b: int = 3, n: int = 5, length: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(b, 1 + n, 24, generator=gen)  # (B, 1 + n, w_v)
    text = torch.randn(b, length, 16, generator=gen)  # (B, L, w_t)
    mask = torch.ones(b, length, dtype=torch.long)
    for i, real in enumerate([length, 4, 2][:b]):
        mask[i, real:] = 0
    return image, text, mask


def test_match_tokens_on_a_hand_made_similarity():
    # 4 visual tokens (rows) x 3 text tokens (columns); the last text token is padding and points at token 3.
    s = torch.tensor([[[0.9, 0.1, 0.0], [0.2, 0.3, 0.1], [0.0, 0.8, 0.2], [0.1, 0.2, 0.99]]])
    match = match_tokens(s, torch.tensor([[1, 1, 0]]))
    assert match.best.tolist() == [[0, 2, 0]]
    torch.testing.assert_close(match.score, torch.tensor([[0.9, 0.8, 0.0]]))
    assert match.kept.tolist() == [[False, True, False, True]], "padding must not mark visual token 3 as matched"
    # Two text tokens choosing the same visual token leave two tokens kept.
    both = match_tokens(torch.tensor([[[0.9, 0.9], [0.1, 0.1], [0.0, 0.0]]]), torch.ones(1, 2))
    assert both.best.tolist() == [[0, 0]] and both.kept.tolist() == [[False, True, True]]


@pytest.mark.parametrize("cls_token", ["learned", "image"])
def test_fusion_shapes_gates_and_batched_equals_single(cls_token):
    fusion = _fusion(cls_token=cls_token)
    image, text, mask = _tokens()
    with torch.no_grad():
        batched = fusion(image, text, mask)
        single = torch.cat(
            [
                fusion(image[i : i + 1], text[i : i + 1, : int(mask[i].sum())], mask[i : i + 1, : int(mask[i].sum())])
                for i in range(3)
            ]
        )
        gates = fusion.gate(torch.linspace(-1, 1, 11))
    assert batched.shape == (3, 12) and torch.isfinite(batched).all()
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    assert ((gates > 0) & (gates < 1)).all()


def test_fusion_ignores_padding_content_and_reads_every_real_token():
    fusion = _fusion()
    image, text, mask = _tokens()
    noisy = text.clone()
    noisy[mask == 0] = 100.0 * torch.randn_like(noisy[mask == 0])
    changed = text.clone()
    changed[1, 0] += 1.0  # a real token of row 1
    with torch.no_grad():
        base = fusion(image, text, mask)
        torch.testing.assert_close(fusion(image, noisy, mask), base)
        assert not torch.allclose(fusion(image, changed, mask)[1], base[1])


def test_matched_visual_tokens_are_merged_and_unmatched_ones_kept():
    fusion = _fusion(gate_bias=50.0)  # a_j = 1: a fused token is its text token, so a matched visual token vanishes
    image, text, mask = _tokens(b=1)
    with torch.no_grad():
        fusion.proj_visual.bias.zero_()  # scaling a visual token then leaves every cosine, hence every match, as is
        match = match_tokens(fusion.similarity(fusion.proj_visual(image), fusion.proj_text(text)), mask)
        kept = match.kept[0].nonzero().flatten().tolist()
        matched = (~match.kept[0]).nonzero().flatten().tolist()
        assert kept and matched, "the example must have both matched and kept visual tokens"
        base = fusion(image, text, mask)
        for i in range(image.shape[1]):
            bumped = image.clone()
            bumped[0, i] *= 1.5
            changed = not torch.allclose(fusion(bumped, text, mask), base, atol=1e-6)
            assert changed == (i in kept), f"visual token {i} (kept: {i in kept})"


# ----------------------------------------------------------------------------------------------- the method


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _pixel_batch(method, pixels: torch.Tensor, kind: str = "triplets") -> dict:
    table = PixelTable([f"img{i}" for i in range(12)], lambda rows: pixels[rows], method.encode_images)
    triplets = [Triplet(f"img{i}", TEXTS[i % 3], f"img{(i * 5 + 1) % 12}") for i in range(12)]
    return make_batch_fn(kind, 12, seed=0, images=table, triplets=triplets)(0, 0)


def _step(method, stage: str, pixels: torch.Tensor) -> None:
    """One AdamW step of ``stage`` on a pixel batch."""
    params = method.trainable_parameters(stage)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    method.train()
    method.training_loss(stage, _pixel_batch(method, pixels))["loss"].backward()
    optimizer.step()
    method.eval()


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_align_trains_the_text_encoder_the_last_image_blocks_and_the_logit_scale(tiny_backbone, pixels):
    method = create_method("tmcir", tiny_backbone, {"align_image_blocks": 1})
    assert method.image_encoder_frozen
    method.prepare_stage("align")
    assert not method.image_encoder_frozen
    trained = {n for n, p in method.named_parameters() if p.requires_grad}
    vision = "backbone.model.vision_model."
    assert {n for n in trained if n.startswith(vision)} == {
        n
        for n, _ in method.named_parameters()
        if n.startswith((f"{vision}encoder.layers.1.", f"{vision}post_layernorm"))
    }
    assert {n for n, _ in method.named_parameters() if n.startswith("backbone.model.text_model.")} <= trained
    assert {"backbone.model.logit_scale", "backbone.model.text_projection.weight"} <= trained
    assert "backbone.model.visual_projection.weight" in trained
    assert not any(n.startswith("fusion.") for n in trained) and "logit_scale" not in trained
    before = _snapshot(method)
    _step(method, "align", pixels)
    after = _snapshot(method)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trained


def test_fusion_updates_every_encoder_and_the_head(tiny_backbone, pixels):
    method = create_method("tmcir", tiny_backbone)
    method.prepare_stage("fusion")
    before = _snapshot(method)
    _step(method, "fusion", pixels)
    after = _snapshot(method)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    for prefix in (
        "backbone.model.vision_model.embeddings.",
        "backbone.model.vision_model.encoder.layers.0.",
        "backbone.model.text_model.encoder.layers.0.",
        "fusion.",
        "logit_scale",
    ):
        assert any(n.startswith(prefix) for n in changed), f"nothing under {prefix} changed"
    assert "backbone.model.logit_scale" not in changed, "stage B uses its own temperature"


def test_the_shared_backbone_is_untouched(tiny_backbone, pixels):
    shared = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    method = create_method("tmcir", tiny_backbone)
    assert method.backbone is not tiny_backbone
    for stage in ("align", "fusion"):
        method.prepare_stage(stage)
        _step(method, stage, pixels)
    assert all(torch.equal(v, shared[k]) for k, v in tiny_backbone.state_dict().items())
    assert not any(p.requires_grad for p in tiny_backbone.parameters())


def test_a_fine_tuned_checkpoint_reproduces_queries_and_gallery(tiny_backbone, pixels, tmp_path):
    method = create_method("tmcir", tiny_backbone, {"head_lr_scale": 4.0})
    for stage in ("align", "fusion"):
        method.prepare_stage(stage)
        _step(method, stage, pixels)
    method.save(tmp_path / "ckpt")
    loaded = load_method(tmp_path / "ckpt", backbone=copy.deepcopy(tiny_backbone))
    assert not loaded.image_encoder_frozen, "a fine-tuned checkpoint must not read cached backbone features"
    with torch.no_grad():
        ref, loaded_ref = method.encode_images(pixels[:3]), loaded.encode_images(pixels[:3])
        torch.testing.assert_close(loaded.compose(loaded_ref, TEXTS), method.compose(ref, TEXTS))
        gallery = method.encode_gallery(method.encode_images(pixels))
        torch.testing.assert_close(loaded.encode_gallery(loaded.encode_images(pixels)), gallery)
        shared = torch.nn.functional.normalize(tiny_backbone.encode_image(pixels).embeds, dim=-1)
    assert not torch.allclose(gallery, shared, atol=1e-4), "the gallery must come from the fine-tuned encoder"


@pytest.mark.parametrize("fusion", ["atf", "sum", "concat_mlp"])
def test_fusion_variants_compose_normalised_queries(tiny_backbone, pixels, fusion):
    method = create_method("tmcir", tiny_backbone, {"fusion": fusion}).eval()
    with torch.no_grad():
        ref = method.encode_images(pixels[:3])
        q = method.compose(ref, TEXTS)
        single = torch.cat([method.compose(method.encode_images(pixels[i : i + 1]), [TEXTS[i]]) for i in range(3)])
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(q, single, atol=1e-5, rtol=1e-4)
    assert any(n.startswith("fusion.") for n, _ in method.named_parameters()) == (fusion != "sum")


def test_ablation_switches_change_the_stages(tiny_backbone):
    assert [s.name for s in create_method("tmcir", tiny_backbone).stages] == ["align", "fusion"]
    assert [s.name for s in create_method("tmcir", tiny_backbone, {"use_align": False}).stages] == ["fusion"]
    real = create_method("tmcir", tiny_backbone, {"align_on_real_targets": True})
    assert real.stage("align").data == "triplets"
    assert create_method("tmcir", tiny_backbone).stage("align").data == "pseudo_triplets"
    with pytest.raises(ValueError, match="fusion"):
        create_method("tmcir", tiny_backbone, {"fusion": "gated"})


def test_the_fusion_head_gets_its_own_learning_rate_in_the_loop(tiny_backbone, tmp_path):
    method = create_method("tmcir", tiny_backbone, {"head_lr_scale": 4.0})
    method.prepare_stage("fusion")
    scales = method.learning_rate_scales("fusion")
    assert set(scales) == {id(p) for p in method.fusion.parameters()}
    assert method.learning_rate_scales("align") == {}
    params = method.trainable_parameters("fusion")
    named = {n: p for n, p in method.named_parameters() if id(p) in {id(q) for q in params}}
    groups = param_groups(named, TrainConfig(lr=1e-3), scales)
    head = {id(p) for p in method.fusion.parameters()}
    for group in groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1, "a group mixes head and encoder parameters"
        assert group["lr"] == pytest.approx(4e-3 if in_head == {True} else 1e-3)


# ------------------------------------------------------------------------------------------------ pseudo-targets


def _small_config() -> ShapesConfig:
    return ShapesConfig(
        render=RenderConfig(image_size=32, supersample=2),
        cirr=CirrConfig(train_queries=30, val_queries=8, test_queries=8, extra_gallery=4),
        circo=CircoConfig(val_queries=4, test_queries=4, extra_gallery=8),
        corpus=CorpusConfig(images=16),
        synthetic=SyntheticConfig(triplets=8, extra_corrupt_fractions=()),
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(_small_config(), tmp_path_factory.mktemp("tmcir-shapes") / "world")


class _Counting(pt.PseudoTargetGenerator):
    """Wraps a generator, counting the requests it generates and failing on a chosen call (a simulated crash)."""

    name = "shapes-renderer"

    def __init__(self, inner: pt.PseudoTargetGenerator, fail_on_call: int | None = None) -> None:
        self.inner, self.fail_on_call, self.calls, self.generated = inner, fail_on_call, 0, []

    def describe(self):
        return self.inner.describe()

    def generate(self, requests, seeds):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt("simulated interruption")
        self.generated += [r.key for r in requests]
        return self.inner.generate(requests, seeds)


def test_renderer_pseudo_targets_record_their_provenance(world, tmp_path):
    requests = pt.shapes_requests(world)
    generator = pt.ShapesRendererGenerator.for_world(world, noise=0.5)
    records = pt.generate_pseudo_targets(generator, requests, tmp_path / "pseudo", seed=3, batch_size=8)
    assert [r["key"] for r in records] == [r.key for r in requests]
    meta = world.cirr_meta("train")
    heldout = world.config.scene.heldout
    noisy = 0
    for request, record in zip(requests, records, strict=True):
        assert record["generator"] == "shapes-renderer" and record["seed"] == pt.item_seed(3, request.key)
        assert record["source"] == {
            "key": request.key,
            "reference": request.reference,
            "text": request.text,
            "target": request.target,
        }
        with Image.open(record["path"]) as im:
            assert im.size == (32, 32)
        scene = Scene.parse(record["scene"])
        # The renderer edits the reference in place, as an image editor would (the world's target may be re-shot).
        edit, reference = Edit.from_dict(meta[request.key]["edit"]), Scene.parse(meta[request.key]["reference_scene"])
        target = edit.apply(reference)
        assert not (scene.combos() - target.combos()) & heldout, "noise created a held-out combination"
        if record["noise"] is None:
            assert scene == target
        else:
            noisy += 1
            change = record["noise"]
            assert scene != target and change["from"] != change["to"]
            assert change["attribute"] in ("colour", "shape", "size")
    assert 0 < noisy < len(records)
    lines = (tmp_path / "pseudo" / pt.MANIFEST_FILE).read_text().splitlines()
    assert len(lines) == len(records) and all(json.loads(line)["key"] for line in lines)
    info = json.loads((tmp_path / "pseudo" / pt.GENERATOR_FILE).read_text())
    assert info == {"generator": generator.describe(), "seed": 3}


def test_an_interrupted_run_resumes_without_regenerating(world, tmp_path):
    requests = pt.shapes_requests(world)
    out = tmp_path / "pseudo"
    inner = pt.ShapesRendererGenerator.for_world(world, noise=0.3)
    crashing = _Counting(inner, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        pt.generate_pseudo_targets(crashing, requests, out, batch_size=7)
    first = crashing.generated
    assert len(first) == 14 and len(pt.read_pseudo_targets(out)) == 14
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    # A crash mid-append leaves a torn last line: it is ignored, and nothing else is lost.
    with (out / pt.MANIFEST_FILE).open("a") as f:
        f.write('{"key": "torn", "ima')
    resumed = _Counting(inner)
    records = pt.generate_pseudo_targets(resumed, requests, out, batch_size=7)
    assert sorted(resumed.generated) == sorted(r.key for r in requests if r.key not in first)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir() if p.name in stamps} == stamps
    uninterrupted = pt.generate_pseudo_targets(inner, requests, tmp_path / "again", batch_size=30)
    for a, b in zip(records, uninterrupted, strict=True):
        assert np.array_equal(np.asarray(Image.open(a["path"])), np.asarray(Image.open(b["path"])))
        assert {k: v for k, v in a.items() if k != "path"} == {k: v for k, v in b.items() if k != "path"}
    again = _Counting(inner)
    pt.generate_pseudo_targets(again, requests, out)
    assert again.calls == 0
    with pytest.raises(ValueError, match="another generator or seed"):
        pt.generate_pseudo_targets(inner, requests, out, seed=1)


def test_pseudo_triplets_feed_a_fine_tuned_method_from_pixels(world, tiny_backbone, tmp_path):
    source = ShapesSource(world, FeatureCache(tmp_path / "features"))
    method = create_method("tmcir", tiny_backbone, {"pseudo_targets": {"noise": 0.25}})
    method.prepare_stage("align")
    data = source.stage_data(method.data_request("align"))
    assert isinstance(data.images, PixelTable) and data.info["pseudo_generator"] == "shapes-renderer"
    assert len(data.triplets) == 30 and all(Path(t.target).is_file() for t in data.triplets)
    folder = Path(data.triplets[0].target).parents[1]
    assert folder.parent == world.root.parent / f"{world.root.name}-pseudo"
    stamp = (folder / pt.MANIFEST_FILE).stat().st_mtime_ns
    again = source.stage_data(method.data_request("align"))
    assert [t.target for t in again.triplets] == [t.target for t in data.triplets]
    assert (folder / pt.MANIFEST_FILE).stat().st_mtime_ns == stamp, "cached pseudo-targets must be reused"
    batch = make_batch_fn("pseudo_triplets", 4, 0, images=data.images, triplets=data.triplets)(0, 0)
    assert batch["target"].embeds.requires_grad, "pixels must be encoded by the trainable encoder"
    # Evaluation features come from the method's own encoder once it is fine-tuned, from the cache before.
    fresh = create_method("tmcir", tiny_backbone)
    cached = source.features_for(fresh, "cirr/val")
    torch.testing.assert_close(cached.embeds, source.features("cirr/val", tiny_backbone, True).embeds)
    _step(method, "align", torch.randn(12, 3, 32, 32))
    tuned = source.features_for(method, "cirr/val")
    assert not torch.allclose(tuned.embeds, cached.embeds, atol=1e-4)


def test_cli_generates_into_the_cache_training_reads(world, capsys):
    assert main(["generate-pseudo-targets", str(world.root), "--noise", "0.1", "--limit", "5", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "5 pseudo-targets (shapes-renderer" in out
    generator = pt.ShapesRendererGenerator.for_world(world, noise=0.1)
    assert len(pt.read_pseudo_targets(pt.shapes_pseudo_dir(world, generator, 7))) == 5


# ------------------------------------------------------------------------------------------------------ diffusers


def _tiny_pix2pix(path: Path, tokenizer) -> None:
    """A random InstructPix2Pix pipeline of a few hundred kB, saved like a real checkpoint."""
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=8,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=8,
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    pipe = diffusers.StableDiffusionInstructPix2PixPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.EulerAncestralDiscreteScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)


def test_diffusers_generator_with_a_tiny_random_pipeline(tiny_backbone, world, tmp_path):
    pytest.importorskip("diffusers")
    _tiny_pix2pix(tmp_path / "pix2pix", tiny_backbone.tokenizer)
    config = pt.DiffusersConfig(steps=1, image_size=16)
    generator = pt.DiffusersGenerator(str(tmp_path / "pix2pix"), config)
    requests = pt.shapes_requests(world)[:3]
    records = pt.generate_pseudo_targets(generator, requests, tmp_path / "out", seed=5, batch_size=2)
    assert type(generator.pipeline()).__name__ == "StableDiffusionInstructPix2PixPipeline"
    assert "strength" not in generator.call_kwargs() and generator.call_kwargs()["image_guidance_scale"] == 1.5
    for request, record in zip(requests, records, strict=True):
        assert record["generator"] == "diffusers" and record["source"]["text"] == request.text
        assert record["prompt"] == request.text and record["noise"] is None
        with Image.open(record["path"]) as im:
            assert im.size == (16, 16) and im.mode == "RGB"
    # An image depends on its seed alone, not on the batch it was made in.
    alone = generator.generate(requests[2:], [pt.item_seed(5, requests[2].key)])[0].image
    diff = np.abs(np.asarray(alone, dtype=int) - np.asarray(Image.open(records[2]["path"]), dtype=int))
    assert diff.max() <= 2
    stamp = (tmp_path / "out" / pt.MANIFEST_FILE).read_text()
    pt.generate_pseudo_targets(generator, requests, tmp_path / "out", seed=5)
    assert (tmp_path / "out" / pt.MANIFEST_FILE).read_text() == stamp
