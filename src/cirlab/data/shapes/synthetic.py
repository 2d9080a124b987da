"""The synthetic triplet generator: the only triplets the zero-shot methods may train on.

It differs from the benchmark on purpose, like a real synthetic set differs from a human-annotated one: its
texts come from ``SYNTHETIC_TEMPLATES`` (no benchmark template), its edits are drawn uniformly among the steps a
random scene admits (the benchmark balances edit kinds and builds scenes around the edit), and a configurable
fraction of its triplets is corrupted: the target is replaced by a wrong scene one step away from the right one.
No scene holds a held-out combination.

On disk (``synthetic/`` of a world): PNG images under ``images/`` and one JSONL file per corruption fraction,
paths relative to the JSONL file's folder::

    {"id": 0, "reference": "images/000000_r.png", "text": "same picture but the red circle is blue",
     "target": "images/000000_t.png", "corrupted": false, "edit_type": "recolour",
     "template": "syn/recolour/0", "reference_scene": "...", "target_scene": "..."}

A corrupted record points ``target`` at ``images/<id>_w.png`` and gives that image's scene. Every record draws one
uniform ``noise`` value and is corrupted at fraction ``f`` when ``noise < f``, so the corrupted records of a
smaller fraction are a subset of those of a larger one.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from cirlab.data.shapes.edits import EXACT_KINDS, Edit, one_step_edits, synthetic_template_ids, verbalise
from cirlab.data.shapes.render import write_pngs
from cirlab.data.shapes.world import (
    SIZES,
    Scene,
    SceneConfig,
    ShapesConfig,
    combo_filter,
    component_rng,
    sample_scene,
    scene_ok,
)


@dataclass(frozen=True)
class SyntheticTriplet:
    """One synthetic triplet before corruption is decided.

    Attributes:
        reference: the reference scene.
        edit: the edit.
        text: its words (synthetic family).
        template: the synthetic template id.
        target: the correct target scene.
        wrong_target: a scene one step from ``target``, used when the triplet is corrupted.
        noise: uniform in [0, 1); corrupted at fraction ``f`` when ``noise < f``.
    """

    reference: Scene
    edit: Edit
    text: str
    template: str
    target: Scene
    wrong_target: Scene
    noise: float


def _candidate_edits(rng: random.Random, scene: Scene, cfg: SceneConfig, kind: str) -> list[Edit]:
    if kind == "add":
        free = scene.free_cells()
        colour, shape = rng.choice(cfg.seen_combos())
        return [Edit("add", cell=rng.choice(free), shape=shape, colour=colour, size=rng.choice(SIZES))]
    return [e for e in one_step_edits(scene, cfg.shapes, cfg.colours) if e.kind == kind]


def _valid(scene: Scene, cfg: SceneConfig) -> bool:
    return cfg.min_objects <= len(scene) <= cfg.max_objects and scene_ok(scene, combo_filter(cfg.heldout))


def _first_valid(
    rng: random.Random, scene: Scene, edits: list[Edit], cfg: SceneConfig, avoid: Scene | None = None
) -> tuple[Edit, Scene] | None:
    """A random edit of ``edits`` whose result is a valid training scene other than ``avoid``, with that result."""
    rng.shuffle(edits)
    for edit in edits:
        result = edit.apply(scene)
        if result != avoid and _valid(result, cfg):
            return edit, result
    return None


def sample_synthetic_triplet(rng: random.Random, cfg: SceneConfig) -> SyntheticTriplet:
    """One synthetic triplet: a random scene, a random applicable step of a random kind, a synthetic template."""
    while True:
        reference = sample_scene(rng, cfg)
        kind = rng.choice(EXACT_KINDS)
        step = _first_valid(rng, reference, _candidate_edits(rng, reference, cfg, kind), cfg)
        if step is None:
            continue
        edit, target = step
        wrong_step = _first_valid(rng, target, one_step_edits(target, cfg.shapes, cfg.colours), cfg, reference)
        if wrong_step is None:
            continue
        said = verbalise(edit, reference, rng.choice(synthetic_template_ids(kind)), rng)
        return SyntheticTriplet(
            reference=reference,
            edit=edit,
            text=said.text,
            template=said.template,
            target=target,
            wrong_target=wrong_step[1],
            noise=rng.random(),
        )


def corrupt_file_name(fraction: float) -> str:
    """``0.2`` -> ``"triplets.corrupt20.jsonl"``."""
    return f"triplets.corrupt{round(100 * fraction):02d}.jsonl"


def write_synthetic(cfg: ShapesConfig, directory: Path) -> dict[str, int]:
    """Samples, renders and writes the synthetic triplets; returns the number of corrupted records per file."""
    rng = component_rng(cfg.seed, "synthetic")
    triplets = [sample_synthetic_triplet(rng, cfg.scene) for _ in range(cfg.synthetic.triplets)]
    fractions = {"triplets.jsonl": cfg.synthetic.corrupt_fraction}
    fractions |= {corrupt_file_name(f): f for f in cfg.synthetic.extra_corrupt_fractions}
    most = max(fractions.values())
    jobs = []
    for i, t in enumerate(triplets):
        jobs.append((directory / "images" / f"{i:06d}_r.png", t.reference, rng.getrandbits(31)))
        jobs.append((directory / "images" / f"{i:06d}_t.png", t.target, rng.getrandbits(31)))
        if t.noise < most:  # only records corrupted in some file need their wrong target drawn
            jobs.append((directory / "images" / f"{i:06d}_w.png", t.wrong_target, rng.getrandbits(31)))
    write_pngs(jobs, cfg.render)
    counts = {}
    for name, fraction in fractions.items():
        counts[name] = 0
        with open(directory / name, "w", encoding="utf-8") as fh:
            for i, t in enumerate(triplets):
                corrupted = t.noise < fraction
                counts[name] += corrupted
                record = {
                    "id": i,
                    "reference": f"images/{i:06d}_r.png",
                    "text": t.text,
                    "target": f"images/{i:06d}_{'w' if corrupted else 't'}.png",
                    "corrupted": corrupted,
                    "edit_type": t.edit.kind,
                    "template": t.template,
                    "reference_scene": t.reference.to_str(),
                    "target_scene": (t.wrong_target if corrupted else t.target).to_str(),
                }
                fh.write(json.dumps(record) + "\n")
    return counts


def read_triplets(path: str | Path) -> list[dict]:
    """Reads a synthetic triplet JSONL file; image paths are made absolute (relative to the file's folder)."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            record["reference"] = str(path.parent / record["reference"])
            record["target"] = str(path.parent / record["target"])
            records.append(record)
    return records
