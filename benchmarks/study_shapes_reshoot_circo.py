"""The re-shot probe of ``study_shapes_reshoot.py`` on the CIRCO-format **validation** split (never test).

A CIRCO-format query has an under-specified edit ("recolour it to a warm colour") and several ground truths. Here
every ground truth is rendered again with the objects its edit did not touch moved to other random cells (the
object the edit made or changed keeps its cell; after a removal every object may move), and the world's ground-truth
images leave the gallery. A gallery image counts as correct when it satisfies the edit with the untouched objects
anywhere; such images other than the re-shot ground truths are excluded from the query's ranking. The texts are the
world's, then the world's or a *target-state* text (what the edited object becomes: "the circle at the top is a
warm colour") followed by an alt-text caption of the re-shot main target (the CIRCO caption is written for it), as
in the CIRR-format probe. mAP@10 for the training-free rows, the peers (seed 0 unless ``--seed``) and
the reference-caption composition. ``--sum-weights W ...`` adds ``sum`` rows with the text weighted by W, the
modality-gap reading of the CIRR-format probe. ``--combiner-run DIR`` adds the CLIP4Cir combiner of a run trained on
a re-shot variant world (``study_shapes_reshoot_world.py``'s ``--variant-runs``, on the same backbone); it ranks on
its own fine-tuned image encoder's features. ``--by-kind`` also prints the last row's mAP@10 per edit kind.

    python benchmarks/study_shapes_reshoot_circo.py [--quick] [--root runs/shapes] [--runs runs/demo/methods] \\
        [--seed S] [--alt-full F] [--sum-weights W ...] [--clip DIR] [--gap C] [--combiner-run DIR] \\
        [--peer-set PEER:key=value ...] [--by-kind]

``--clip DIR`` runs it on another pretrained Shapes CLIP (``cirlab shapes-pretrain``'s ``OUT/shapes-clip``),
with the peers trained on that CLIP in ``--runs``. ``--gap C`` gives the CLIP a modality gap of length C
(``HFCLIPBackbone``'s ``modality_gap``: the text weighs 1 / sqrt(1 + C**2) in ``sum``), with the peers trained on
it (a run's key names its backbone, so they never mix with the shipped CLIP's).

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
from pathlib import Path

import torch
import torch.nn.functional as F

from cirlab.backbones.shapes_clip import shapes_clip
from cirlab.data.shapes import Scene, eval_caption
from cirlab.data.shapes.alttext import AltTextConfig, alt_caption
from cirlab.data.shapes.captions import where_phrase
from cirlab.data.shapes.edits import Edit
from cirlab.data.shapes.queries import changed_cell, reshoot
from cirlab.data.shapes.render import render_batch
from cirlab.evaluation.evaluate import gallery_embeddings
from cirlab.evaluation.metrics import circo_map_at_k
from cirlab.evaluation.ranking import topk_inner_product
from cirlab.experiments import SHAPES_ROOT
from cirlab.experiments.runs import train_or_load
from cirlab.experiments.shapes_env import ShapesEnv, prepare_shapes
from cirlab.methods import create_method
from cirlab.methods.base import load_method
from cirlab.types import ImageFeatures

ROWS = ("image-only", "sum", "text-only", "pic2word", "searle", "lincir", "ref. caption + text")


def target_state(edit: Edit, reference: Scene, text: str) -> str:
    """A text naming only what the edited object becomes, as ``study_shapes_composition.target_state`` does for the
    exact edits; a removal keeps the world's text."""
    if edit.kind == "add_any":
        return f"there is also a {edit.colour} {edit.shape}"
    if edit.kind == "remove_one":
        return text
    obj = reference.at(edit.cell)
    if edit.kind == "move_region":
        return f"the {obj.colour} {obj.shape} is in the {edit.region}"
    if edit.kind == "reshape_any":
        return f"the {obj.colour} object {where_phrase(obj.cell)} is another shape"
    if edit.kind == "recolour_group":
        return f"the {obj.shape} {where_phrase(obj.cell)} is a {edit.group} colour"
    return f"the {obj.shape} {where_phrase(obj.cell)} is another colour"  # recolour_any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=SHAPES_ROOT)
    parser.add_argument("--quick", action="store_true", help="the quick world, its peers at the quick schedules")
    parser.add_argument("--runs", type=Path, default=Path("runs/demo/methods"))
    parser.add_argument("--seed", type=int, default=0, help="which trained peers to reuse (or train)")
    parser.add_argument("--alt-full", type=float, default=AltTextConfig().full)
    parser.add_argument("--clip", type=Path, default=None, help="another pretrained Shapes CLIP directory")
    parser.add_argument("--gap", type=float, default=0.0, help="the CLIP's modality gap (0: none)")
    parser.add_argument("--sum-weights", type=float, nargs="*", default=[], help="extra sum rows at these text weights")
    parser.add_argument("--combiner-run", type=Path, default=None, help="a combiner run trained on a re-shot variant")
    parser.add_argument(
        "--peer-set", nargs="*", default=[], help="PEER:key=value run-config overrides of a peer (a diagnosis)"
    )
    parser.add_argument(
        "--by-kind", action="store_true", help="the last row's mAP@10 per edit kind as well (a diagnosis)"
    )
    args = parser.parse_args()
    t0 = time.perf_counter()
    env = prepare_shapes(quick=args.quick, root=args.root, log=print)
    if args.clip is not None or args.gap:  # features are cached per backbone, so the shipped CLIP's are not reused
        clip = shapes_clip(str(args.clip) if args.clip else None, modality_gap=args.gap).freeze()
        env = ShapesEnv(env.world, clip, env.source, env.clip_metrics, args.clip or env.clip_dir)
    name = "circo/val"
    split = env.source.split(name)
    meta = env.world.circo_meta("val")
    images = json.loads((env.world.circo_root / "shapes_images.json").read_text())
    scenes = {g: Scene.parse(images[g]["scene"]) for g in split.gallery}
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
    if args.combiner_run is not None:
        methods["combiner"] = load_method(args.combiner_run, backbone=env.backbone).eval()
        rows.insert(rows.index("lincir") + 1, "combiner")
    for w in args.sum_weights:
        rows.insert(rows.index("text-only"), f"sum, text x{w:g}")
        methods[rows[rows.index("text-only") - 1]] = create_method("sum", env.backbone, {"text_weight": w}).eval()
    edits = {q.qid: Edit.from_dict(meta[q.qid]["edit"]) for q in split.queries}
    refs = {q.qid: Scene.parse(meta[q.qid]["reference_scene"]) for q in split.queries}

    # The re-shot ground truths; the world's leave the gallery.
    rng = random.Random("reshoot-circo")
    new: dict[str, tuple[Scene, int]] = {}
    truths: dict[str, list[str]] = {}
    for q in split.queries:
        truths[q.qid] = []
        for gt in q.targets:
            moved = reshoot(scenes[gt], changed_cell(refs[q.qid], scenes[gt]), rng)
            new[f"reshot-{gt}-{q.qid}"] = (moved, rng.getrandbits(31))
            truths[q.qid].append(f"reshot-{gt}-{q.qid}")
    # The cell-free reading must accept every ground truth, the world's and the re-shot ones.
    for q in split.queries:
        for gt in [*(scenes[g] for g in q.targets), *(new[g][0] for g in truths[q.qid])]:
            if not edits[q.qid].satisfied_anywhere(refs[q.qid], gt):
                raise RuntimeError(f"query {q.qid}: ground truth {gt.to_str()} fails the cell-free reading")
    world_truths = {gt for q in split.queries for gt in q.targets}
    kept = [g for g in split.gallery if g not in world_truths]
    rendered = render_batch(list(new.values()), env.world.config.render)
    parts = [embeds[[row[g] for g in kept]]]
    with torch.no_grad():
        for s in range(0, len(rendered), 256):
            pixels = env.backbone.image_transform.from_uint8(rendered[s : s + 256])
            parts.append(env.backbone.encode_image(pixels).embeds.float())
    reshot_gallery = F.normalize(torch.cat(parts), dim=-1).numpy()
    reshot_names = [*kept, *new]
    scenes |= {n: s for n, (s, _) in new.items()}
    column = {g: i for i, g in enumerate(reshot_names)}
    excludes = []
    for q in split.queries:
        own = set(truths[q.qid])
        hits = [g for g in reshot_names if g not in own and edits[q.qid].satisfied_anywhere(refs[q.qid], scenes[g])]
        excludes.append([column[g] for g in hits])
    alt_rng, alt_cfg = random.Random("reshoot-circo/alt"), AltTextConfig(full=args.alt_full)
    alts = {q.qid: alt_caption(new[truths[q.qid][0]][0], alt_rng, alt_cfg)[0] for q in split.queries}
    world_gallery = F.normalize(embeds[[row[g] for g in split.gallery]], dim=-1).numpy()
    world_column = {g: i for i, g in enumerate(split.gallery)}
    reshot_truths = [[column[g] for g in truths[q.qid]] for q in split.queries]
    shared = (reference_features, world_gallery, reshot_gallery)

    def views(method: object) -> tuple[ImageFeatures, object, object]:
        """References, world gallery and re-shot gallery as ``method`` sees them (its own fine-tuned image encoder,
        if it has one)."""
        if method.image_encoder_frozen:
            return shared
        own = env.source.features_for(method, name)
        own_row = {n: i for i, n in enumerate(own.names)}
        refs_ = own.embeds.float()[[own_row[q.reference] for q in split.queries]]
        refs_ = ImageFeatures(refs_, torch.empty(len(refs_), 0, 0))
        world = gallery_embeddings(method, split, own)  # (N, d), normalised
        parts_ = [world[[world_column[g] for g in kept]]]
        with torch.no_grad():
            for s in range(0, len(rendered), 256):
                pixels = method.backbone.image_transform.from_uint8(rendered[s : s + 256])
                parts_.append(method.encode_gallery(method.backbone.encode_image(pixels)).float())
        return refs_, world.numpy(), F.normalize(torch.cat(parts_), dim=-1).numpy()

    seen = {n: views(m) for n, m in methods.items()}
    world_truths_ = [[world_column[g] for g in q.targets] for q in split.queries]
    variants = [  # (ground truths, texts, ground-truth columns, with the alt-text)
        ("the world's", "the world's", world_truths_, False),
        ("re-shot", "the world's", reshot_truths, False),
        ("re-shot", "the world's + target alt-text", reshot_truths, True),
        ("re-shot", "target-state + target alt-text", reshot_truths, True),
    ]
    lines = ["| ground truths | texts | " + " | ".join(rows) + " |", "|---" * (2 + len(rows)) + "|"]
    kinds: dict[str, list[int]] = {}
    for i, q in enumerate(split.queries):
        kinds.setdefault(edits[q.qid].kind, []).append(i)
    by_kind: dict[str, list[float]] = {}
    for where, label, gts, with_alt in variants:
        exclude = excludes if where == "re-shot" else None
        texts = [q.text for q in split.queries]
        if label.startswith("target-state"):
            texts = [target_state(edits[q.qid], refs[q.qid], q.text) for q in split.queries]
        if with_alt:
            texts = [f"{t}, {alts[q.qid]}" for q, t in zip(split.queries, texts, strict=True)]
        cells = []
        for method_name in rows:
            refs_seen, world_seen, reshot_seen = seen.get(method_name, shared)
            gallery = reshot_seen if where == "re-shot" else world_seen
            with torch.no_grad():
                if method_name == "ref. caption + text":
                    composed = [f"{eval_caption(refs[q.qid])}, {t}" for q, t in zip(split.queries, texts, strict=True)]
                    queries = env.backbone.encode_text(composed).embeds
                else:
                    queries = methods[method_name].compose(refs_seen, texts)
            ranked = topk_inner_product(F.normalize(queries.float(), dim=-1).numpy(), gallery, 10, exclude=exclude)
            cells.append(circo_map_at_k(ranked.indices, [set(g) for g in gts], 10))
            if label.startswith("target-state"):  # the last variant: its rows per edit kind
                by_kind[method_name] = [
                    circo_map_at_k(ranked.indices[idx], [set(gts[i]) for i in idx], 10) for idx in kinds.values()
                ]
        lines.append(f"| {where} | {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    if args.by_kind:
        print("\nre-shot, target-state + target alt-text, mAP@10 per edit kind (queries):")
        print("| row | " + " | ".join(f"{k} ({len(v)})" for k, v in kinds.items()) + " |")
        print("|---" * (1 + len(kinds)) + "|")
        for method_name, values in by_kind.items():
            print(f"| {method_name} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    n_excluded = sum(map(len, excludes))
    print(f"{name}, world {env.world.world_id}, {len(split.queries)} queries, {len(new)} re-shot ground truths,")
    print(f"{n_excluded} cell-free matches excluded; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
