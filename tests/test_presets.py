"""Packaged presets: every one loads into its method's run config and says where its numbers come from; every
real-data preset passes `cirlab train METHOD --preset NAME --dry-run` on corpora the test writes (the Shapes-world
presets' dry runs are slow tests)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from _corpora import (
    image_bytes,
    write_captions,
    write_cirr,
    write_fashioniq,
    write_image_folder,
    write_shards,
    write_triplets,
)
from cirlab.cli.main import main
from cirlab.config import to_dict
from cirlab.data.benchmark import load_splits
from cirlab.methods import METHODS
from cirlab.training.dry_run import DryRun, dry_run_config
from cirlab.training.run_config import load_run_config, resolve_dataset

CONFIGS = Path(str(resources.files("cirlab") / "configs"))
PRESETS = sorted((p.parent.name, p.stem) for p in CONFIGS.glob("*/*.yaml"))
CORPUS_PRESETS = [(p, m) for p, m in PRESETS if load_run_config(m, p).data.used()]
# The Qwen2.5-VL preset fuses pairs in a multimodal LLM's space, which no Shapes-world backbone provides: its dry
# run reads corpora instead (test_dry_run_of_the_mllm_preset).
SHAPES_PRESETS = [(p, m) for p, m in PRESETS if (p, m) not in CORPUS_PRESETS and p != "qwen25vl-72b"]
# Fusion-Diff's preset keeps its 1024-wide, 8-block denoiser in the dry run (about a minute on 2 CPU cores).
SLOW_DRY_RUNS = {("cc3m-vitl14", "fusion-diff")}


def test_the_issue_presets_exist():
    names = {f"{p}/{m}" for p, m in CORPUS_PRESETS}
    assert {"cc3m-vitl14/pic2word", "imagenet-vitl14/searle", "cc3m-vitl14/lincir", "cc3m-vitl14/map-to-compose",
            "cc3m-vitl14/fusion-diff", "cirr-vitl14/tmcir", "fashioniq-vitl14/tmcir", "cirr-vitl14/combiner",
            "fashioniq-vitl14/combiner"} <= names  # fmt: skip


@pytest.mark.parametrize(("preset", "method"), PRESETS)
def test_every_preset_loads_and_states_its_source(preset, method):
    assert method in METHODS
    cfg = load_run_config(method, preset)
    text = (CONFIGS / preset / f"{method}.yaml").read_text()
    assert text.startswith("#"), "a preset opens with a comment saying where its numbers come from"
    if cfg.data.used():
        assert cfg.backbone.partition("#")[0] == "hf-clip:openai/clip-vit-large-patch14"
        assert cfg.data.val, "real-data presets validate on a benchmark split"


def test_dry_run_config_only_shrinks(tmp_path):
    cfg = load_run_config("map-to-compose", "cc3m-vitl14")
    small = dry_run_config(cfg, DryRun(steps=3, batch_size=2, limit=5))
    assert small.backbone == "tiny" and small.data.limit == 5
    assert (small.stage1.steps, small.stage1.batch_size, small.stage1.bf16) == (3, 2, False)
    assert small.stage2.lr == cfg.stage2.lr and small.method == cfg.method and small.data.images == cfg.data.images


@pytest.mark.parametrize("preset", ["imagenet-vitl14", "hf-clip-l14", "shapes"])
def test_dry_run_caps_searles_oti_budget_and_the_preset_keeps_its_own(preset):
    """OTI inverts every training image for hundreds of steps before the first stage step; a dry run of a SEARLE
    preset on the Shapes world ran past 15 minutes inside it, so the dry run caps OTI as it caps the stages."""
    cfg = load_run_config("searle", preset)
    small = dry_run_config(cfg, DryRun(steps=3, batch_size=2, limit=5))
    assert small.method.oti.steps == min(cfg.method.oti.steps, 3)
    assert small.method.oti_images == (min(cfg.method.oti_images, 5) if cfg.method.oti_images else 5)
    assert small.method.oti.lr == cfg.method.oti.lr and small.method.concepts == cfg.method.concepts
    assert to_dict(load_run_config("searle", preset)) == to_dict(cfg)  # the preset itself is unchanged


def test_dry_run_swaps_a_multimodal_llm_for_a_tiny_one(tmp_path):
    cfg = load_run_config("fusion-diff", "qwen25vl-72b", ["backbone=mllm:Qwen/Qwen2.5-VL-72B-Instruct"])
    small = dry_run_config(cfg, workdir=tmp_path)
    assert small.backbone == f"mllm:{tmp_path / 'tiny-mllm'}" and (tmp_path / "tiny-mllm" / "config.json").is_file()
    assert cfg.backbone == "mllm:Qwen/Qwen2.5-VL-72B-Instruct" and small.method == cfg.method


def test_dataset_choice_is_checked(tmp_path):
    cfg = load_run_config("pic2word", "cc3m-vitl14")
    with pytest.raises(ValueError, match="shapes"):
        resolve_dataset(cfg, "shapes")
    with pytest.raises(ValueError, match="is not a folder"):
        resolve_dataset(cfg, "imagefolder")
    assert resolve_dataset(load_run_config("pic2word", "shapes"), "auto")[1] == "shapes"
    cfg, kind = resolve_dataset(load_run_config("combiner", "shapes"), "cirr", annotations=tmp_path, images=tmp_path)
    assert kind == "corpus" and cfg.data.benchmark == "cirr" and cfg.data.annotations == str(tmp_path)


def _pseudo_folder(root: Path, split) -> None:
    """A pseudo-target folder in the layout `generate_pseudo_targets` writes (manifest.jsonl + images/)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, q in enumerate(split.queries):
        (root / "images" / f"{q.qid}.png").write_bytes(image_bytes(i + 7))
        source = {"key": q.qid, "reference": q.reference, "text": q.text, "target": q.targets[0]}
        lines.append(json.dumps({"key": q.qid, "image": f"images/{q.qid}.png", "generator": "test", "seed": 0,
                                 "source": source, "noise": None}))  # fmt: skip
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("preset-data")
    pattern, keys = write_shards(root / "wds", 3, 4)
    write_image_folder(root / "imgs", n=10)
    write_captions(root / "captions.txt", 16)
    lines = [{"reference": keys[i], "text": "make it blue", "target": keys[(i + 1) % len(keys)]} for i in range(8)]
    (root / "triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cirr = write_cirr(root / "cirr-root", 10)
    fiq = write_fashioniq(root / "fiq-root", 6)
    (train,) = load_splits("cirr", cirr[0], cirr[1], "train")
    _pseudo_folder(root / "cirr-pseudo", train)
    for category in ("dress", "shirt", "toptee"):
        (split,) = load_splits("fashioniq", fiq[0], fiq[1], "train", category=category)
        _pseudo_folder(root / "fiq-pseudo" / category, split)
    (root / "classes.csv").write_text("LabelName,DisplayName\n/m/01,Dog\n/m/02,Cat\n/m/03,Tree\n")
    phrases = {"Dog": ["a photo of Dog that runs"], "Cat": ["a photo of Cat that sleeps"], "Tree": ["a Tree"]}
    (root / "phrases.json").write_text(json.dumps(phrases))
    return {
        "root": root,
        "shards": pattern,
        "cirr": cirr,
        "fashioniq": fiq,
        "tagger": _pos_pipeline(root / "pos"),
        "vocabulary": root / "classes.csv",
        "phrases": root / "phrases.json",
    }


def _pos_pipeline(path: Path) -> Path:
    """A small spaCy pipeline that tags a few words (LinCIR's tagger), saved to ``path``."""
    import spacy

    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("attribute_ruler")
    ruler.add([[{"LOWER": {"IN": ["a", "an", "the"]}}]], {"POS": "DET"})
    ruler.add([[{"IS_ALPHA": True, "LENGTH": {">": 3}}]], {"POS": "NOUN"})
    nlp.to_disk(path)
    return path


def _data_args(preset: str, method: str, data: dict, tmp_path: Path) -> list[str]:
    cfg = load_run_config(method, preset).data
    root = data["root"]
    args = ["--data", f"cache_dir={tmp_path / 'cache'}", "--data", "num_workers=1"]
    if cfg.images:
        images = data["shards"] if cfg.images.endswith(".tar") else str(root / "imgs")
        args += ["--data", f"images={images}"]
    if cfg.captions:
        args += ["--data", f"captions={root / 'captions.txt'}"]
    if cfg.triplets:
        args += ["--data", f"triplets={root / 'triplets.jsonl'}"]
    benchmark = cfg.benchmark or "cirr"
    annotations, images = data[benchmark]
    args += ["--annotations", str(annotations), "--images", str(images)]
    if load_run_config(method, preset).method.__dict__.get("tagger"):
        # The preset's spaCy pipeline cannot be installed offline: a small one built by the test stands in.
        args += ["--set", f"method.tagger={data['tagger']}"]
    concepts = getattr(load_run_config(method, preset).method, "concepts", None)
    if concepts is not None and concepts.vocabulary_file:
        # SEARLE's Open Images vocabulary and GPT phrases are files the user brings: small ones stand in.
        args += ["--set", f"method.concepts.vocabulary_file={data['vocabulary']}"]
        args += ["--set", f"method.concepts.phrases_file={data['phrases']}"]
    if method == "tmcir":
        pseudo = root / ("cirr-pseudo" if benchmark == "cirr" else "fiq-pseudo")
        args += ["--set", f"method.pseudo_targets.manifest={pseudo}"]
    return args


@pytest.mark.integration  # `cirlab train --dry-run` end to end
@pytest.mark.parametrize(
    ("preset", "method"),
    [pytest.param(p, m, marks=[pytest.mark.slow] if (p, m) in SLOW_DRY_RUNS else []) for p, m in CORPUS_PRESETS],
)
def test_dry_run_of_every_real_data_preset(preset, method, data, tmp_path, capsys):
    out = tmp_path / "out"
    args = [
        "train",
        method,
        "--preset",
        preset,
        "--dry-run",
        "--out",
        str(out),
        *_data_args(preset, method, data, tmp_path),
    ]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "backbone: tiny" in printed and "effective config" in printed
    report = json.loads((out / "train_report.json").read_text())
    assert set(report) == {s.name for s in METHODS.get(method).stages}
    assert all(stage["steps"] <= 2 for stage in report.values())
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "method"), SHAPES_PRESETS)
def test_dry_run_of_every_shapes_world_preset(preset, method, quick_shapes_root, tmp_path):
    out = tmp_path / "out"
    args = ["train", method, "--preset", preset, "--dry-run", "--quick", "--root", str(quick_shapes_root)]
    assert main([*args, "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow  # about a minute: the preset's 2048-wide denoiser runs both stages
def test_dry_run_of_the_mllm_preset(tmp_path, capsys):
    out = tmp_path / "out"
    real = "mllm:Qwen/Qwen2.5-VL-72B-Instruct"
    args = ["train", "fusion-diff", "--preset", "qwen25vl-72b", "--dry-run", "--out", str(out)]
    # The pair encoder reads image files, so this preset trains from the image folder (shards are refused).
    write_triplets(tmp_path / "triplets.jsonl", write_image_folder(tmp_path / "imgs", n=8), pseudo=False)
    corpora = [f"cache_dir={tmp_path / 'cache'}", "num_workers=1", f"images={tmp_path / 'imgs'}"]
    corpora += [f"triplets={tmp_path / 'triplets.jsonl'}", "triplets_by_name=true"]
    assert main([*args, *(a for c in corpora for a in ("--data", c))]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"backbone {real} swapped for mllm:" in printed and "fused: pair" in printed
    report = json.loads((out / "train_report.json").read_text())
    assert set(report) == {"prior", "adapter"} and all(stage["steps"] <= 2 for stage in report.values())
    assert (out / "model.safetensors").is_file()


def test_quick_runs_make_the_full_worlds_passes_over_each_stages_data():
    from cirlab.data.shapes import ShapesConfig
    from cirlab.experiments.runs import quick_steps
    from cirlab.training.run_config import scale_steps

    full, quick = ShapesConfig(), ShapesConfig.quick()
    for data, size in [
        ("triplets", lambda c: c.cirr.train_queries),
        ("pseudo_triplets", lambda c: c.cirr.train_queries),
        ("synthetic_triplets", lambda c: c.synthetic.triplets),
        ("images", lambda c: c.corpus.images),
        ("pairs", lambda c: c.corpus.images),
        ("captions", lambda c: c.corpus.images),
    ]:
        assert quick_steps(data) == size(quick) / size(full) < 1
    cfg = load_run_config("combiner", "shapes")
    scaled = scale_steps(cfg, {"finetune": 0.125, "combiner": 0.5})
    assert (scaled.finetune.steps, scaled.combiner.steps) == (cfg.finetune.steps // 8, cfg.combiner.steps // 2)
    assert scaled.finetune.eval_every == -(-cfg.finetune.eval_every // 8)  # rounded up, at least 1
    with pytest.raises(KeyError, match="combiner"):
        scale_steps(cfg, {"finetune": 0.5})
