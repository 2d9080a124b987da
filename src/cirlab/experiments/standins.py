"""The Shapes world's stand-in captioner, rewriter and one-stage model: trained once per world (they do not read the
Shapes CLIP), content-addressed and reused like it, with their own quality measured; and the generative methods
(CIReVL, LDRE, OSrCIR) configured to use them.

The stand-ins are small models trained on the world's corpus and synthetic triplets (``cirlab.training.generators``
says what each reads); they stand in for BLIP-2 and a chat LLM, which the Shapes world does not have, and every
report of their numbers says so. Their quality (``quality.json`` beside them) tells which part limits a method:

- ``captioner_em_heldout_scenes``: canonical-caption exact match on fresh scenes (in no corpus image);
- ``captioner_em_test_references``: the same on the CIRR-format test split's reference images;
- ``rewriter_em_synthetic``: rewrite exact match on fresh synthetic triplets (the templates it trained on), the
  reference caption canonical;
- ``rewriter_em_benchmark`` / ``_benchmark_seen`` / ``_benchmark_heldout``: the same on the CIRR-format test
  queries, all of whose templates the rewriter never saw (the benchmark's seen and held-out templates apart);
- ``reasoner_em_synthetic`` / ``reasoner_em_benchmark*``: the one-stage model's exact match on the same sets;
- ``pipeline_em_benchmark``: captioner then rewriter, what CIReVL retrieves with, on the test queries.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cirlab.config import config_digest, to_dict
from cirlab.data.shapes import Scene, eval_caption, sample_scene
from cirlab.data.shapes.render import render_batch
from cirlab.data.shapes.world import combo_filter, component_rng
from cirlab.experiments.shapes_env import ShapesEnv
from cirlab.generation import GeneratorOptions, SamplingConfig, TextCache, create_generator, resolve_prompt
from cirlab.generation.steps import run_prompt
from cirlab.io import atomic_write_json, file_lock
from cirlab.methods import METHODS
from cirlab.training.generators import (
    StandInConfig,
    standin_tokenizer,
    synthetic_draws,
    train_captioner,
    train_reasoner,
    train_rewriter,
)
from cirlab.types import ReferenceImage

QUICK_SCALE = 0.25
QUALITY_FILE = "quality.json"


@dataclass
class StandIns:
    """The built stand-ins of one world.

    Attributes:
        root: their folder (``standins-<digest>`` beside the world).
        captioner / rewriter / reasoner: the model directories.
        quality: the exact-match measures (see the module docstring), in %.
    """

    root: Path
    captioner: Path
    rewriter: Path
    reasoner: Path
    quality: dict[str, float]

    def specs(self) -> dict[str, str]:
        """Generator specs by role."""
        return {
            "captioner": f"hf-captioner:{self.captioner}",
            "rewriter": f"hf-rewriter:{self.rewriter}",
            "reasoner": f"hf-captioner:{self.reasoner}",
        }


def standin_config(quick: bool) -> StandInConfig:
    """The stand-ins' settings (quick: a quarter of the steps and data, same models)."""
    cfg = StandInConfig()
    return cfg.scaled(QUICK_SCALE) if quick else cfg


def prepare_standins(
    env: ShapesEnv,
    quick: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
    config: StandInConfig | None = None,
    quality_samples: int | None = None,
) -> StandIns:
    """Builds or reuses the stand-ins of ``env``'s world; measures their quality once.

    Args:
        env: the Shapes environment; its world and its CIRR-format test split are read, its CLIP is not.
        quick: the scaled-down settings (``standin_config``) and fewer quality samples.
        force: retrain even when a matching build exists.
        log: progress messages.
        config: settings other than ``standin_config(quick)`` (tests).
        quality_samples: fresh scenes and synthetic triplets the quality is measured on (default 200 quick, else
            500; the CIRR-format test split is measured whole).
    """
    cfg = config or standin_config(quick)
    root = env.world.root.parent / f"standins-{config_digest([env.world.world_id, to_dict(cfg)])}"
    dirs = {role: root / role / "best" for role in ("captioner", "rewriter", "reasoner")}
    with file_lock(env.world.root.parent / ".standins.lock"):
        if force and root.exists():
            shutil.rmtree(root)
        if not (root / QUALITY_FILE).is_file():
            log(f"training the Shapes stand-in captioner, rewriter and one-stage model into {root}")
            tokenizer = standin_tokenizer(env.world, cfg)
            if not (dirs["captioner"] / "config.json").is_file():
                train_captioner(env.world, tokenizer, cfg, root / "captioner")
            if not (dirs["rewriter"] / "config.json").is_file():
                train_rewriter(env.world, tokenizer, cfg, root / "rewriter")
            if not (dirs["reasoner"] / "config.json").is_file():
                train_reasoner(env.world, tokenizer, cfg, root / "reasoner")
            built = StandIns(root, dirs["captioner"], dirs["rewriter"], dirs["reasoner"], {})
            quality = standin_quality(env, built, n=quality_samples or (200 if quick else 500))
            atomic_write_json(root / QUALITY_FILE, {"config": to_dict(cfg), "quality": quality})
        else:
            log(f"reusing the Shapes stand-ins at {root}")
    quality = json.loads((root / QUALITY_FILE).read_text())["quality"]
    return StandIns(root, dirs["captioner"], dirs["rewriter"], dirs["reasoner"], quality)


def _em(predicted: Sequence[str], expected: Sequence[str]) -> float:
    return 100.0 * statistics.fmean(p == e for p, e in zip(predicted, expected, strict=True)) if expected else 0.0


def standin_quality(env: ShapesEnv, standins: StandIns, n: int = 500, batch_size: int = 64) -> dict[str, float]:
    """The exact-match measures of the module docstring (%), greedy decoding through the real generation path."""
    options = GeneratorOptions(batch_size=batch_size)
    captioner = create_generator(f"hf-captioner:{standins.captioner}", "captioner", options)
    rewriter = create_generator(f"hf-rewriter:{standins.rewriter}", "rewriter", options)
    reasoner = create_generator(f"hf-captioner:{standins.reasoner}", "reasoner", options)
    greedy, cache = SamplingConfig(max_new_tokens=64), TextCache()
    describe, rewrite, one_stage = (
        resolve_prompt(p) for p in ("shapes-describe", "shapes-rewrite", "shapes-one-stage")
    )

    def run(model: Any, prompt: Any, kind: str, **inputs: Any) -> list[str]:
        return [prompt.answer(r[0], "") for r in run_prompt(model, prompt, greedy, 0, cache, kind, **inputs)]

    world = env.world.config
    rng = component_rng(world.seed, "standins", "eval-scenes")
    scenes = [sample_scene(rng, world.scene, combo_filter(world.scene.heldout)) for _ in range(n)]
    pictures = render_batch([(s, rng.getrandbits(31)) for s in scenes], world.render)
    images = [ReferenceImage.from_image(_pil(p)) for p in pictures]
    out = {
        "captioner_em_heldout_scenes": _em(
            run(captioner, describe, "caption", images=images), list(map(eval_caption, scenes))
        )
    }

    synthetic = synthetic_draws(env.world, n, "eval")
    render_rng = component_rng(world.seed, "standins", "eval-render")
    rendered = render_batch([(t.reference, render_rng.getrandbits(31)) for t in synthetic], world.render)
    targets = [eval_caption(t.target) for t in synthetic]
    texts = [t.text for t in synthetic]
    captions = [eval_caption(t.reference) for t in synthetic]
    out["rewriter_em_synthetic"] = _em(run(rewriter, rewrite, "rewrite", captions=captions, texts=texts), targets)
    synthetic_images = [ReferenceImage.from_image(_pil(p)) for p in rendered]
    out["reasoner_em_synthetic"] = _em(
        run(reasoner, one_stage, "describe", images=synthetic_images, texts=texts), targets
    )

    split = env.source.split("cirr/test1")
    meta = env.world.cirr_meta("test1")
    queries = split.queries
    refs = [ReferenceImage.from_path(split.image_path(q.reference)) for q in queries]
    ref_captions = [eval_caption(Scene.parse(meta[q.qid]["reference_scene"])) for q in queries]
    goal = [eval_caption(Scene.parse(meta[q.qid]["target_scene"])) for q in queries]
    q_texts = [q.text for q in queries]
    heldout = [bool(meta[q.qid].get("heldout_template")) for q in queries]
    predicted_captions = run(captioner, describe, "caption", images=refs)
    out["captioner_em_test_references"] = _em(predicted_captions, ref_captions)
    rewrites = run(rewriter, rewrite, "rewrite", captions=ref_captions, texts=q_texts)
    reasoned = run(reasoner, one_stage, "describe", images=refs, texts=q_texts)
    for name, predicted in (("rewriter", rewrites), ("reasoner", reasoned)):
        out[f"{name}_em_benchmark"] = _em(predicted, goal)
        out[f"{name}_em_benchmark_seen"] = _em(*_where(predicted, goal, heldout, False))
        out[f"{name}_em_benchmark_heldout"] = _em(*_where(predicted, goal, heldout, True))
    piped = run(rewriter, rewrite, "rewrite", captions=predicted_captions, texts=q_texts)
    out["pipeline_em_benchmark"] = _em(piped, goal)
    return {k: round(v, 2) for k, v in out.items()}


def _where(predicted: list[str], goal: list[str], flags: list[bool], value: bool) -> tuple[list[str], list[str]]:
    rows = [i for i, f in enumerate(flags) if f == value]
    return [predicted[i] for i in rows], [goal[i] for i in rows]


def _pil(array: Any) -> Any:
    from PIL import Image

    return Image.fromarray(array)


def with_standins(name: str, config: Any, standins: StandIns) -> Any:
    """``config`` of generative method ``name`` with its generator specs set to the world's stand-ins."""
    roles = METHODS.get(name).generators
    specs = standins.specs()
    return dataclasses.replace(config, **{field: specs[role] for field, role in roles.items()})


def quality_notes(quality: dict[str, float]) -> list[str]:
    """The stand-ins' quality as Markdown lines for a results table."""
    q = quality
    return [
        "",
        "The generative methods run small stand-ins for their pretrained models (the Shapes world has no BLIP-2 and no "
        "chat LLM): a captioner trained on the world's caption corpus, a rewriter and a one-stage model trained on "
        "the world's synthetic triplet family only (never a benchmark template). Their exact match (%):",
        "",
        "| model | synthetic (its templates) | benchmark test, all | benchmark seen templates | benchmark held-out "
        "templates | other |",
        "|---|---|---|---|---|---|",
        f"| captioner | | | | | held-out scenes {q['captioner_em_heldout_scenes']:.1f}, test references "
        f"{q['captioner_em_test_references']:.1f} |",
        f"| rewriter (oracle caption) | {q['rewriter_em_synthetic']:.1f} | {q['rewriter_em_benchmark']:.1f} | "
        f"{q['rewriter_em_benchmark_seen']:.1f} | {q['rewriter_em_benchmark_heldout']:.1f} | |",
        f"| captioner + rewriter (CIReVL) | | {q['pipeline_em_benchmark']:.1f} | | | |",
        f"| one-stage model (OSrCIR) | {q['reasoner_em_synthetic']:.1f} | {q['reasoner_em_benchmark']:.1f} | "
        f"{q['reasoner_em_benchmark_seen']:.1f} | {q['reasoner_em_benchmark_heldout']:.1f} | |",
    ]
