"""Would an uncaptioned "setting" in the image embeddings reorder `sum` and the peers? A simulation on val.

Real photographs carry much that no caption names (light, background, viewpoint), and CIRR's gallery holds images
of the reference's look. Pretraining a Shapes CLIP on such a setting showed that it learns the setting away
(docs/RESULTS.md), so this script simulates what a CLIP that kept it would give, on a CIRR-format **validation**
split (never test): every image embedding ``e`` becomes ``normalize(normalize(e) + weight * u_k)``, ``u_k`` a random
unit direction of setting ``k`` (``--settings`` of them). The members of a query's image set share the reference's
setting with probability ``--share``, else draw one; every other gallery image draws one. Text embeddings are
untouched. The peers (seed 0) are given the shifted reference embedding at its original norm; their maps were
trained without any setting, so this is a simulation of the benchmark side only.

    python benchmarks/study_shapes_nuisance.py [--root runs/shapes] [--runs runs/demo/methods] [--weights 0 0.3 0.6 1]

docs/RESULTS.md has its table (the calibration section).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cirlab.data.shapes import Scene, eval_caption
from cirlab.evaluation.ranking import topk_inner_product
from cirlab.experiments import SHAPES_ROOT
from cirlab.experiments.runs import train_or_load
from cirlab.experiments.shapes_env import prepare_shapes
from cirlab.methods import create_method
from cirlab.types import ImageFeatures

ROWS = ("image-only", "sum", "text-only", "pic2word", "searle", "lincir", "ref. caption + text")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=SHAPES_ROOT)
    parser.add_argument("--runs", type=Path, default=Path("runs/demo/methods"))
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.3, 0.6, 1.0])
    parser.add_argument("--settings", type=int, default=8)
    parser.add_argument("--share", type=float, default=0.5)
    args = parser.parse_args()
    t0 = time.perf_counter()
    env = prepare_shapes(quick=False, root=args.root, log=print)
    name = "cirr/val"
    split = env.source.split(name)
    meta = env.world.cirr_meta("val")
    features = env.source.features(name, env.backbone)
    row = {n: i for i, n in enumerate(features.names)}
    raw = features.embeds.float()
    directions = F.normalize(
        torch.randn(args.settings, raw.shape[1], generator=torch.Generator().manual_seed(0)), dim=-1
    )
    rng = random.Random("nuisance")
    setting: dict[str, int] = {}
    for q in split.queries:
        k = setting.setdefault(q.reference, rng.randrange(args.settings))
        for member in q.subset or []:
            if member not in setting:
                setting[member] = k if rng.random() < args.share else rng.randrange(args.settings)
    for g in split.gallery:
        setting.setdefault(g, rng.randrange(args.settings))
    column = {g: i for i, g in enumerate(split.gallery)}
    references = [row[q.reference] for q in split.queries]
    excludes = np.array([[column[q.reference]] for q in split.queries])  # CIRR removes the reference
    targets = np.array([column[q.targets[0]] for q in split.queries])
    texts = [q.text for q in split.queries]
    composed = [f"{eval_caption(Scene.parse(meta[q.qid]['reference_scene']))}, {q.text}" for q in split.queries]
    methods = {n: create_method(n, env.backbone).eval() for n in ("image-only", "sum", "text-only")}
    for n in ("pic2word", "searle", "lincir"):
        methods[n] = train_or_load(n, env, 0, False, args.runs, False)[0].eval()
    lines = ["| weight | " + " | ".join(ROWS) + " |", "|---" * (1 + len(ROWS)) + "|"]
    for weight in args.weights:
        shift = directions[[setting[n] for n in features.names]]  # (N, d)
        shifted = F.normalize(F.normalize(raw, dim=-1) + weight * shift, dim=-1)
        gallery = shifted[[row[g] for g in split.gallery]].numpy()
        reference = shifted[references] * raw[references].norm(dim=-1, keepdim=True)
        reference_features = ImageFeatures(reference, torch.empty(len(reference), 0, 0))
        cells = []
        for method_name in ROWS:
            with torch.no_grad():
                if method_name == "ref. caption + text":
                    queries = env.backbone.encode_text(composed).embeds
                else:
                    queries = methods[method_name].compose(reference_features, texts)
            ranked = topk_inner_product(F.normalize(queries.float(), dim=-1).numpy(), gallery, 1, exclude=excludes)
            cells.append(100.0 * float(np.mean(ranked.indices[:, 0] == targets)))
        lines.append(f"| {weight:g} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    print("\n".join(lines))
    seconds = time.perf_counter() - t0
    print(f"{name}, world {env.world.world_id}, {args.settings} settings, share {args.share}; {seconds:.0f} s")


if __name__ == "__main__":
    main()
