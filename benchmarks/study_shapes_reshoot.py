"""Would a CIRR-like target reorder `sum` and the peers? Re-shot targets and texts that describe the target, on val.

On CIRR the target is another photograph: what the relative caption does not mention changes too, so the
reference's image embedding misleads (image-only 7.4 R@1 with CLIP ViT-L/14) and adding it to the text hurts.
A CIRR relative caption also describes much of the target, so the text alone goes far. On the Shapes world neither
holds: a target is its reference with one edit, and the text names only the edit. This script builds variants of a
CIRR-format **validation** split (never test) without touching the world's files, and reports R@1 (reference
removed, as CIRR's protocol does) for the training-free rows, the peers (seed 0 unless ``--seed``) and the
reference-caption composition:

* **re-shot targets**: each target is rendered again with every object the edit did not touch moved to other
  random cells (the edited object keeps its final cell). Each of the query's four hard negatives is re-shot the
  same way with probability ``--distractors`` (the others keep the reference's layout: look-alikes). The correct
  answer is then any scene with the same objects and the edited object in place, wherever the rest sit; gallery
  images that satisfy it, other than the new target, are excluded from the query's ranking, like the reference
  (on the world's own targets the world's exact semantics stand, and only the reference is excluded);
* **decoys** (``--decoys K``, default none): K more gallery images per query, each the world's own target (the
  edit applied, the reference's layout) with one object the edit did not touch changed in one attribute. A decoy
  satisfies the text's edit and keeps the reference's look, as a CIRR look-alike that shows the change can, but it
  is another scene, so it is never a correct answer;
* **sum at a lower text weight** (``--sum-weights W ...``, none by default): ``sum`` with its text embedding
  weighted by W < 1. A backbone whose text embeddings all share one extra offset that no image embedding has (a
  wider modality gap, as real CLIPs have) would score ``sum`` this way, with W = 1 / |text + offset|, while every
  text-to-image ranking stays as it is (to first order the peers too: their training would see the offset only as
  a lower temperature, which is assumed, not measured). It says how wide such a gap would have to be;
* **texts**: the world's, *target-state* ones (``study_shapes_composition.py``: only what the edited object
  becomes), and either followed by an alt-text caption of the target (``alt_caption``: a random partial
  description, as pretraining captions are), which describes the target as a CIRR caption does.

The combiner is left out: it was trained on the world's own triplets, so it says nothing about a changed world.
The peers train on the corpus only, so theirs are the numbers a changed benchmark would give. Nothing is tuned
here; a world change chosen from this table would be built into the world and calibrated with
``cirlab shapes-calibrate``.

    python benchmarks/study_shapes_reshoot.py [--quick] [--root runs/shapes] [--runs runs/demo/methods] [--seed S] \\
        [--alt-full F] [--distractors P ...] [--decoys K] [--sum-weights W ...] [--clip DIR] [--gap C] \\
        [--peer-set PEER:key=value ...]

``--clip DIR`` runs it on another pretrained Shapes CLIP (``cirlab shapes-pretrain``'s ``OUT/shapes-clip``),
with the peers trained on that CLIP in ``--runs``. ``--gap C`` gives the CLIP a modality gap of length C
(``HFCLIPBackbone``'s ``modality_gap``: the text weighs 1 / sqrt(1 + C**2) in ``sum``), with the peers trained on
it (a run's key names its backbone, so they never mix with the shipped CLIP's). ``--peer-set PEER:key=value ...``
trains a peer with run-config overrides (a departure from its preset, for diagnosis only: e.g.
``pic2word:method.temperature=0.0325``).

docs/RESULTS.md has its table (the calibration section). Its tables were measured on world code version 2 (edits in
place, instruction texts), at the commits they name. Since code version 3 the default world is itself re-shot
(``BenchmarkStyle``, built from what these probes found), so on today's world this re-shoots ground truths that
already are; check out one of those commits to reproduce a table.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cirlab.backbones.shapes_clip import shapes_clip
from cirlab.data.benchmark import CIRQuery
from cirlab.data.shapes import Scene, eval_caption
from cirlab.data.shapes.alttext import AltTextConfig, alt_caption
from cirlab.data.shapes.edits import Edit
from cirlab.data.shapes.queries import reshoot
from cirlab.data.shapes.render import render_batch
from cirlab.data.shapes.world import COLOURS, SHAPES, SIZES, Combo, combo_filter
from cirlab.evaluation.ranking import topk_inner_product
from cirlab.experiments import SHAPES_ROOT
from cirlab.experiments.runs import train_or_load
from cirlab.experiments.shapes_env import ShapesEnv, prepare_shapes
from cirlab.methods import create_method
from cirlab.types import ImageFeatures
from study_shapes_composition import target_state

ROWS = ("image-only", "sum", "text-only", "pic2word", "searle", "lincir", "ref. caption + text")


def kept_cell(edit: Edit) -> int | None:
    """The cell of the edited object in the target (None for a removal)."""
    if edit.kind == "remove":
        return None
    return edit.to_cell if edit.kind == "move" else edit.cell


def relaxed(scene: Scene, cell: int | None) -> tuple[object, frozenset]:
    """What a re-shot answer must match: the object at ``cell`` exactly, the others as a multiset, cells ignored."""
    fixed = scene.at(cell) if cell is not None and cell in scene.cells else None
    rest = Counter((o.shape, o.colour, o.size) for o in scene.objects if o.cell != cell)
    return fixed, frozenset(rest.items())


def decoy(target: Scene, cell: int | None, rng: random.Random, combo_ok: Callable[[Combo], bool]) -> Scene | None:
    """``target`` with one object outside ``cell`` changed in one attribute (None when there is no such object)."""
    others = [o for o in target.objects if o.cell != cell]
    if not others:
        return None
    obj = rng.choice(others)
    options = [obj.replace(colour=c) for c in COLOURS if c != obj.colour]
    options += [obj.replace(shape=s) for s in SHAPES if s != obj.shape]
    options += [obj.replace(size=z) for z in SIZES if z != obj.size]
    return target.replaced(obj.cell, rng.choice([o for o in options if combo_ok(o.combo)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=SHAPES_ROOT)
    parser.add_argument("--quick", action="store_true", help="the quick world, its peers at the quick schedules")
    parser.add_argument("--runs", type=Path, default=Path("runs/demo/methods"))
    parser.add_argument("--distractors", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--seed", type=int, default=0, help="which trained peers to reuse (or train)")
    parser.add_argument("--decoys", type=int, default=0, help="edited look-alikes per query (re-shot targets only)")
    parser.add_argument("--clip", type=Path, default=None, help="another pretrained Shapes CLIP directory")
    parser.add_argument("--gap", type=float, default=0.0, help="the CLIP's modality gap (0: none)")
    parser.add_argument(
        "--peer-set", nargs="*", default=[], help="PEER:key=value run-config overrides of a peer (a diagnosis)"
    )
    parser.add_argument("--sum-weights", type=float, nargs="*", default=[], help="extra sum rows at these text weights")
    parser.add_argument(
        "--alt-full",
        type=float,
        default=AltTextConfig().full,
        help="chance that a target's alt-text is its complete caption (default: the pretraining captions' own)",
    )
    args = parser.parse_args()
    t0 = time.perf_counter()
    env = prepare_shapes(quick=args.quick, root=args.root, log=print)
    if args.clip is not None or args.gap:  # features are cached per backbone, so the shipped CLIP's are not reused
        clip = shapes_clip(str(args.clip) if args.clip else None, modality_gap=args.gap).freeze()
        env = ShapesEnv(env.world, clip, env.source, env.clip_metrics, args.clip or env.clip_dir)
    name = "cirr/val"
    split = env.source.split(name)
    meta = env.world.cirr_meta("val")
    images = json.loads((env.world.root / "cirr" / "shapes_images.val.json").read_text())
    features = env.source.features(name, env.backbone)
    row = {n: i for i, n in enumerate(features.names)}
    embeds = features.embeds.float()
    references = embeds[[row[q.reference] for q in split.queries]]  # (Q, d)
    reference_features = ImageFeatures(references, torch.empty(len(references), 0, 0))
    methods = {n: create_method(n, env.backbone).eval() for n in ("image-only", "sum", "text-only")}
    for n in ("pic2word", "searle", "lincir"):
        overrides = tuple(o.partition(":")[2] for o in args.peer_set if o.partition(":")[0] == n)
        methods[n] = train_or_load(n, env, args.seed, args.quick, args.runs, False, overrides)[0].eval()
    rows = list(ROWS)
    for w in args.sum_weights:
        rows.insert(rows.index("text-only"), f"sum, text x{w:g}")
        methods[rows[rows.index("text-only") - 1]] = create_method("sum", env.backbone, {"text_weight": w}).eval()
    edits = {q.qid: Edit.from_dict(meta[q.qid]["edit"]) for q in split.queries}

    def layout(reshot_targets: bool, p: float) -> tuple[list[str], dict[str, Scene], np.ndarray, np.ndarray, list]:
        """Gallery names, scenes, (N, d) normalised embeddings, target columns and per-query exclusions."""
        rng = random.Random(f"reshoot/{p}")
        decoy_rng = random.Random(f"reshoot/decoys/{p}")  # its own stream: the rows without decoys stay as they were
        combo_ok = combo_filter(env.world.config.scene.heldout)
        scenes = {g: Scene.parse(images[g]["scene"]) for g in split.gallery}
        new: dict[str, tuple[Scene, int]] = {}
        dropped: set[str] = set()
        target_of: dict[str, str] = {}
        for q in split.queries:
            cell = kept_cell(edits[q.qid])
            target_of[q.qid] = q.targets[0]
            if not reshot_targets:
                continue
            name_ = f"reshot-{q.targets[0]}"
            new[name_] = (reshoot(scenes[q.targets[0]], cell, rng), rng.getrandbits(31))
            dropped.add(q.targets[0])
            target_of[q.qid] = name_
            for d in q.subset or []:
                if d not in (q.reference, q.targets[0]) and d not in dropped and rng.random() < p:
                    moved = reshoot(scenes[d], cell if cell in scenes[d].cells else None, rng)
                    new[f"reshot-{d}"] = (moved, rng.getrandbits(31))
                    dropped.add(d)
            for i in range(args.decoys):
                fake = decoy(scenes[q.targets[0]], cell, decoy_rng, combo_ok)
                if fake is not None:
                    new[f"decoy{i}-{q.qid}"] = (fake, decoy_rng.getrandbits(31))
        kept = [g for g in split.gallery if g not in dropped]
        names = [*kept, *new]
        scenes |= {n: s for n, (s, _) in new.items()}
        rendered = render_batch(list(new.values()), env.world.config.render) if new else None
        parts = [embeds[[row[g] for g in kept]]]
        with torch.no_grad():
            for s in range(0, 0 if rendered is None else len(rendered), 256):
                pixels = env.backbone.image_transform.from_uint8(rendered[s : s + 256])
                parts.append(env.backbone.encode_image(pixels).embeds.float())
        gallery = F.normalize(torch.cat(parts), dim=-1).numpy()
        column = {g: i for i, g in enumerate(names)}
        by_size: dict[int, list[str]] = {}
        for g in names:
            by_size.setdefault(len(scenes[g]), []).append(g)
        targets, excludes = [], []
        for q in split.queries:
            cell, target = kept_cell(edits[q.qid]), target_of[q.qid]
            others: list[str] = []
            if reshot_targets:  # the world's own targets keep the world's exact semantics
                want = relaxed(scenes[target], cell)
                others = [g for g in by_size[len(scenes[target])] if g != target and relaxed(scenes[g], cell) == want]
            targets.append(column[target])
            # A reference that is another query's target was re-shot away, and so is already out of the gallery.
            reference = [column[q.reference]] if q.reference in column else []
            excludes.append([*reference, *(column[g] for g in others)])
        return names, scenes, gallery, np.array(targets), excludes

    text_rules: dict[str, Callable[[CIRQuery, str], str]] = {
        "the world's": lambda q, alt: q.text,
        "target-state": lambda q, alt: target_state(meta[q.qid], q),
        "the world's + target alt-text": lambda q, alt: f"{q.text}, {alt}",
        "target-state + target alt-text": lambda q, alt: f"{target_state(meta[q.qid], q)}, {alt}",
    }
    variants = [(False, 0.0)] + [(True, p) for p in args.distractors]
    lines = ["| targets | hard negatives re-shot | texts | " + " | ".join(rows) + " |", "|---" * (3 + len(rows)) + "|"]
    for reshot_targets, p in variants:
        names, scenes, gallery, targets, excludes = layout(reshot_targets, p)
        alt_rng = random.Random("reshoot/alt")
        alt_cfg = AltTextConfig(full=args.alt_full)
        alts = {
            q.qid: alt_caption(scenes[names[t]], alt_rng, alt_cfg)[0]
            for q, t in zip(split.queries, targets, strict=True)
        }
        captions = {q.qid: eval_caption(Scene.parse(meta[q.qid]["reference_scene"])) for q in split.queries}
        for label, rule in text_rules.items():
            texts = [rule(q, alts[q.qid]) for q in split.queries]
            cells = []
            for method_name in rows:
                with torch.no_grad():
                    if method_name == "ref. caption + text":
                        composed = [f"{captions[q.qid]}, {t}" for q, t in zip(split.queries, texts, strict=True)]
                        queries = env.backbone.encode_text(composed).embeds
                    else:
                        queries = methods[method_name].compose(reference_features, texts)
                ranked = topk_inner_product(F.normalize(queries.float(), dim=-1).numpy(), gallery, 1, exclude=excludes)
                cells.append(100.0 * float(np.mean(ranked.indices[:, 0] == targets)))
            where = "re-shot" if reshot_targets else "the world's"
            share = f"{p:.0%}" if reshot_targets else "-"
            lines.append(f"| {where} | {share} | {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    print(f"{name}, world {env.world.world_id}, {len(split.queries)} queries; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
