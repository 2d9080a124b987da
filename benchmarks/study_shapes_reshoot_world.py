"""The re-shot variant of the Shapes world on disk, with the combiner trained on it by the production training loop.

``study_shapes_reshoot.py`` probes re-shot targets and descriptive texts on the val split in memory, where no
supervised method can be trained. This script writes that variant as a world, so that ``train_or_load`` trains the
CLIP4Cir combiner on it exactly as ``cirlab shapes-calibrate`` does (its Shapes preset, selection on val), and then
reports every calibration row on its **validation** split:

* the world directory is copied with hard links into ``--out`` (nothing of the source world is written), and the
  CIRR-format ``train`` and ``val`` splits are rewritten: each target is re-rendered with every object its edit did
  not touch moved to other random cells (a new image, ``<target>-rs<pairid>``; the world's hard negatives keep the
  reference's layout), and each text becomes the target-state text followed by an alt-text caption of the new
  target. ``test1`` is left as it was and is never read;
* R@1 is ranked as in the in-memory study: the world's original targets leave the gallery, and gallery images that
  satisfy the edit with the untouched objects anywhere (other than the new target) are excluded from the query's
  ranking, like the reference. The production evaluator cannot exclude them, so ranking is done here, on each
  method's own features (``features_for``) and queries (``compose_queries``);
* the training-free rows and the peers are the source world's (peers from ``--runs``: they train on the corpus and
  select on the world's val), the combiner is trained in ``--variant-runs`` (its run key names the source world's
  id, so it must not share a folder with the source world's runs).

    python benchmarks/study_shapes_reshoot_world.py --root runs/shapes --runs runs/demo/methods \\
        --out runs/shapes-reshoot --variant-runs runs/reshoot-methods [--seeds 0 1 2] [--alt-full F] [--scale S] \\
        [--train-queries N] [--gap C] [--quick]

``--gap C`` gives the shipped CLIP a modality gap of length C (``HFCLIPBackbone``'s ``modality_gap``); every row,
the peers included, is then computed and trained on that backbone (a run's key names its backbone). ``--quick``
re-shoots the quick world instead, every method at its quick schedule (``--scale`` multiplies that).

docs/RESULTS.md has its table (the calibration section). Its tables were measured on world code version 2 (edits in
place, instruction texts), at the commits they name. Since code version 3 the default world is itself re-shot
(``BenchmarkStyle``, built from what these probes found), so on today's world this re-shoots ground truths that
already are; check out one of those commits to reproduce a table.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cirlab.data.benchmark import CIRQuery
from cirlab.data.shapes import Scene
from cirlab.data.shapes.alttext import AltTextConfig, alt_caption
from cirlab.data.shapes.edits import Edit
from cirlab.data.shapes.queries import reshoot
from cirlab.data.shapes.render import write_pngs
from cirlab.evaluation.evaluate import compose_queries, gallery_embeddings
from cirlab.evaluation.ranking import topk_inner_product
from cirlab.experiments import SHAPES_ROOT
from cirlab.experiments.calibrate import composition_split
from cirlab.experiments.runs import train_or_load
from cirlab.io import atomic_write_json, create_temp_dir, read_json
from cirlab.methods import create_method
from study_shapes_combiner_budget import full_world_env, scaled_overrides
from study_shapes_composition import target_state
from study_shapes_reshoot import kept_cell, relaxed

FREE_ROWS = ("image-only", "sum", "text-only")
PEERS = ("pic2word", "searle", "lincir")


def _rewrite_split(cirr: Path, split: str, render: Any, alt: AltTextConfig) -> None:
    """Re-shoots every target of one CIRR-format split and rewrites its texts, its files written anew."""
    captions_path = cirr / "captions" / f"cap.rc2.{split}.json"
    images_path = cirr / "image_splits" / f"split.rc2.{split}.json"
    scenes_path, meta_path = cirr / f"shapes_images.{split}.json", cirr / f"shapes_meta.{split}.json"
    captions, images, scenes, meta = (read_json(p) for p in (captions_path, images_path, scenes_path, meta_path))
    rng, alt_rng = random.Random(f"reshoot-world/{split}"), random.Random(f"reshoot-world/alt/{split}")
    jobs = []
    for record in captions:
        qid, old = str(record["pairid"]), record["target_hard"]
        info = meta[qid]
        scene = reshoot(Scene.parse(info["target_scene"]), kept_cell(Edit.from_dict(info["edit"])), rng)
        seed = rng.getrandbits(31)
        name = f"{old}-rs{qid}"
        images[name] = f"./reshot/{name}.png"
        scenes[name] = {"scene": scene.to_str(), "seed": seed}
        jobs.append((cirr / "img_raw" / "reshot" / f"{name}.png", scene, seed))
        query = CIRQuery(qid, record["reference"], record["caption"], [record["caption"]], [old])
        record["caption"] = f"{target_state(info, query)}, {alt_caption(scene, alt_rng, alt)[0]}"
        record["target_hard"], record["target_soft"] = name, {name: 1.0}
        record["img_set"]["members"] = [name if m == old else m for m in record["img_set"]["members"]]
        meta[qid] = {**info, "target_scene": scene.to_str(), "reshot_from": old}
    write_pngs(jobs, render)
    # Each file is replaced (a new inode), so the hard-linked source world is never written through.
    for path, obj in ((captions_path, captions), (images_path, images), (scenes_path, scenes), (meta_path, meta)):
        atomic_write_json(path, obj)


def write_variant(source: Path, out: Path, render: Any, alt: AltTextConfig, log: Any) -> None:
    """The re-shot variant of the world in ``source`` at ``out`` (reused when one with the same settings is there)."""
    settings = {"source": str(source.resolve()), "alt_full": alt.full, "splits": ["train", "val"]}
    marker = out / "reshoot.json"
    if marker.is_file() and read_json(marker) == settings:
        log(f"reusing the re-shot variant in {out}")
        return
    if out.exists():
        raise FileExistsError(f"{out} holds something else than this variant ({settings}); remove it first")
    tmp = create_temp_dir(out.parent, f".{out.name}.")
    staged = tmp / "world"
    shutil.copytree(source, staged, copy_function=os.link)
    for split in ("train", "val"):
        _rewrite_split(staged / "cirr", split, render, alt)
    atomic_write_json(staged / "reshoot.json", settings)
    os.replace(staged, out)
    tmp.rmdir()
    log(f"wrote the re-shot variant of {source.name} in {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=SHAPES_ROOT, help="where the source world is")
    parser.add_argument("--runs", type=Path, default=Path("runs/demo/methods"), help="the source world's peer runs")
    parser.add_argument("--out", type=Path, required=True, help="root for the variant world and its features")
    parser.add_argument("--variant-runs", type=Path, required=True, help="where the combiner trained on it goes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--alt-full", type=float, default=AltTextConfig().full)
    parser.add_argument("--scale", type=float, default=1.0, help="the combiner's steps, times its preset's")
    parser.add_argument("--train-queries", type=int, default=None, help="the source world's CIRR-format train size")
    parser.add_argument("--gap", type=float, default=0.0, help="the CLIP's modality gap (0: the shipped CLIP's)")
    parser.add_argument("--quick", action="store_true", help="the quick world, every method at the quick schedules")
    args = parser.parse_args()
    if args.variant_runs.resolve() == args.runs.resolve():
        parser.error("--variant-runs must differ from --runs: a run's key names the world id, which both share")
    t0 = time.perf_counter()
    source_env = full_world_env(args.root, args.train_queries, args.gap, args.quick)
    world_dir = args.out / source_env.world.root.name
    args.out.mkdir(parents=True, exist_ok=True)
    write_variant(
        source_env.world.root, world_dir, source_env.world.config.render, AltTextConfig(full=args.alt_full), print
    )
    env = full_world_env(args.out, args.train_queries, args.gap, args.quick)
    name = "cirr/val"
    split = env.source.split(name)
    meta = env.world.cirr_meta("val")
    scenes = {n: Scene.parse(v["scene"]) for n, v in read_json(env.world.cirr_root / "shapes_images.val.json").items()}
    originals = {meta[q.qid]["reshot_from"] for q in split.queries}
    keep = [i for i, g in enumerate(split.gallery) if g not in originals]
    column = {split.gallery[i]: j for j, i in enumerate(keep)}
    by_size: dict[int, list[str]] = {}
    for g in column:
        by_size.setdefault(len(scenes[g]), []).append(g)
    targets, excludes = [], []
    for q in split.queries:
        cell, target = kept_cell(Edit.from_dict(meta[q.qid]["edit"])), q.targets[0]
        want = relaxed(scenes[target], cell)
        others = [g for g in by_size[len(scenes[target])] if g != target and relaxed(scenes[g], cell) == want]
        reference = [column[q.reference]] if q.reference in column else []
        targets.append(column[target])
        excludes.append([*reference, *(column[g] for g in others)])
    targets_ = np.array(targets)

    def recall_at_1(method: Any, view: Any = split) -> float:
        features = env.source.features_for(method, name)
        with torch.no_grad():
            queries = compose_queries(method, view, features)
            gallery = gallery_embeddings(method, split, features)[keep]
        ranked = topk_inner_product(queries.float().numpy(), gallery.numpy(), 1, exclude=excludes)
        return 100.0 * float(np.mean(ranked.indices[:, 0] == targets_))

    rows: dict[str, list[float]] = {}
    for row in FREE_ROWS:
        rows[row] = [recall_at_1(create_method(row, env.backbone).eval())]
    rows["ref. caption + text"] = [
        recall_at_1(create_method("text-only", env.backbone).eval(), composition_split(split, meta))
    ]
    for seed in args.seeds:
        for row in PEERS:
            peer = train_or_load(row, source_env, seed, args.quick, args.runs, False)[0].eval()
            rows.setdefault(row, []).append(recall_at_1(peer))
        overrides = scaled_overrides(args.scale) if args.scale != 1.0 else ()
        combiner = train_or_load("combiner", env, seed, args.quick, args.variant_runs, False, overrides)[0].eval()
        rows.setdefault("combiner", []).append(recall_at_1(combiner))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items()), flush=True)
    print("| row | CIRR R@1, val | seeds |")
    print("|---|---|---|")
    for row, values in rows.items():
        spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
        print(f"| {row} | {statistics.mean(values):.1f}{spread} | " + ", ".join(f"{v:.1f}" for v in values) + " |")
    excluded = sum(len(e) for e in excludes) - sum(q.reference in column for q in split.queries)
    print(f"{name} of the re-shot variant, {len(split.queries)} queries, gallery {len(keep)} ({len(originals)} world")
    print(f"targets removed, {excluded} cell-free matches excluded); {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
