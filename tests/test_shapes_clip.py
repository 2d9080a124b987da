"""The Shapes CLIP: alt-text captions and their truth, hard-negative batches, the multi-positive loss, pretraining,
the shipped weights and the calibration checks."""

from __future__ import annotations

import csv
import json
import math
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cirlab.backbones.shapes_clip import RECORD_FILE, shapes_clip, shipped_dir, shipped_record, verify
from cirlab.backbones.tiny import SmallCLIPConfig
from cirlab.cli.search import default_backbone
from cirlab.config import from_dict, to_dict
from cirlab.data.benchmark import CIRQuery, CIRSplit, Protocol
from cirlab.data.shapes import SceneConfig, ShapesConfig, eval_caption, sample_scene
from cirlab.data.shapes.alttext import AltTextConfig, Claim, ObjectClaim, alt_caption, truth_matrix
from cirlab.data.shapes.edits import one_step_edits
from cirlab.data.shapes.pretraining import near_duplicate, pretrain_batch, scene_groups
from cirlab.data.shapes.world import RenderConfig, Scene
from cirlab.experiments.calibrate import PEERS, ROWS, SPLITS, checks, composition_split, oracle_split
from cirlab.experiments.shapes_env import shipped_fits
from cirlab.modules.losses import info_nce, multi_positive_nce
from cirlab.training.clip_pretrain import (
    CLIPPretrainConfig,
    export_pretrained,
    heldout_scenes,
    modality_gap_for,
    pretrain_clip,
    retrieval_recall,
)
from cirlab.training.loop import TrainConfig

EDIT_WORDS = ("make", "remove", "instead", "add", "change", "turn", "replace", "now", "same")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_an_alt_text_caption_is_true_of_its_scene_and_says_no_edit(seed):
    rng = random.Random(seed)
    scene = sample_scene(rng, SceneConfig())
    text, claim = alt_caption(scene, rng)
    assert claim.true_of(scene)
    assert not set(text.replace(",", " ").replace(":", " ").split()) & set(EDIT_WORDS), text


def test_claims_mean_what_they_say():
    scene = Scene.parse("0:large:red:circle|4:small:blue:square")
    assert Claim((ObjectClaim(colour="red"),)).true_of(scene)
    assert not Claim((ObjectClaim(colour="green"),)).true_of(scene)
    # Two mentions need two distinct objects.
    assert not Claim((ObjectClaim(shape="circle"), ObjectClaim(colour="red"))).true_of(scene)
    assert Claim((ObjectClaim(shape="square"), ObjectClaim(colour="red"))).true_of(scene)
    assert Claim((ObjectClaim(size="small", cell=4),), count=2).true_of(scene)
    assert not Claim((ObjectClaim(size="small", cell=4),), count=3).true_of(scene)
    full = Claim((ObjectClaim("large", "red", "circle", 0),), complete=True)
    assert not full.true_of(scene)  # complete, but the square is not mentioned
    assert full.true_of(Scene.parse("0:large:red:circle"))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_the_truth_matrix_is_claim_true_of_for_every_pair(seed, full):
    rng = random.Random(seed)
    scenes = scene_groups(rng, SceneConfig(), 24, 3)
    claims = [alt_caption(s, rng, AltTextConfig(full=full))[1] for s in scenes]
    expected = np.array([[c.true_of(s) for c in claims] for s in scenes])
    np.testing.assert_array_equal(truth_matrix(scenes, claims), expected)


def test_hard_negative_groups_are_one_step_apart_and_hold_no_heldout_combination():
    cfg = SceneConfig()
    rng = random.Random(3)
    scenes = scene_groups(rng, cfg, 64, 4)
    assert len(scenes) == 64
    for start in range(0, 64, 4):
        group = scenes[start : start + 4]
        assert len(set(group)) == 4
        for s in group:
            assert not s.combos() & cfg.heldout
            assert cfg.min_objects <= len(s) <= cfg.max_objects
        # Each member after the first is one step (edit or added object) from an earlier member.
        for k, s in enumerate(group[1:], start=1):
            earlier = group[:k]
            one_step = {e.apply(x) for x in earlier for e in one_step_edits(x, cfg.shapes, cfg.colours)}
            added = any(set(x.objects) < set(s.objects) and len(s) == len(x) + 1 for x in earlier)
            assert s in one_step or added
    assert near_duplicate(Scene.parse("0:large:red:circle"), cfg, random.Random(0)) is not None


def test_a_pretraining_batch_is_a_pure_function_of_seed_and_step():
    args = (16, 4, SceneConfig(), RenderConfig(), AltTextConfig())
    a, b, c = pretrain_batch(0, 5, 0, *args), pretrain_batch(0, 5, 0, *args), pretrain_batch(0, 6, 0, *args)
    assert a.captions == b.captions and np.array_equal(a.images, b.images)
    assert a.captions != c.captions
    assert a.images.shape == (16, 64, 64, 3) and a.positives.shape == (16, 16)
    assert a.positives.diagonal().all()


def test_multi_positive_nce_is_clip_loss_with_one_positive_and_rewards_every_true_caption():
    torch.manual_seed(0)
    v, t = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    eye = torch.eye(8, dtype=torch.bool)
    clip = info_nce(v, t, temperature=1 / 20.0, symmetric=True)
    torch.testing.assert_close(multi_positive_nce(v, t, eye, 20.0), clip)
    # A caption true of two images: the loss no longer pushes either image away from it.
    both = eye.clone()
    both[0, 1] = True
    t2 = t.clone()
    t2[1] = v[0]
    assert multi_positive_nce(v, t2, both, 20.0) < multi_positive_nce(v, t2, eye, 20.0)


def _tiny_pretrain_config(steps: int) -> CLIPPretrainConfig:
    model = SmallCLIPConfig(image_size=32, patch_size=8, vision_width=32, text_width=32, embed_dim=32)
    train = TrainConfig(steps=steps, batch_size=32, lr=2e-3, weight_decay=0.0, eval_every=steps, progress=False)
    return CLIPPretrainConfig(
        model=model, train=train, render=RenderConfig(image_size=32), tokenizer_texts=400, eval_scenes=64
    )


def test_pretraining_learns_and_exports_a_verified_loadable_model(tmp_path):
    cfg = _tiny_pretrain_config(30)
    cfg.train.log_every = 1
    backbone, metrics = pretrain_clip(cfg, tmp_path / "run", seed=0)
    with open(tmp_path / "run" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert set(metrics) >= {"i2t_r1", "t2i_r1"}
    export_pretrained(backbone, cfg, metrics, "cirlab shapes-pretrain test", tmp_path / "shapes-clip")
    record = json.loads((tmp_path / "shapes-clip" / RECORD_FILE).read_text())
    assert record["command"] == "cirlab shapes-pretrain test" and "model.safetensors" in record["files"]
    # The record names the gap that lifts the trained logit scale to CLIP's 100, and loading applies it.
    scale = float(backbone.model.logit_scale.detach().exp())
    assert scale < 100 and record["modality_gap"] == pytest.approx(math.sqrt((100 / scale) ** 2 - 1))
    loaded = shapes_clip(str(tmp_path / "shapes-clip"))
    assert loaded.modality_gap == record["modality_gap"] and loaded.name.endswith(f"#gap={record['modality_gap']!r}")
    assert float(loaded.model.logit_scale.detach().exp()) == pytest.approx(100.0, rel=1e-4)
    assert loaded.embed_dim == backbone.embed_dim + 1
    pixels = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_image(pixels).embeds[:, :-1], backbone.encode_image(pixels).embeds)
    plain = shapes_clip(str(tmp_path / "shapes-clip"), modality_gap=0.0)  # `shapes-clip:<dir>#gap=0`
    torch.testing.assert_close(plain.encode_image(pixels).embeds, backbone.encode_image(pixels).embeds)
    assert modality_gap_for(120.0, 100.0) == 0.0 and modality_gap_for(50.0, None) == 0.0
    # A damaged file is named, never loaded.
    weights = tmp_path / "shapes-clip" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        shapes_clip(str(tmp_path / "shapes-clip"))


def test_the_shipped_clip_is_intact_and_fits_the_default_worlds_only(tmp_path):
    record = shipped_record()
    verify(shipped_dir(), record)
    # The recorded held-out retrieval is what the shipped weights do (the threshold is `shapes-calibrate`'s check).
    cfg = from_dict(CLIPPretrainConfig, record["config"])
    images, captions = heldout_scenes(cfg.scene, cfg.render, cfg.eval_scenes)
    measured = retrieval_recall(shapes_clip(), images, captions)
    assert measured["i2t_r1"] == pytest.approx(record["metrics"]["i2t_r1"], abs=0.2)
    assert shipped_fits(ShapesConfig(), record) and shipped_fits(ShapesConfig.quick(seed=3), record)
    differing = to_dict(ShapesConfig())
    differing["scene"]["heldout_combos"] = ["red circle"]
    assert not shipped_fits(from_dict(ShapesConfig, differing), record)
    # A record that lacks a renderer field (one added since) does not fit, whatever that field's default draws.
    older = json.loads(json.dumps(record))
    older["config"]["render"].pop("background")
    assert not shipped_fits(ShapesConfig(), older)
    # Index builds without --backbone use it, whether or not a CLIP was ever built under runs/.
    assert default_backbone(tmp_path) == "shapes-clip"
    copy = tmp_path / "copy"
    shutil.copytree(shipped_dir(), copy)
    (copy / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        verify(copy, record)


def _report(means: dict[str, tuple[float, float]], std: float = 0.5, oracle: float = 90.0, i2t: float = 97.0):
    """A calibration report with the given (CIRR R@1, CIRCO mAP@10) test means per row."""
    summary = {}
    for row, (r1, map10) in means.items():
        summary[row] = {
            "summary": {
                SPLITS["test"][0]: {"all": {"recall_at_1": {"mean": r1, "std": std}}},
                SPLITS["test"][1]: {"all": {"map_at_10": {"mean": map10, "std": std}}},
            }
        }
    return {
        "rows": {"methods": summary},
        "backbone": {"heldout": {"i2t_r1": i2t}, "oracle/test/cirr": {"recall_at_1": oracle}},
    }


def test_calibration_checks_pass_on_the_published_order_and_fail_when_it_is_inverted():
    good = {"image-only": (7, 5), "sum": (12, 8), "text-only": (1, 1), "pic2word": (20, 12), "searle": (21, 13)}
    good |= {"lincir": (22, 14), "combiner": (45, 30)}
    assert set(good) == set(ROWS)
    assert all(c.passed for c in checks(_report(good), quick=False))
    bad = good | {"sum": (2, 3)}  # the text hurts: image-only > sum
    failed = {c.name for c in checks(_report(bad), quick=False) if not c.passed}
    assert "CIRR R@1: image-only < sum" in failed and "CIRCO mAP@10: image-only < sum" in failed
    close = good | {"combiner": (25, 30)}  # above every peer, but not 1.5x the best one
    assert [c.name for c in checks(_report(close), quick=False) if not c.passed] == ["combiner / best peer, CIRR R@1"]
    # The order holds and the combiner is 1.5x the best peer, but it leads sum by 9.5 points only.
    narrow = good | {
        "sum": (13, 8),
        "pic2word": (14, 12),
        "searle": (14.5, 13),
        "lincir": (15, 14),
        "combiner": (22.5, 30),
    }
    assert [c.name for c in checks(_report(narrow), quick=False) if not c.passed] == ["combiner - sum, CIRR R@1"]
    noisy = [c for c in checks(_report(good, std=2.0), quick=False) if not c.passed]
    assert [c.group for c in noisy] == ["headroom"]
    weak = [c.name for c in checks(_report(good, oracle=60.0, i2t=80.0), quick=False) if not c.passed]
    assert weak == ["held-out-scene i2t R@1", "target-caption oracle CIRR R@1"]
    # The quick world is held to the order checks only.
    assert {c.group for c in checks(_report(good, std=2.0, oracle=10.0), quick=True)} == {"order"}
    assert all(p in ROWS for p in PEERS)


def test_the_composition_and_oracle_splits_rewrite_only_the_texts():
    rng = random.Random(3)
    ref, tgt = sample_scene(rng, SceneConfig(), n_objects=2), sample_scene(rng, SceneConfig(), n_objects=3)
    query = CIRQuery("q0", "ref.png", "make it blue", ["make it blue"], ["tgt.png"], subset=["ref.png", "tgt.png"])
    protocol = Protocol(family="cirr", remove_reference=True, has_ground_truth=True, recall_ks=(1,))
    split = CIRSplit("cirr", "val", None, [query], ["ref.png", "tgt.png"], protocol)
    meta = {"q0": {"reference_scene": ref.to_str(), "target_scene": tgt.to_str()}}
    (composed,) = composition_split(split, meta).queries
    (oracle,) = oracle_split(split, meta).queries
    assert composed.text == f"{eval_caption(ref)}, make it blue"
    assert oracle.text == eval_caption(tgt)
    for q in (composed, oracle):
        assert (q.reference, q.targets, q.subset) == (query.reference, query.targets, query.subset)
