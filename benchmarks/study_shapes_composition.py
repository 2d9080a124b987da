"""Why `sum` beats the pseudo-word peers on the Shapes world: composition in text space against vector addition.

A pseudo-word method (Pic2Word, SEARLE, LinCIR) turns the reference into a token and lets the CLIP text tower
compose it with the modification text. The best such a token can do is stand for the reference as well as the
reference's own canonical caption does, so ``text-only`` on "<reference caption>, <text>" shows how far composing in
text space can go on this backbone. This script reports, on a **validation** split (never test), CIRR-format R@1
per edit kind for image-only, sum, the three peers (seed 0, trained with their Shapes presets, reused from
``--runs``) and that caption composition, first with the world's own modification texts, then with *target-state*
texts that name only what the edited object becomes ("the circle at the top is blue"; removals keep their text).
The second half asks whether less literal, CIRR-like texts would reorder the rows without touching the backbone.

    python benchmarks/study_shapes_composition.py [--quick] [--root runs/shapes] [--runs runs/demo/methods]

docs/RESULTS.md has its table (the calibration section).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cirlab.data.benchmark import CIRQuery
from cirlab.data.shapes import Scene
from cirlab.data.shapes.captions import object_phrase, where_phrase
from cirlab.data.shapes.edits import Edit
from cirlab.evaluation.evaluate import evaluate
from cirlab.experiments import SHAPES_ROOT
from cirlab.experiments.calibrate import composition_split, with_texts
from cirlab.experiments.runs import train_or_load
from cirlab.experiments.shapes_env import prepare_shapes
from cirlab.methods import create_method

ROWS = ("image-only", "sum", "pic2word", "searle", "lincir")
COMPOSITION = "text-only: reference caption + text"


def target_state(meta: dict, query: CIRQuery) -> str:
    """A text naming only what the edited object becomes, referring to it by attributes the edit keeps."""
    edit, ref = Edit.from_dict(meta["edit"]), Scene.parse(meta["reference_scene"])
    if edit.kind == "add":
        return f"there is also a {object_phrase(Scene.parse(meta['target_scene']).at(edit.cell))}"
    if edit.kind == "remove":
        return query.text  # a removal can only be said by naming what goes
    obj = ref.at(edit.cell)
    if edit.kind == "recolour":
        return f"the {obj.shape} {where_phrase(obj.cell)} is {edit.colour}"
    if edit.kind == "reshape":
        return f"the {obj.colour} object {where_phrase(obj.cell)} is a {edit.shape}"
    if edit.kind == "resize":
        return f"the {obj.colour} {obj.shape} is {edit.size}"
    return f"the {obj.colour} {obj.shape} is {where_phrase(edit.to_cell)}"  # move


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
    kinds: dict[str, list[int]] = {}
    for i, q in enumerate(split.queries):
        kinds.setdefault(meta[q.qid]["edit_type"], []).append(i)
    methods = {name: create_method(name, env.backbone).eval() for name in ("image-only", "sum", "text-only")}
    for name in ("pic2word", "searle", "lincir"):
        methods[name] = train_or_load(name, env, 0, args.quick, args.runs, False)[0].eval()
    features = env.source.features_for(methods["sum"], args.split)

    def target_text(q: CIRQuery) -> str:
        return target_state(meta[q.qid], q)

    header = "| texts | row | R@1 | " + " | ".join(kinds) + " |"
    lines = [header, "|" + "---|" * (3 + len(kinds))]
    for label, texts in (("the world's", lambda q: q.text), ("target-state", target_text)):
        variant = with_texts(split, texts)
        rows = [(name, methods[name], variant) for name in ROWS]
        rows.append((COMPOSITION, methods["text-only"], composition_split(variant, meta)))
        for name, method, sp in rows:
            result = evaluate(method, sp, features, subsets=kinds)
            cells = [f"{result.subsets[k]['recall_at_1']:.1f}" for k in kinds]
            lines.append(f"| {label} | {name} | {result.metrics['recall_at_1']:.1f} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print(f"{args.split}, world {env.world.world_id}, {len(split.queries)} queries; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
