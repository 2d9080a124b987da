"""The Shapes CLIP's cross-modal geometry, and what a wider modality gap would make of it (validation only).

``study_shapes_reshoot.py --sum-weights W`` scores ``sum`` with its text weighted by W, which is how it would score
on a backbone whose text embeddings all carried one more shared offset orthogonal to every image embedding, with
W = 1 / |text + offset|. This script says what such a backbone would look like, so that a pretraining change can be
aimed at it: on the CIRR-format val split it measures, for the backbone as it is and for the offset of each W,

* the mean cosine of a gallery image with its own canonical caption, and with the other images' captions;
* the mean pairwise cosine among images, among the captions, and among the modification texts;
* the distance between the image and the caption centroids (the modality gap as it is usually reported);
* per query, the spread (standard deviation over the gallery) of the reference image's cosine and of the
  modification text's cosine, averaged over queries: how much each term of ``sum`` moves its ranking;
* the logit scale at which the gapped backbone scores CLIP's image-text logits unchanged (``HFCLIPBackbone``
  lifts it so): the CLIP's own scale over W. Real CLIPs learn a scale of 100 (the clamp), so W = scale / 100 is the
  gap at which this small CLIP's cross-modal cosines are as compressed as a real CLIP's must be for the same logits.

The offset changes text cosines only; image-to-image ones stay as they are, and so does every text-to-image
ranking.

    python benchmarks/study_shapes_gap.py [--root runs/shapes] [--weights 1 0.7 0.5 0.3] [--clip DIR]

``--clip DIR`` measures another pretrained Shapes CLIP (``cirlab shapes-pretrain``'s ``OUT/shapes-clip``) instead.

docs/RESULTS.md has its table (the calibration section).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from cirlab.backbones.shapes_clip import shapes_clip
from cirlab.data.shapes import Scene, eval_caption
from cirlab.experiments import SHAPES_ROOT
from cirlab.experiments.shapes_env import ShapesEnv, prepare_shapes


def _mean_pairwise(x: torch.Tensor) -> float:
    """The mean cosine over distinct pairs of the rows of the (N, d) unit-norm ``x``."""
    n, total = len(x), float(x.sum(0).pow(2).sum())
    return (total - n) / (n * (n - 1))


def _encode(env: object, texts: list[str]) -> torch.Tensor:
    parts = [env.backbone.encode_text(texts[s : s + 512]).embeds.float() for s in range(0, len(texts), 512)]
    return F.normalize(torch.cat(parts), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=SHAPES_ROOT)
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0, 0.7, 0.5, 0.3])
    parser.add_argument("--clip", type=Path, default=None, help="another pretrained Shapes CLIP directory")
    args = parser.parse_args()
    env = prepare_shapes(quick=False, root=args.root, log=print)
    if args.clip is not None:  # the features are cached per backbone, so the shipped CLIP's are not reused
        backbone = shapes_clip(str(args.clip)).freeze()
        env = ShapesEnv(env.world, backbone, env.source, env.clip_metrics, args.clip)
    name = "cirr/val"
    split = env.source.split(name)
    features = env.source.features(name, env.backbone)
    row = {n: i for i, n in enumerate(features.names)}
    images = F.normalize(features.embeds.float()[[row[g] for g in split.gallery]], dim=-1)  # (N, d)
    scenes = json.loads((env.world.cirr_root / "shapes_images.val.json").read_text())
    with torch.no_grad():
        captions = _encode(env, [eval_caption(Scene.parse(scenes[g]["scene"])) for g in split.gallery])  # (N, d)
        texts = _encode(env, [q.text for q in split.queries])  # (Q, d)
    references = F.normalize(features.embeds.float()[[row[q.reference] for q in split.queries]], dim=-1)
    matched = float((images * captions).sum(-1).mean())
    cross = images @ captions.T
    unmatched = (float(cross.sum()) - float(cross.diagonal().sum())) / (cross.numel() - len(cross))
    image_spread = float((references @ images.T).std(dim=1).mean())
    text_spread = float((texts @ images.T).std(dim=1).mean())
    image_pairs = _mean_pairwise(images)
    caption_pairs, text_pairs = _mean_pairwise(captions), _mean_pairwise(texts)
    image_centre, caption_centre = images.mean(0), captions.mean(0)
    print(f"{name}, world {env.world.world_id}: {len(split.gallery)} gallery images, {len(split.queries)} queries")
    print(
        "| text weight W | image-own caption | image-other captions | image-image | caption-caption | text-text"
        " | centroid distance | reference spread | text spread | logit scale |"
    )
    print("|---" * 10 + "|")
    scale = float(env.backbone.model.logit_scale.exp())
    for w in args.weights:
        # An offset c orthogonal to every embedding, |c|^2 = 1/W^2 - 1: a text t becomes (t + c) / |t + c| = W (t + c),
        # so text-image cosines scale by W, and text-text cosines become W^2 (cos + |c|^2).
        c2 = 1.0 / (w * w) - 1.0
        shifted_caption_centre = w * caption_centre
        distance = math.sqrt(float((image_centre - shifted_caption_centre).pow(2).sum()) + w * w * c2)
        cells = [
            w * matched,
            w * unmatched,
            image_pairs,
            w * w * (caption_pairs + c2),
            w * w * (text_pairs + c2),
            distance,
            image_spread,
            w * text_spread,
        ]
        print(f"| {w:g} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {scale / w:.1f} |")
    w100 = scale / 100.0
    c100 = math.sqrt(1 / w100**2 - 1)
    print(f"logit scale {scale:.2f}: a real CLIP's 100 is reached at W = {w100:.4f} (C = {c100:.4f})")


if __name__ == "__main__":
    main()
