"""CIReVL, LDRE and OSrCIR end to end: `cirlab eval`, `cirlab submit`, the index and `cirlab search` run them
unchanged, every generated text comes from the cache on a second run (no model call), and the Shapes world's
stand-in models are trained, reused and measured."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirlab.cli.main import main
from cirlab.data.benchmark import load_splits
from cirlab.generation import hf

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
GENERATIVE = ("cirevl", "ldre", "osrcir")


@pytest.fixture
def model_calls(monkeypatch) -> dict[str, int]:
    """Counts every ``generate`` call and every model load of any transformers text generator."""
    counts = {"generate": 0, "load": 0}
    generate, load = hf.TransformersGenerator._generate, hf.TransformersGenerator.load

    def counted_generate(self, *args, **kwargs):
        counts["generate"] += 1
        return generate(self, *args, **kwargs)

    def counted_load(self):
        counts["load"] += self.model is None
        return load(self)

    monkeypatch.setattr(hf.TransformersGenerator, "_generate", counted_generate)
    monkeypatch.setattr(hf.TransformersGenerator, "load", counted_load)
    return counts


@pytest.fixture
def cirr(tmp_path, monkeypatch) -> list[str]:
    """A CIRR-format benchmark (the annotation fixtures, placeholder images); returns the common CLI arguments."""
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    annotations = tmp_path / "cirr"
    shutil.copytree(FIXTURES / "cirr", annotations)
    images = tmp_path / "img_raw"
    rng = np.random.default_rng(0)
    for split_name in ("val", "test1"):
        (split,) = load_splits("cirr", annotations, images, split_name)
        for name in set(split.gallery) | {q.reference for q in split.queries}:
            path = split.image_path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return ["--dataset", "cirr", "--annotations", str(annotations), "--images", str(images), "--backbone", "tiny"]


def _sets(config: dict, prefix: str = "") -> list[str]:
    """``--set key=value`` arguments for a (nested) config dict."""
    out = []
    for key, value in config.items():
        if isinstance(value, dict):
            out += _sets(value, f"{prefix}{key}.")
        else:
            out += ["--set", f"{prefix}{key}={json.dumps(value) if isinstance(value, bool) else value}"]
    return out


@pytest.mark.integration  # `cirlab eval` end to end, three times per method
@pytest.mark.parametrize("name", GENERATIVE)
def test_second_evaluation_reads_every_text_from_the_cache(name, cirr, generative_configs, model_calls, tmp_path):
    texts = tmp_path / "texts.jsonl"
    args = ["eval", name, "--split", "val", *cirr, *_sets(generative_configs[name]), "--generations", str(texts)]
    assert main([*args, "--json", str(tmp_path / "first.json")]) == 0
    assert model_calls["generate"] > 0 and model_calls["load"] > 0
    records = texts.read_text().splitlines()
    assert records and all(json.loads(r)["outputs"] for r in records)

    model_calls.update(generate=0, load=0)
    assert main([*args, "--json", str(tmp_path / "second.json")]) == 0
    assert model_calls == {"generate": 0, "load": 0}, "the second evaluation ran a model"
    assert texts.read_text().splitlines() == records
    assert json.loads((tmp_path / "first.json").read_text()) == json.loads((tmp_path / "second.json").read_text())

    # A changed sampling setting is a changed key: the texts are generated again.
    sampling = "sampling" if name == "osrcir" else "caption_sampling"
    assert main([*args, "--set", f"{sampling}.max_new_tokens=4"]) == 0
    assert model_calls["generate"] > 0


@pytest.mark.integration  # `cirlab submit` end to end, twice
def test_submission_ships_its_texts_and_reproduces_without_a_model(cirr, generative_configs, model_calls, tmp_path):
    sets = _sets(generative_configs["cirevl"])
    out = tmp_path / "submission"
    assert main(["submit", "cirevl", "--split", "test1", *cirr, *sets, "--out", str(out)]) == 0
    shipped = out / "generations.jsonl"
    kinds = {json.loads(line)["kind"] for line in shipped.read_text().splitlines()}
    assert kinds == {"caption", "rewrite"}
    submission = (out / "test1_pred_ranks_recall.json").read_text()

    # Another user, with only the shipped texts: the same submission, no model loaded.
    model_calls.update(generate=0, load=0)
    again = tmp_path / "again"
    args = ["submit", "cirevl", "--split", "test1", *cirr, *sets, "--out", str(again), "--generations", str(shipped)]
    assert main(args) == 0
    assert model_calls == {"generate": 0, "load": 0}
    assert (again / "test1_pred_ranks_recall.json").read_text() == submission


@pytest.mark.integration  # index build and search end to end
@pytest.mark.parametrize("name", ["cirevl", "ldre"])
def test_index_and_search_run_generative_methods(name, tiny_backbone, generative_configs, model_calls, tmp_path):
    from cirlab.features.cache import FeatureCache
    from cirlab.generation import TextCache
    from cirlab.index import build_index, load_index
    from cirlab.methods import create_method
    from imagefiles import make_gallery

    gallery = tmp_path / "photos"
    make_gallery(gallery, 12)
    ckpt = tmp_path / f"{name}-config"
    create_method(name, tiny_backbone, generative_configs[name]).save(ckpt)
    build_index(gallery, tmp_path / "index", backbone=None, method=str(ckpt), cache=FeatureCache(tmp_path / "features"))
    texts = tmp_path / "texts.jsonl"
    index = load_index(tmp_path / "index", text_cache=TextCache(texts))
    assert index.methods()[0] == name
    hits = index.search(index.compose("img001.jpg", "make it red"), k=5)
    assert len(hits) == 5 and all(h.path != "img001.jpg" for h in hits)
    first = model_calls["generate"]
    assert first > 0 and texts.is_file()

    # The same query again, through the command line this time: every text is cached.
    assert (
        main(
            [
                "search",
                str(tmp_path / "index"),
                "--image",
                "img001.jpg",
                "--text",
                "make it red",
                "--json",
                "--generations",
                str(texts),
            ]
        )
        == 0
    )
    assert model_calls["generate"] == first


def test_methods_with_generators_are_opt_in_for_the_demo():
    from cirlab.experiments.demo import default_methods

    assert not set(GENERATIVE) & set(default_methods())


def test_shapes_standins_train_reuse_and_serve_the_methods(quick_shapes_root, tmp_path, monkeypatch, capsys):
    from cirlab.experiments import runs
    from cirlab.experiments.shapes_env import prepare_shapes
    from cirlab.experiments.standins import prepare_standins, standin_config
    from cirlab.generation import create_generator

    env = prepare_shapes(quick=True, root=quick_shapes_root, log=lambda message: None)
    tiny = standin_config(quick=True).scaled(0.02)
    standins = prepare_standins(env, True, config=tiny, log=print, quality_samples=16)
    assert "training the Shapes stand-in" in capsys.readouterr().out
    assert set(standins.quality) >= {
        "captioner_em_heldout_scenes",
        "rewriter_em_synthetic",
        "rewriter_em_benchmark_heldout",
        "reasoner_em_benchmark",
        "pipeline_em_benchmark",
    }
    assert all(0.0 <= v <= 100.0 for v in standins.quality.values())
    for role, spec in standins.specs().items():
        create_generator(spec, role).load()  # each loads through the real transformers path
    assert prepare_standins(env, True, config=tiny, log=print).root == standins.root
    assert "reusing the Shapes stand-ins" in capsys.readouterr().out

    # A study run of a generative method uses the stand-ins and keeps its texts with the run. Short answers: an
    # untrained stand-in never stops on its own, and what is checked here is where the texts go, not what they say.
    monkeypatch.setattr(runs, "prepare_standins", lambda env, quick: standins)
    short = ["method.sampling.max_new_tokens=6"]
    method, report = runs.train_or_load("osrcir", env, 1, True, tmp_path / "runs", False, short)
    assert report == {} and method.config.reasoner == standins.specs()["reasoner"] and method.config.seed == 1
    metrics = runs.evaluate_on_tests(method, env)
    assert set(metrics) == set(runs.TEST_SPLITS)
    (texts,) = (tmp_path / "runs").glob("osrcir-s1-*/generations.jsonl")
    n = len(texts.read_text().splitlines())
    assert n > 0
    again, _ = runs.train_or_load("osrcir", env, 1, True, tmp_path / "runs", False, short)
    assert runs.evaluate_on_tests(again, env)["cirr/test1"]["all"] == metrics["cirr/test1"]["all"]
    assert len(texts.read_text().splitlines()) == n
