"""Fusion-Diff: the noise schedule and DDIM sampler, the prior and its Control-Adapter, the pipeline, the method's
stages, and the joint spaces (CLIP, and a multimodal LLM with a tiny random Qwen2.5-VL saved offline)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import cirlab.methods.fusion_diff  # noqa: F401  (registers "fusion-diff")
from cirlab.methods import create_method, load_method
from cirlab.modules.control_adapter import ControlAdapter, steered_x0
from cirlab.modules.joint_space import CLIPJointSpace, JointSpace, MLLMJointSpace, MLLMJointSpaceConfig
from cirlab.modules.prior import PriorDenoiser
from cirlab.modules.prior_pipeline import FusionDiffOutput, FusionDiffPipeline
from cirlab.modules.schedule import NoiseSchedule, ddim_step, ddim_timesteps, guide
from cirlab.training.data import FeatureTable, Triplet, make_batch_fn

TEXTS = ["make the red circle blue", "remove the square", "add a small green star at the top right"]
CAPTIONS = [["a large red circle at the top left"], ["a small blue square at the center"]]
SMALL = {"width": 32, "layers": 2, "heads": 2, "adapter_width": 32, "adapter_heads": 2}


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture(scope="module")
def table(tiny_backbone) -> FeatureTable:
    pixels = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = tiny_backbone.encode_image(pixels)
    return FeatureTable([f"img{i}" for i in range(12)], feats.embeds)


def _method(backbone, **config):
    return create_method("fusion-diff", copy.deepcopy(backbone), {**SMALL, **config}).eval()


def _batch(kind: str, table: FeatureTable, batch_size: int = 6):
    triplets = [Triplet(f"img{i}", TEXTS[i % 3], f"img{(i * 5 + 1) % 12}") for i in range(12)]
    captions = [CAPTIONS[i % 2] for i in range(len(table))]
    return make_batch_fn(kind, batch_size, seed=0, images=table, captions=captions, triplets=triplets)(0, 0)


# -- schedule and sampler ----------------------------------------------------------------------------------------


def test_cosine_schedule_is_monotone_and_ends_near_pure_noise():
    schedule = NoiseSchedule(1000)
    ab = schedule.alphas_cumprod
    assert ab.shape == (1000,) and ab.dtype == torch.float64
    assert torch.all(ab[1:] < ab[:-1]) and ab[0] < 1 and ab[-1] > 0
    assert ab[0] > 0.999 and ab[-1] < 1e-4


def test_q_sample_has_the_forward_process_statistics():
    schedule = NoiseSchedule(1000)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 4), 0.7)
    for step in (10, 500, 900):
        t = torch.full((20000,), step)
        x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=gen))
        a = float(schedule.alphas_cumprod[step])
        np.testing.assert_allclose(x_t.mean(0).numpy(), np.sqrt(a) * 0.7, atol=0.03)
        np.testing.assert_allclose(x_t.std(0).numpy(), np.sqrt(1 - a), rtol=0.03, atol=0.01)


def test_ddim_timesteps_trailing_spacing():
    assert ddim_timesteps(1000, 10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    steps = ddim_timesteps(1000, 50)
    assert len(steps) == 50 and steps[0] == 999 and steps == sorted(steps, reverse=True)
    assert ddim_timesteps(1000, 10, strength=0.3) == [299, 199, 99]


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_the_true_x0_returns_it_exactly(eta):
    schedule = NoiseSchedule(1000)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 8, generator=gen)
    x = torch.randn(5, 8, generator=gen)
    steps = ddim_timesteps(1000, 10)
    for i, t in enumerate(steps):
        t_prev = steps[i + 1] if i + 1 < len(steps) else -1
        x = ddim_step(schedule, x, x0, t, t_prev, eta, torch.randn(5, 8, generator=gen))
    assert torch.equal(x, x0)


def test_guidance_scales_one_and_zero_are_exact():
    cond, uncond = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(guide(cond, uncond, 1.0), cond)
    assert torch.equal(guide(cond, None, 1.0), cond)
    assert torch.equal(guide(None, uncond, 0.0), uncond)
    torch.testing.assert_close(guide(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    with pytest.raises(ValueError):
        guide(cond, None, 2.0)


# -- prior, adapter, pipeline -------------------------------------------------------------------------------------


def _prior_and_adapter(kind: str = "transformer", d: int = 16) -> tuple[PriorDenoiser, ControlAdapter]:
    torch.manual_seed(0)
    prior = PriorDenoiser(d, width=32, layers=3, heads=4).eval()
    adapter = ControlAdapter(d, 2, 32, 3, prior.num_tokens, kind=kind, width=24, layers=2, heads=2).eval()
    return prior, adapter


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
def test_control_adapter_starts_exactly_at_the_prior(kind):
    prior, adapter = _prior_and_adapter(kind)
    x, t = torch.randn(4, 16), torch.tensor([0, 10, 500, 999])
    cond, controls = torch.randn(4, 1, 16), torch.randn(4, 2, 16)
    with torch.no_grad():
        plain = prior(x, t, cond)
        adapted = steered_x0(prior, adapter, x, t, cond, controls)
        assert torch.equal(adapted, plain)
        for layer in adapter.zero_outs:
            layer.bias.normal_()  # not a constant: LayerNorm would cancel a uniform shift
        assert not torch.allclose(steered_x0(prior, adapter, x, t, cond, controls), plain)


def test_dropped_condition_switches_the_adapter_off():
    prior, adapter = _prior_and_adapter()
    with torch.no_grad():
        for layer in adapter.zero_outs:
            layer.weight.normal_()
    x, t = torch.randn(2, 16), torch.tensor([3, 700])
    cond, controls = torch.randn(2, 1, 16), torch.randn(2, 2, 16)
    drop = torch.tensor([True, False])
    with torch.no_grad():
        out = steered_x0(prior, adapter, x, t, cond, controls, drop)
        assert torch.equal(out[0], prior(x, t, None)[0])
        assert torch.equal(out[1], steered_x0(prior, adapter, x, t, cond, controls)[1])


def test_pipeline_returns_normalised_embeddings_and_is_batch_independent():
    prior, adapter = _prior_and_adapter()
    pipe = FusionDiffPipeline(prior, NoiseSchedule(1000), adapter, embed_scale=4.0)
    ref, text = _unit(3, 16, seed=1), _unit(3, 16, seed=2)
    out = pipe(ref, text, num_inference_steps=10, guidance_scale=2.0, return_trajectory=True)
    assert isinstance(out, FusionDiffOutput)
    assert out.z0.shape == (3, 16) and out.trajectory.shape == (10, 3, 16)
    torch.testing.assert_close(out.z0.norm(dim=-1), torch.ones(3))
    assert torch.equal(out.trajectory[-1], out.z0)
    assert torch.equal(pipe(ref, text, guidance_scale=2.0).z0, out.z0)  # same seed, same result
    assert not torch.allclose(pipe(ref, text, guidance_scale=2.0, seed=1).z0, out.z0)
    single = torch.cat([pipe(ref[i : i + 1], text[i : i + 1], guidance_scale=2.0).z0 for i in range(3)])
    torch.testing.assert_close(single, out.z0, atol=1e-5, rtol=1e-4)
    stochastic = pipe(ref, text, num_inference_steps=50, eta=1.0, num_samples=2)
    torch.testing.assert_close(stochastic.z0.norm(dim=-1), torch.ones(3))


def test_cfg_scale_one_is_the_conditional_prediction():
    prior, adapter = _prior_and_adapter()
    pipe = FusionDiffPipeline(prior, NoiseSchedule(1000), adapter, embed_scale=4.0)
    x, t = torch.randn(3, 16), torch.tensor([999, 500, 1])
    ref, text = _unit(3, 16, seed=1), _unit(3, 16, seed=2)
    with torch.no_grad():
        cond = pipe.conditional_x0(x, t, text, ref)
        assert torch.equal(pipe.predict_x0(x, t, text, ref, 1.0), cond)
        assert torch.equal(pipe.predict_x0(x, t, text, ref, 0.0), prior(x, t, None))
        guided = pipe.predict_x0(x, t, text, ref, 3.0)
    torch.testing.assert_close(guided, prior(x, t, None) + 3.0 * (cond - prior(x, t, None)))


# -- the method ---------------------------------------------------------------------------------------------------


def test_stage_two_trains_only_the_adapter(tiny_backbone, table):
    method = _method(tiny_backbone)
    method.prepare_stage("adapter")
    prior_before = {k: v.clone() for k, v in method.prior.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in method.adapter.state_dict().items()}
    assert {id(p) for p in method.trainable_parameters("adapter")} == {id(p) for p in method.adapter.parameters()}
    method.train()
    optimizer = torch.optim.AdamW(method.trainable_parameters("adapter"), lr=1e-2)
    for _ in range(2):  # the second step moves more than the zero-initialised outputs
        optimizer.zero_grad()
        method.training_loss("adapter", _batch("synthetic_triplets", table))["loss"].backward()
        optimizer.step()
    for k, v in method.prior.state_dict().items():
        assert torch.equal(v, prior_before[k]), f"prior tensor {k} changed in stage 2"
    changed = [k for k, v in method.adapter.state_dict().items() if not torch.equal(v, adapter_before[k])]
    assert any(k.startswith("zero_outs") for k in changed) and any(not k.startswith("zero_outs") for k in changed)


def test_untrained_adapter_composes_exactly_like_the_prior_alone(tiny_backbone, table):
    method = _method(tiny_backbone)
    prior_only = _method(tiny_backbone, use_adapter=False)
    prior_only.prior.load_state_dict(method.prior.state_dict())
    ref = table.gather(torch.arange(3))
    with torch.no_grad():
        assert torch.equal(method.compose(ref, TEXTS), prior_only.compose(ref, TEXTS))


def test_ablation_switches_choose_the_stages(tiny_backbone):
    assert [s.name for s in _method(tiny_backbone).stages] == ["prior", "adapter"]
    prior_only = _method(tiny_backbone, use_adapter=False)
    assert [s.name for s in prior_only.stages] == ["prior"] and prior_only.adapter is None
    with pytest.raises(KeyError):
        prior_only.stage("adapter")
    scratch = _method(tiny_backbone, adapter_from_scratch=True)
    assert [s.name for s in scratch.stages] == ["adapter"]
    trained = {id(p) for p in scratch.trainable_parameters("adapter")}
    assert trained == {id(p) for p in [*scratch.prior.parameters(), *scratch.adapter.parameters()]}
    with pytest.raises(ValueError, match="use_adapter"):
        _method(tiny_backbone, use_adapter=False, adapter_from_scratch=True)


@pytest.mark.parametrize("stage", ["prior", "adapter"])
def test_eval_mode_loss_is_deterministic(tiny_backbone, table, stage):
    method = _method(tiny_backbone)
    kind = method.stage(stage).data
    batch = _batch(kind, table)
    with torch.no_grad():
        first = method.training_loss(stage, batch)["loss"]
        torch.manual_seed(123)
        assert torch.equal(method.training_loss(stage, batch)["loss"], first)


def test_from_scratch_stage_trains_prior_and_adapter_with_condition_dropout(tiny_backbone, table):
    method = _method(tiny_backbone, adapter_from_scratch=True, cond_drop=0.5)
    method.prepare_stage("adapter")
    method.train()
    loss = method.training_loss("adapter", _batch("synthetic_triplets", table))["loss"]
    loss.backward()
    assert method.prior.null_cond.grad is not None and method.prior.null_cond.grad.abs().sum() > 0


@pytest.mark.parametrize("config", [{"use_adapter": False}, {"adapter_kind": "mlp", "mix_weight": 0.3}])
def test_variants_save_and_load(tiny_backbone, table, tmp_path, config):
    method = _method(tiny_backbone, **config)
    with torch.no_grad():
        for p in [*method.prior.parameters(), *(method.adapter.parameters() if method.adapter else [])]:
            p.add_(0.01 * torch.randn_like(p))
    method.save(tmp_path / "ckpt")
    loaded = load_method(tmp_path / "ckpt", backbone=copy.deepcopy(tiny_backbone))
    ref = table.gather(torch.arange(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded.compose(ref, TEXTS), method.compose(ref, TEXTS))


# -- joint spaces -------------------------------------------------------------------------------------------------


def test_clip_joint_space_embeds_and_caches_texts(tiny_backbone, table):
    space = CLIPJointSpace(tiny_backbone, cache_size=10)
    assert isinstance(space, JointSpace) and space.dim == tiny_backbone.embed_dim
    feats = table.gather(torch.arange(3))
    v, t = space.embed(image=feats), space.embed(text=TEXTS)
    torch.testing.assert_close(space.embed(image=feats.embeds), v)
    torch.testing.assert_close(space.embed(image=feats, text=TEXTS), torch.nn.functional.normalize(v + t, dim=-1))
    for z in (v, t):
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    assert not space._cache
    torch.testing.assert_close(space.embed(text=TEXTS, cached=True), t, atol=1e-6, rtol=1e-5)
    assert len(space._cache) == 3
    torch.testing.assert_close(
        space.embed(text=[TEXTS[1], TEXTS[1]], cached=True), space._cache[TEXTS[1]].expand(2, -1)
    )
    full = CLIPJointSpace(tiny_backbone, cache_size=0)
    torch.testing.assert_close(full.embed(text=TEXTS, cached=True), t, atol=1e-6, rtol=1e-5)
    assert not full._cache


def test_mllm_joint_space_embeds_image_text_and_pair_offline(tiny_mllm_dir):
    from PIL import Image

    config = MLLMJointSpaceConfig(model_id=str(tiny_mllm_dir), dtype="float32", batch_size=2)
    space = MLLMJointSpace.from_pretrained(config, local_files_only=True)
    assert isinstance(space, JointSpace) and space.dim == 64
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((56, 56), (48, 64), (60, 60))
    ]
    outputs = {
        "image": space.embed(image=images),
        "text": space.embed(text=TEXTS),
        "pair": space.embed(image=images, text=TEXTS),
    }
    for name, z in outputs.items():
        assert z.shape == (3, 64) and torch.isfinite(z).all(), name
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    single = {
        "image": torch.cat([space.embed(image=[im]) for im in images]),
        "text": torch.cat([space.embed(text=[s]) for s in TEXTS]),
        "pair": torch.cat([space.embed(image=[im], text=[s]) for im, s in zip(images, TEXTS, strict=True)]),
    }
    for name, z in single.items():
        torch.testing.assert_close(z, outputs[name], atol=1e-5, rtol=1e-4, msg=name)
    assert not torch.allclose(outputs["pair"], outputs["image"])
    with pytest.raises(ValueError):
        space.embed(image=images[:2], text=TEXTS)
