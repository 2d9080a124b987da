"""The training loop: exact resume after a kill, best-on-validation selection, accumulation, EMA, logging."""

from __future__ import annotations

import copy
import csv

import pytest
import torch

from _distributed_worker import train_mapping
from cirlab.methods import load_method
from cirlab.training.data import FeatureTable, epoch_indices
from cirlab.training.loop import TrainConfig, lr_factor, train


@pytest.fixture(scope="module")
def table(tiny_backbone) -> FeatureTable:
    pixels = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = tiny_backbone.encode_image(pixels)
    return FeatureTable([f"i{i}" for i in range(40)], feats.embeds)


def _run(tiny_backbone, table, out_dir, cfg, stop_after=None):
    return train_mapping(copy.deepcopy(tiny_backbone), None, table, cfg, out_dir, 10, stop_after)


CFG = TrainConfig(steps=24, batch_size=8, lr=3e-3, eval_every=6, progress=False, log_every=2, seed=3)


def test_resume_after_kill_matches_uninterrupted_run(tiny_backbone, table, tmp_path):
    full, full_result = _run(tiny_backbone, table, tmp_path / "full", CFG)
    _, partial = _run(tiny_backbone, table, tmp_path / "killed", CFG, stop_after=9)
    assert partial.steps == 9
    resumed, resumed_result = _run(tiny_backbone, table, tmp_path / "killed", CFG)
    for (n, a), (_, b) in zip(full.phi.named_parameters(), resumed.phi.named_parameters(), strict=True):
        assert torch.equal(a, b), f"{n} differs after resume"
    assert resumed_result.best_metrics == full_result.best_metrics
    assert resumed_result.best_step == full_result.best_step
    with (tmp_path / "full" / "metrics.csv").open() as f1, (tmp_path / "killed" / "metrics.csv").open() as f2:
        assert list(csv.DictReader(f1)) == list(csv.DictReader(f2))


def test_best_checkpoint_is_selected_on_validation_and_loads(tiny_backbone, table, tmp_path):
    _method, result = _run(tiny_backbone, table, tmp_path / "run", CFG)
    scores = {int(r["step"]): float(r["val/score"]) for r in result.history if r.get("val/score") not in (None, "")}
    assert set(scores) == {6, 12, 18, 24}
    assert result.best_step == max(scores, key=scores.get)
    best = load_method(tmp_path / "run" / "best", backbone=copy.deepcopy(tiny_backbone))
    assert best.name == "pic2word"


def test_grad_accumulation_matches_a_big_batch(tmp_path):
    # A per-example (decomposable) loss: two micro-batches of 4 must equal one batch of 8. (In-batch contrastive
    # losses are not decomposable, so accumulation changes their negatives by design.)
    data = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    target = data @ torch.arange(5.0)
    results = []
    for batch_size, accum in ((8, 1), (4, 2)):
        module = torch.nn.Linear(5, 1)
        torch.nn.init.zeros_(module.weight)
        torch.nn.init.zeros_(module.bias)

        def batch_fn(step, micro, batch_size=batch_size):
            start = step * 8 + micro * batch_size
            return slice(start, start + batch_size)

        def loss_fn(sl, module=module):
            return {"loss": ((module(data[sl]).squeeze(1) - target[sl]) ** 2).mean()}

        cfg = TrainConfig(steps=6, batch_size=batch_size, grad_accum=accum, lr=0.05, warmup=0.0, progress=False)
        train(module, list(module.parameters()), batch_fn, loss_fn, cfg, tmp_path / f"{accum}", resume=False)
        results.append(module.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


def test_ema_and_bf16_run(tiny_backbone, table, tmp_path):
    cfg = TrainConfig(steps=5, batch_size=8, ema_decay=0.9, bf16=True, progress=False)
    _method, result = _run(tiny_backbone, table, tmp_path / "ema", cfg)
    assert result.steps == 5 and (tmp_path / "ema" / "best" / "model.safetensors").is_file()


def test_schedule_and_data_order():
    cfg = TrainConfig(steps=100, warmup=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) < 0.01
    seen = torch.cat([epoch_indices(10, 4, s, 0, 1, seed=0) for s in range(5)])  # 20 = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(epoch_indices(10, 4, 3, 0, 1, 0), epoch_indices(10, 4, 3, 0, 1, 0))


def test_non_finite_loss_stops_with_a_clear_error(tiny_backbone, tmp_path):
    p = torch.nn.Parameter(torch.zeros(2))
    module = torch.nn.Module()
    module.p = p
    with pytest.raises(FloatingPointError, match="loss is nan"):
        train(
            module,
            [p],
            lambda s, m: None,
            lambda b: {"loss": p.sum() * float("nan")},
            TrainConfig(steps=2, progress=False),
            tmp_path,
        )


def test_learning_rate_scales_multiply_a_parameters_steps(tmp_path):
    """Adam's first step moves each weight by about lr, so a 10x group moves 10x as far as a 1x group."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), torch.nn.Linear(3, 3, bias=False))
    start = [p.detach().clone() for p in module.parameters()]
    x = torch.randn(16, 3)
    cfg = TrainConfig(
        steps=1, lr=1e-3, warmup=0.0, schedule="constant", max_grad_norm=0, weight_decay=0.0, progress=False
    )
    train(
        module,
        list(module.parameters()),
        lambda step, micro: x,
        lambda b: {"loss": module(b).pow(2).sum()},
        cfg,
        tmp_path,
        lr_scales={id(module[1].weight): 10.0},
    )
    moved = [float((p.detach() - s).abs().mean()) for p, s in zip(module.parameters(), start, strict=True)]
    assert moved[0] == pytest.approx(1e-3, rel=0.05)
    assert moved[1] == pytest.approx(1e-2, rel=0.05)


def test_progress_bar_shows_no_loss_until_a_step_has_run():
    """A stage resumed at its end runs no step: its bar says "loss -", not "loss nan" (which reads as divergence)."""
    from cirlab.training.loop import _progress

    bar = _progress(True, "stage", total=10, start=10)
    try:
        assert bar.bar.tasks[0].fields["loss"] == "-"
        bar.advance(0.123456)
        assert bar.bar.tasks[0].fields["loss"] == "0.1235"
    finally:
        bar.close()
