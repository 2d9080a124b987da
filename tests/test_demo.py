"""The main job and the train/eval commands end to end on the quick Shapes world (the full demo's code path)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from cirlab.cli.main import main
from cirlab.experiments.demo import default_methods

pytestmark = pytest.mark.integration  # the main job and the commands end to end on the quick Shapes world


def test_quick_demo_writes_table_chart_and_report(quick_shapes_root, tmp_path, capsys):
    out, root = tmp_path / "demo", quick_shapes_root
    assert main(["demo", "--quick", "--out", str(out), "--root", str(root)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == set(default_methods())
    for name, r in results["methods"].items():
        summary = r["summary"]
        for split in ("cirr/test1", "circo/test"):
            assert {"all", "seen", "heldout"} <= set(summary[split]), f"{name} lacks seen/held-out parts on {split}"
        assert 0.0 <= summary["cirr/test1"]["all"]["recall_at_50"]["mean"] <= 100.0
    assert results["clip"]["i2t_r1"] > 5.0, "the Shapes CLIP learned nothing"
    showcase = results["showcase"]["queries"]
    assert showcase and all(set(q["top5"]) == set(default_methods()) for q in showcase)
    assert all(len(ranked) == 5 == len(set(ranked)) for q in showcase for ranked in q["top5"].values())
    with Image.open(out / "chart.png") as chart:
        assert chart.size[0] > 300
    report = (out / "report.html").read_text()
    assert all(name in report for name in default_methods()) and report.count("<img") > 20
    assert "CIRR R@1" in printed

    # A second run reuses the world and every trained method, on the shipped CLIP (nothing pretrained).
    assert main(["demo", "--quick", "--out", str(out), "--root", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "using the shipped Shapes CLIP" in printed and "pretraining" not in printed


def test_train_then_eval_a_checkpoint(quick_shapes_root, tmp_path, capsys):
    ckpt = tmp_path / "p2w"
    args = ["--quick", "--root", str(quick_shapes_root)]
    assert (
        main(
            [
                "train",
                "pic2word",
                "--dataset",
                "shapes",
                "--set",
                "mapping.steps=6",
                "--set",
                "mapping.eval_every=3",
                "--out",
                str(ckpt),
                *args,
            ]
        )
        == 0
    )
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
    metrics_file = tmp_path / "metrics.json"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(ckpt),
                "--dataset",
                "shapes",
                "--split",
                "cirr/test1",
                "--json",
                str(metrics_file),
                *args,
            ]
        )
        == 0
    )
    metrics = json.loads(metrics_file.read_text())
    assert {"all", "seen", "heldout"} <= set(metrics) and "recall_at_1" in metrics["all"]
    assert "reference image REMOVED" in capsys.readouterr().out


def test_train_rejects_unknown_override(quick_shapes_root, tmp_path):
    assert (
        main(
            [
                "train",
                "pic2word",
                "--set",
                "mapping.stepz=6",
                "--quick",
                "--root",
                str(quick_shapes_root),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        != 0
    )


def test_a_study_row_that_changes_only_stage_2_reuses_stage_1(quick_shapes_root, tmp_path):
    import torch

    from cirlab.experiments.shapes_env import prepare_shapes
    from cirlab.experiments.study import Row, run_study, study_table

    env = prepare_shapes(quick=True, root=quick_shapes_root, log=lambda message: None)
    short = ("stage1.steps=3", "stage1.eval_every=3", "stage2.steps=2", "stage2.eval_every=2")
    rows = [
        Row("m2c", "map-to-compose", overrides=short),
        Row("m2c: stage 1 only", "map-to-compose", "ablation", short, evaluation=("use_adapters=false",)),
        Row("m2c: synthetic 50%", "map-to-compose", "ablation", (*short, "synthetic.fraction=0.5")),
        Row("m2c: no VSI", "map-to-compose", "ablation", (*short, "method.use_vsi=false")),
    ]
    results = run_study(env, rows, [0], quick=True, runs=tmp_path / "runs", log=lambda message: None)
    train = {label: r["train"][0] for label, r in results["methods"].items()}
    assert train["m2c: synthetic 50%"]["stage1"].get("reused") and not train["m2c: synthetic 50%"]["stage2"].get(
        "reused"
    )
    assert not train["m2c: no VSI"]["stage1"].get("reused"), "a stage-1 change must retrain stage 1"
    assert not train["m2c"]["stage1"].get("reused")
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 3, [r.name for r in runs]
    # The copied stage 1 holds the donor's weights bit for bit.
    from safetensors.torch import load_file

    stage1 = [load_file(str(r / "stages" / "stage1" / "best" / "model.safetensors")) for r in runs]
    pairs = [(0, 1), (0, 2), (1, 2)]
    same = [all(torch.equal(stage1[i][k], stage1[j][k]) for k in stage1[i]) for i, j in pairs]
    assert sorted(same) == [False, False, True], "exactly the preset run and its stage-2 ablation share stage 1"
    # The evaluation-time switch gives the stage-1 model: other numbers than the full run, from the same run.
    all_full = results["methods"]["m2c"]["runs"][0]["cirr/test1"]["all"]
    all_stage1 = results["methods"]["m2c: stage 1 only"]["runs"][0]["cirr/test1"]["all"]
    assert all_full != all_stage1
    assert "m2c: synthetic 50%" in study_table(results, latency=True)


def test_a_row_the_seed_cannot_change_is_evaluated_once_for_every_seed(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from cirlab.experiments import study

    calls = []

    def fake_evaluate_row(row, env, seed, *args):
        calls.append((row.method, seed))
        metrics = {"cirr/val": {"all": {"recall_at_1": float(seed)}, "ms_per_query": 1.0}}
        return {"metrics": metrics, "train": {}, "seconds": {"train": 0.0, "evaluate": 0.0}}

    monkeypatch.setattr(study, "evaluate_row", fake_evaluate_row)
    env = SimpleNamespace(world=SimpleNamespace(world_id="w"), clip_metrics={})
    rows = [study.Row("sum", "sum"), study.Row("pic2word", "pic2word")]
    results = study.run_study(env, rows, [0, 1, 2], True, tmp_path, log=lambda m: None, splits=["cirr/val"])
    assert calls == [("sum", 0), ("pic2word", 0), ("pic2word", 1), ("pic2word", 2)]
    assert len(results["methods"]["sum"]["runs"]) == 3
    assert results["methods"]["pic2word"]["summary"]["cirr/val"]["all"]["recall_at_1"]["std"] > 0


def test_a_study_trains_its_missing_runs_in_worker_processes(quick_shapes_root, tmp_path):
    from cirlab.experiments.runs import is_trained, run_of
    from cirlab.experiments.shapes_env import prepare_shapes
    from cirlab.experiments.study import Row, run_study
    from cirlab.experiments.workers import TrainTask, pending_tasks

    env = prepare_shapes(quick=True, root=quick_shapes_root, log=lambda message: None)
    assert env.spec["quick"] and env.spec["root"] == str(quick_shapes_root)
    p2w = ("mapping.steps=2", "mapping.eval_every=2")
    comb = ("finetune.steps=2", "finetune.eval_every=2", "combiner.steps=2", "combiner.eval_every=2")
    rows = [Row("sum", "sum"), Row("p2w", "pic2word", overrides=p2w), Row("comb", "combiner", overrides=comb)]
    runs = tmp_path / "runs"
    tasks = [TrainTask("pic2word", p2w, 0), TrainTask("combiner", comb, 0), TrainTask("pic2word", p2w, 0)]
    # Each run once, the supervised (longest) first.
    assert pending_tasks(env, tasks, True, runs, False) == [tasks[1], tasks[0]]

    import torch

    logs: list[str] = []
    threads = torch.get_num_threads()
    results = run_study(env, rows, [0], quick=True, runs=runs, log=logs.append, jobs=2)
    assert torch.get_num_threads() == threads  # the caller's threads, lent out while workers ran, are back
    assert f"training 2 runs, 2 at a time ({max(1, threads // 2)} thread(s) each)" in logs
    assert sum("trained in" in line and "in a worker" in line for line in logs) == 2
    for method, overrides in [("pic2word", p2w), ("combiner", comb)]:
        assert is_trained(run_of(method, env, 0, True, runs, overrides)[1])
    assert set(results["methods"]) == {"sum", "p2w", "comb"}
    assert results["methods"]["comb"]["train"][0]["finetune"]["steps"] == 1  # 2 x an eighth, at least 1

    logs.clear()  # a second study finds the runs and trains nothing
    again = run_study(env, rows, [0], quick=True, runs=runs, log=logs.append, jobs=2)
    assert not any("trained in" in line or line.startswith("training") for line in logs)
    assert again["methods"]["comb"]["summary"] == results["methods"]["comb"]["summary"]
    assert pending_tasks(env, tasks, True, runs, False) == []
    assert pending_tasks(env, tasks, True, runs, True) == [tasks[1], tasks[0]]  # force: every run again
