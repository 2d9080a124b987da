"""Is a pseudo-word peer held back by the modality gap, or by what one word can hold?

Pic2Word, SEARLE and LinCIR map the reference's *image* embedding to one token. LinCIR learns that map from
*caption* embeddings only, so a gap between the two modalities would hurt it most. This script composes each peer's
query three ways on a **validation** split (never test) and reports CIRR-format R@1 (the reference removed from
its ranking, as CIRR's protocol does):

* from the image embedding, as the method runs;
* from the text embedding of the reference's exact canonical caption, where LinCIR's map was trained;
* from the image embedding rescaled to the caption embeddings' mean norm: the gap in scale alone.

It also prints the two modalities' mean norms and the mean cosine of an image with its own caption. Seed-0 peers,
trained with their Shapes presets, are reused from ``--runs``.

    python benchmarks/study_shapes_pseudo_word.py [--quick] [--root runs/shapes] [--runs runs/demo/methods]

docs/RESULTS.md has its table (the calibration section).
"""

from __future__ import annotations

import argparse
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
from cirlab.types import ImageFeatures

PEERS = ("pic2word", "searle", "lincir")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick world")
    parser.add_argument("--root", type=Path, default=SHAPES_ROOT)
    parser.add_argument("--runs", type=Path, default=Path("runs/demo/methods"))
    parser.add_argument("--split", default="cirr/val", help="a CIRR-format validation split")
    args = parser.parse_args()
    if not args.split.startswith("cirr/") or "test" in args.split:
        parser.error("--split must be a CIRR-format validation split")
    t0 = time.perf_counter()
    env = prepare_shapes(quick=args.quick, root=args.root, log=print)
    split = env.source.split(args.split)
    meta = env.world.cirr_meta(args.split.partition("/")[2])
    features = env.source.features(args.split, env.backbone)
    row = {name: i for i, name in enumerate(features.names)}
    gallery = F.normalize(features.embeds.float()[[row[g] for g in split.gallery]], dim=-1).numpy()  # (N, d)
    column = {name: i for i, name in enumerate(split.gallery)}
    references = np.array([[column[q.reference]] for q in split.queries])  # (Q, 1): CIRR removes the reference
    targets = np.array([column[q.targets[0]] for q in split.queries])
    texts = [q.text for q in split.queries]
    image = features.embeds.float()[[row[q.reference] for q in split.queries]]  # (Q, d)
    captions = [eval_caption(Scene.parse(meta[q.qid]["reference_scene"])) for q in split.queries]
    with torch.no_grad():
        caption = env.backbone.encode_text(captions).embeds.float()  # (Q, d)
    rescaled = F.normalize(image, dim=-1) * caption.norm(dim=-1).mean()
    cosine = F.cosine_similarity(image, caption).mean()
    print(f"mean norm: image {image.norm(dim=-1).mean():.3f}, caption {caption.norm(dim=-1).mean():.3f}")
    print(f"mean cosine of an image with its own caption: {cosine:.3f}")

    def recall_at_1(queries: torch.Tensor) -> float:
        ranked = topk_inner_product(F.normalize(queries.float(), dim=-1).numpy(), gallery, 1, exclude=references)
        return 100.0 * float(np.mean(ranked.indices[:, 0] == targets))

    lines = ["| peer | from the image | from the reference caption | image at the caption norm |", "|---|---|---|---|"]
    for name in PEERS:
        method = train_or_load(name, env, 0, args.quick, args.runs, False)[0].eval()
        cells = []
        for embeds in (image, caption, rescaled):
            with torch.no_grad():
                cells.append(recall_at_1(method.compose(ImageFeatures(embeds, torch.empty(len(embeds), 0, 0)), texts)))
        lines.append(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    print("\n".join(lines))
    print(f"{args.split}, world {env.world.world_id}, {len(split.queries)} queries; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
