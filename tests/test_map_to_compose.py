"""Map-to-Compose: the VSI block and LoRA start as identities, stage 2 trains only the adapters, checkpoints hold
the adapters, the real-backbone preset trains both stages on an ``hf-clip:<dir>`` backbone, and ``fit`` can run
stage 2 alone on top of an earlier stage-1 run.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cirlab.backbones import create_backbone
from cirlab.data.cirr import load_cirr
from cirlab.methods import create_method, load_method
from cirlab.methods.map_to_compose import MapToCompose, MapToComposeConfig
from cirlab.modules.injection import VisualSemanticInjection
from cirlab.modules.lora import LoRALinear, inject_lora, lora_disabled, lora_parameters
from cirlab.training.data import FeatureTable, Triplet, make_batch_fn
from cirlab.training.loop import train
from cirlab.training.run import fit, hard_negative_fn
from cirlab.training.run_config import load_run_config
from cirlab.training.sources import StageData

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
CAPTIONS = ["a large red circle at the top left", "a small blue square at the center", "a green star on the left"]
TEXTS = ["make the circle blue", "remove the square", "add a small green star"]


def _features(backbone, names: list[str], seed: int = 0) -> FeatureTable:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(names), 3, 32, 32, generator=gen)  # (N, 3, 32, 32)
    with torch.no_grad():
        feats = backbone.encode_image(pixels)
    return FeatureTable(names, feats.embeds, feats.tokens.half())


@pytest.fixture(scope="module")
def table(tiny_backbone) -> FeatureTable:
    return _features(tiny_backbone, [f"img{i}" for i in range(24)])


def _triplets(n: int = 24) -> list[Triplet]:
    return [Triplet(f"img{i}", TEXTS[i % 3], f"img{(i * 7 + 3) % n}") for i in range(n)]


def _batch(kind: str, table: FeatureTable, k_hard: int = 0, batch_size: int = 8) -> dict:
    captions = [[CAPTIONS[i % 3]] for i in range(len(table))]
    fn = make_batch_fn(
        kind,
        batch_size,
        seed=0,
        images=table,
        captions=captions,
        triplets=_triplets(len(table)),
        hard_negatives=hard_negative_fn(table, k_hard),
    )
    return fn(0, 0)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_vsi_with_gate_zero_returns_s0_exactly():
    torch.manual_seed(0)
    vsi = VisualSemanticInjection(token_dim=32, vision_width=48, heads=4)
    s0 = torch.randn(5, 32)  # (B, w_t)
    tokens = torch.randn(5, 17, 48).half()  # (B, 1 + n, w_v), as the feature cache stores them
    assert torch.equal(vsi(s0, tokens), s0)
    with torch.no_grad():
        vsi.gate.fill_(0.5)
    assert not torch.equal(vsi(s0, tokens), s0)
    with pytest.raises(ValueError, match="token states"):
        vsi(s0, torch.empty(5, 0, 0))
    with pytest.raises(ValueError, match="heads"):
        VisualSemanticInjection(token_dim=30, vision_width=48, heads=4)


def test_method_pseudo_word_at_init_is_phi(tiny_backbone, table):
    method = create_method("map-to-compose", tiny_backbone).eval()
    ref = table.gather(torch.arange(4))
    with torch.no_grad():
        s0 = method.phi(torch.nn.functional.normalize(ref.embeds, dim=-1))
        assert torch.equal(method.pseudo_tokens(ref), s0)


def test_lora_at_init_leaves_the_text_encoder_bit_identical(tiny_backbone):
    method = create_method("map-to-compose", tiny_backbone).eval()
    layers = [m for m in method.backbone.modules() if isinstance(m, LoRALinear)]
    # One q and one v projection per text layer, none in the image tower.
    assert len(layers) == 2 * len(tiny_backbone.model.text_model.encoder.layers)
    assert not any(isinstance(m, LoRALinear) for m in method.backbone.model.vision_model.modules())
    with torch.no_grad():
        tokens = tiny_backbone.tokenize(CAPTIONS)
        before = tiny_backbone.encode_text(tokens)
        after = method.backbone.encode_text(tokens)
    assert torch.equal(before.embeds, after.embeds) and torch.equal(before.tokens, after.tokens)


def test_inject_lora_rejects_typos_and_double_injection():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        inject_lora(layer, ["q_projection"])
    assert inject_lora(layer, ["0"], rank=2) == ["0"]
    assert set(layer.state_dict()) == {"0.weight", "0.bias", "0.lora_A", "0.lora_B"}
    with pytest.raises(ValueError, match="already"):
        inject_lora(layer, ["0"])


def test_building_the_method_leaves_the_shared_backbone_alone(tiny_backbone):
    before = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    method = create_method("map-to-compose", tiny_backbone)
    assert method.backbone is not tiny_backbone
    assert not any(isinstance(m, LoRALinear) for m in tiny_backbone.modules())
    after = tiny_backbone.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(p.requires_grad for p in tiny_backbone.parameters())


def test_stage2_trains_only_the_adapters(tiny_backbone, table):
    method = create_method("map-to-compose", tiny_backbone)
    method.prepare_stage("stage2")
    method.train()
    # The frozen mapping runs as at inference (no dropout), even in training mode.
    assert not method.phi.training and not method.vsi.training
    assert method.hard_negatives("stage2") == 8 and method.hard_negatives("stage1") == 0
    adapters = {id(p) for p in lora_parameters(method.backbone)}
    assert {id(p) for p in method.trainable_parameters("stage2")} == adapters
    before = _params(method)
    batch = _batch("synthetic_triplets", table, k_hard=8)
    assert batch["hard_negatives"].embeds.shape == (8 * 8, tiny_backbone.embed_dim)
    out = method.training_loss("stage2", batch)
    out["loss"].backward()
    torch.optim.AdamW(method.trainable_parameters("stage2"), lr=1e-2).step()
    after = _params(method)
    names = {n for n, p in method.named_parameters() if id(p) in adapters}
    for n in before:
        if n in names:
            continue
        assert torch.equal(before[n], after[n]), f"{n} changed in stage 2"
    assert any(not torch.equal(before[n], after[n]) for n in names if n.endswith("lora_B"))


def test_stage1_loss_has_both_terms_and_the_switches_work(tiny_backbone, table):
    batch = _batch("pairs", table)
    method = create_method("map-to-compose", tiny_backbone).eval()
    out = method.training_loss("stage1", batch)
    assert set(out) == {"loss", "contrastive", "soft"}
    torch.testing.assert_close(out["loss"], out["contrastive"] + out["soft"])
    assert out["soft"] >= 0
    plain = create_method("map-to-compose", tiny_backbone, {"use_vsi": False, "lambda_soft": 0.0}).eval()
    assert plain.vsi is None and not any(n.startswith("vsi.") for n in plain.trained_state_dict())
    assert set(plain.training_loss("stage1", batch)) == {"loss", "contrastive"}


def test_checkpoint_holds_the_adapters_and_round_trips(tiny_backbone, table, tmp_path):
    torch.manual_seed(0)
    method = create_method("map-to-compose", tiny_backbone).eval()
    with torch.no_grad():
        for p in [*lora_parameters(method.backbone), method.vsi.gate]:
            p.add_(0.1 * torch.randn_like(p))
    method.save(tmp_path / "ckpt")
    saved = set(load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    lora_keys = {k for k in saved if ".lora_" in k}
    assert len(lora_keys) == 2 * 2 * len(tiny_backbone.model.text_model.encoder.layers)
    backbone_own = {f"backbone.{k}" for k in tiny_backbone.state_dict()}
    assert not saved & backbone_own, "frozen backbone tensors (e.g. q_proj.weight) were saved"
    loaded = load_method(tmp_path / "ckpt", backbone=tiny_backbone)
    ref = table.gather(torch.arange(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded.compose(ref, TEXTS), method.compose(ref, TEXTS), rtol=0, atol=0)
        # Switching the adapters off gives back the adapter-free (stage-1) model.
        with method.without_adapters():
            stage1 = method.compose(ref, TEXTS)
        with lora_disabled(loaded.backbone):
            torch.testing.assert_close(loaded.compose(ref, TEXTS), stage1)
        loaded.config.use_adapters = False
        torch.testing.assert_close(loaded.compose(ref, TEXTS), stage1)
    assert not torch.allclose(stage1, method.compose(ref, TEXTS))


def test_real_backbone_preset_trains_both_stages(tiny_backbone_dir, tmp_path):
    run_cfg = load_run_config("map-to-compose", "hf-clip-l14")
    assert run_cfg.stage1.bf16 and run_cfg.stage2.bf16 and run_cfg.method.k_hard == 8
    backbone = create_backbone(f"hf-clip:{tiny_backbone_dir}").freeze()
    method = create_method("map-to-compose", backbone, run_cfg.method)
    assert isinstance(method, MapToCompose) and method.config.prompt == "a photo of $ that {text}"
    table = _features(backbone, [f"img{i}" for i in range(24)], seed=1)
    captions = [[CAPTIONS[i % 3]] for i in range(len(table))]
    for stage in ("stage1", "stage2"):
        cfg = dataclasses.replace(getattr(run_cfg, stage), steps=1, batch_size=8, progress=False)
        method.prepare_stage(stage)
        batch_fn = make_batch_fn(
            method.stage(stage).data,
            cfg.batch_size,
            cfg.seed,
            images=table,
            captions=captions,
            triplets=_triplets(),
            hard_negatives=hard_negative_fn(table, method.hard_negatives(stage)),
        )
        before = _params(method)
        result = train(
            method,
            method.trainable_parameters(stage),
            batch_fn,
            lambda b, stage=stage: method.training_loss(stage, b),
            cfg,
            tmp_path / stage,
            resume=False,
        )
        assert result.steps == 1
        trained = {n for n, p in method.named_parameters() if p.requires_grad}
        changed = {n for n, p in method.named_parameters() if not torch.equal(before[n], p.detach())}
        assert changed and changed <= trained, f"{stage} changed frozen tensors {sorted(changed - trained)[:3]}"


class _FakeSource:
    """The parts of ``ShapesSource`` that ``fit`` reads: a CIRR-format fixture split with random features (the
    image encoder stays frozen, so the method-aware accessors return the same tables)."""

    def __init__(self, backbone) -> None:
        self.val = load_cirr(FIXTURES / "cirr", None, "val")
        names = list(dict.fromkeys([*self.val.gallery, *(q.reference for q in self.val.queries)]))
        self.val_features = _features(backbone, names, seed=2)
        self.train_features = _features(backbone, [f"img{i}" for i in range(24)], seed=3)

    def split(self, name: str):
        return self.val

    def features(self, name: str, backbone, with_tokens: bool = False) -> FeatureTable:
        return self.val_features

    def features_for(self, method, name: str) -> FeatureTable:
        return self.val_features

    def stage_data(self, request, synthetic=None) -> StageData:
        if request.kind == "pairs":
            return StageData(images=self.train_features, captions=[[CAPTIONS[i % 3]] for i in range(24)])
        return StageData(images=self.train_features, triplets=_triplets(), info={"triplets": 24})


def test_fit_runs_stage2_alone_on_top_of_an_earlier_stage1(tiny_backbone, tmp_path):
    overrides = [f"{s}.{k}={v}" for s in ("stage1", "stage2") for k, v in (("steps", 3), ("batch_size", 8))]
    run_cfg = load_run_config("map-to-compose", None, overrides)
    source = _FakeSource(tiny_backbone)
    torch.manual_seed(0)
    first = create_method("map-to-compose", tiny_backbone, run_cfg.method)
    report = fit(first, source, run_cfg, tmp_path, stages=["stage1"], progress=False)
    assert set(report) == {"stage1"}
    stage1 = load_file(str(tmp_path / "stages" / "stage1" / "best" / "model.safetensors"))

    torch.manual_seed(1)  # a different initialisation: only loading stage 1's weights makes phi match
    second = create_method("map-to-compose", tiny_backbone, run_cfg.method)
    report = fit(second, source, run_cfg, tmp_path, stages=["stage2"], progress=False)
    assert set(report) == {"stage2"}
    state = second.state_dict()
    for key in (k for k in stage1 if not k.startswith("backbone.")):
        assert torch.equal(state[key], stage1[key]), f"{key} is not stage 1's"
    final = load_method(tmp_path, backbone=tiny_backbone)
    assert any(p.abs().sum() > 0 for n, p in final.named_parameters() if n.endswith("lora_B"))


def test_config_defaults_follow_methods_md():
    c = MapToComposeConfig()
    assert (c.lora_rank, c.k_hard, c.soft_temperature, c.use_vsi) == (8, 8, 0.05, True)
    assert c.lora_targets == ["q_proj", "v_proj"] and c.prompt == "a photo of $ that {text}"
    shapes = load_run_config("map-to-compose", "shapes")
    assert shapes.method.prompt == "$ {text}" and shapes.synthetic.fraction == 1.0
    assert copy.deepcopy(c) == c
