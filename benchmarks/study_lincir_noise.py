"""LinCIR on the Shapes world: the modality gap, and the noise that should bridge it.

LinCIR's mapper ``phi`` is trained on noised *text* embeddings and reads *image* embeddings at test time. This
script measures the gap in the Shapes CLIP's space on the corpus (matched image-caption cosine, the distance
between the image and text means, the per-dimension spread of each), then trains LinCIR with several noise scales
(``method.noise_max``) and reports each run's **validation** score (CIRR-format ``val`` Avg, the metric the
training loop selects checkpoints on). The scale is chosen on validation only; test numbers are not printed here.

    python benchmarks/study_lincir_noise.py [--quick] [--seed N] [--mask phrases|words] [--noise 0 0.1 0.25 1.0]

``--mask words`` masks each attribute and shape word alone (the keyword stand-in), in place of the preset's
part-of-speech lexicon. docs/RESULTS.md has its tables, before and after LinCIR's phrase masking (``method.mask``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cirlab.data.shapes.captions import SIZE_WORDS
from cirlab.data.shapes.world import COLOURS, SHAPES
from cirlab.experiments import SHAPES_ROOT
from cirlab.experiments.runs import train_or_load
from cirlab.experiments.shapes_env import prepare_shapes
from cirlab.methods.base import DataRequest
from cirlab.modules.pseudo_word import text_embeds

# The attribute and shape words, masked one by one with ``--mask words`` (the keyword stand-in).
WORDS = (*SHAPES, *COLOURS, *(w for words in SIZE_WORDS.values() for w in words))


def gap_statistics(env, n: int = 1000) -> dict[str, float]:
    """Image vs caption embeddings of ``n`` corpus images in the backbone's space (normalised embeddings)."""
    data = env.source.stage_data(DataRequest("pairs", env.backbone))
    table, captions = data.images, data.captions
    rows = torch.arange(min(n, len(table)))
    with torch.no_grad():
        v = F.normalize(table.gather(rows).embeds.float(), dim=-1)  # (n, d)
        t = text_embeds(env.backbone, [captions[i][0] for i in rows.tolist()])  # (n, d), normalised
    gap = v.mean(0) - t.mean(0)
    return {
        "cos(image, own caption)": float((v * t).sum(-1).mean()),
        "cos(image, other captions)": float((v @ t.t()).mean()),
        "|mean image - mean text|": float(gap.norm()),
        "per-dim std, image": float(v.std(0).mean()),
        "per-dim std, text": float(t.std(0).mean()),
        "dim": float(v.shape[1]),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small world and a quarter of the steps")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mask", choices=["phrases", "words"], default="phrases", help="LinCIR's method.mask")
    parser.add_argument("--root", type=Path, default=SHAPES_ROOT)
    parser.add_argument("--runs", type=Path, default=Path("runs") / "demo" / "methods")
    args = parser.parse_args(argv)

    env = prepare_shapes(quick=args.quick, root=args.root)
    for key, value in gap_statistics(env).items():
        print(f"{key:28s} {value:8.3f}")
    print("\n| noise_max | val Avg | val R@1 | val R@5 | train s |\n|---|---|---|---|---|")
    for noise in args.noise:
        t0 = time.perf_counter()
        overrides = (f"method.noise_max={noise}", f"method.mask={args.mask}")
        if args.mask == "words":  # each keyword alone: the keyword stand-in, in place of the preset's lexicon
            overrides += ("method.pos_lexicon={}", f"method.keywords=[{','.join(WORDS)}]")
        _, report = train_or_load("lincir", env, args.seed, args.quick, args.runs, False, overrides)
        val = report["mapping"]["val"]
        print(
            f"| {noise:g} | {val['avg']:.1f} | {val['recall_at_1']:.1f} | {val['recall_at_5']:.1f} | "
            f"{time.perf_counter() - t0:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
