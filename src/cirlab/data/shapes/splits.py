"""The benchmark splits of a Shapes world, written in the CIRR and CIRCO formats (``write_cirr``, ``write_circo``).

Every query of a CIRR split has a 6-image ``img_set``: reference, target and 4 hard distractors one step away
from the target. A split's gallery (its ``image_splits`` file) holds every image its queries use plus
``extra_gallery`` random scenes; every gallery image shows a different scene, and no gallery image but a query's
own ground truths satisfies its edit in the world's semantics (``queries.satisfied``: anywhere, when the style
re-shoots): a query that another query's images would answer, or whose images would answer another, is drawn
again, and so is an extra scene that would answer one. So a CIRR-format target is the only correct image, and a
CIRCO-format query's ground truths are exactly its rendered ones. Image names and CIRCO ids are assigned after
shuffling, so they say nothing about roles.

Held-out templates and combinations appear only in test queries (``test1``, CIRCO ``test``), flagged in the
``shapes_meta`` files; train and val images, texts and scenes contain neither. The whole world's layout is in
``shapes_world.py``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cirlab.data.shapes.edits import EXACT_KINDS, OPEN_KINDS, Looks, looks
from cirlab.data.shapes.queries import (
    ShapesQuery,
    sample_circo_query,
    sample_cirr_query,
    satisfied,
    shared_concept,
)
from cirlab.data.shapes.render import write_pngs
from cirlab.data.shapes.world import Combo, Scene, ShapesConfig, combo_filter, component_rng, sample_scene

CIRR_SPLITS: dict[str, str] = {"train": "train", "val": "dev", "test1": "test1"}
"""CIRR split name -> image folder and name prefix (val images are ``dev-*`` in the real CIRR as well)."""

CIRCO_SPLITS: tuple[str, ...] = ("val", "test")

Log = Callable[[str], None]

_MAX_REDRAWS = 200


class _Guard:
    """Keeps second answers out of a gallery: the images of the queries accepted so far, indexed by their looks
    (objects without cells), and the looks each query's answers must have (``Edit.target_looks``)."""

    def __init__(self, cfg: ShapesConfig) -> None:
        self.cfg = cfg
        self.have: dict[Looks, set[Scene]] = {}
        self.wanted: dict[Looks, list[ShapesQuery]] = {}

    def _answers(self, q: ShapesQuery, scene: Scene) -> bool:
        return scene not in q.targets and satisfied(self.cfg.style, q.edit, q.reference, scene)

    def conflicts(self, q: ShapesQuery) -> bool:
        """Whether ``q`` has a second answer among the gallery and its own images, or answers an earlier query."""
        images = [q.reference, *q.targets, *q.distractors]
        keys = q.edit.target_looks(q.reference, self.cfg.scene.shapes, self.cfg.scene.colours)
        own = [s for s in images if looks(s.objects) in keys]
        if any(self._answers(q, s) for key in keys for s in self.have.get(key, ())):
            return True
        return any(self._answers(q, s) for s in own) or any(map(self.blocks, images))

    def blocks(self, scene: Scene) -> bool:
        """Whether ``scene`` answers an accepted query it is not a ground truth of."""
        return any(self._answers(r, scene) for r in self.wanted.get(looks(scene.objects), ()))

    def add(self, q: ShapesQuery) -> None:
        """Accepts ``q``: its images join the gallery and its answers are watched for."""
        for scene in (q.reference, *q.targets, *q.distractors):
            self.have.setdefault(looks(scene.objects), set()).add(scene)
        for key in q.edit.target_looks(q.reference, self.cfg.scene.shapes, self.cfg.scene.colours):
            self.wanted.setdefault(key, []).append(q)

    def draw(self, sample: Callable[[], ShapesQuery]) -> ShapesQuery:
        """``sample()`` until a query without conflicts comes, then accepts it."""
        for _ in range(_MAX_REDRAWS):
            q = sample()
            if not self.conflicts(q):
                self.add(q)
                return q
        raise RuntimeError(f"no query without a second answer in the gallery in {_MAX_REDRAWS} draws")


def dump_json(path: Path, obj: Any, indent: int | None = None) -> None:
    """Writes ``obj`` as JSON (compact without ``indent``), creating the folder: the world's annotation files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    separators = (",", ":") if indent is None else None
    path.write_text(json.dumps(obj, indent=indent, separators=separators) + "\n", encoding="utf-8")


def _flags(rng: random.Random, n: int, fraction: float) -> list[bool]:
    """Exactly ``round(fraction * n)`` True values at random positions."""
    k = round(fraction * n)
    flags = [i < k for i in range(n)]
    rng.shuffle(flags)
    return flags


def _balanced_kinds(rng: random.Random, n: int, kinds: Sequence[str]) -> list[str]:
    out = [kinds[i % len(kinds)] for i in range(n)]
    rng.shuffle(out)
    return out


class _Gallery:
    """Distinct scenes in insertion order; ``names`` are assigned once, after a shuffle."""

    def __init__(self) -> None:
        self.index: dict[Scene, int] = {}

    def add(self, scene: Scene) -> None:
        self.index.setdefault(scene, len(self.index))

    def __contains__(self, scene: object) -> bool:
        return scene in self.index

    def __len__(self) -> int:
        return len(self.index)

    def add_extras(
        self,
        rng: random.Random,
        cfg: ShapesConfig,
        n: int,
        combo_ok: Callable[[Combo], bool],
        avoid: frozenset[Scene],
        guard: _Guard,
    ) -> None:
        """Adds ``n`` random scenes that are not yet present, not in ``avoid`` and answer no query of ``guard``."""
        target = len(self) + n
        while len(self) < target:
            scene = sample_scene(rng, cfg.scene, combo_ok)
            if scene not in self and scene not in avoid and not guard.blocks(scene):
                self.add(scene)

    def shuffled(self, rng: random.Random) -> list[Scene]:
        scenes = list(self.index)
        rng.shuffle(scenes)
        return scenes


def _query_meta(q: ShapesQuery) -> dict[str, Any]:
    return {
        "edit_type": q.edit.kind,
        "edit": q.edit.to_dict(),
        "template": q.verbalised.template,
        "referring": list(q.verbalised.referring),
        "heldout_template": q.heldout_template,
        "heldout_combo": q.heldout_combo,
        "reference_scene": q.reference.to_str(),
        "target_scene": q.targets[0].to_str(),
    }


# ---------------------------------------------------------------------------------------------------------------- CIRR


def _cirr_queries(cfg: ShapesConfig, split: str, n: int, rng: random.Random, guard: _Guard) -> list[ShapesQuery]:
    test = split == "test1"
    heldout_t = _flags(rng, n, cfg.cirr.heldout_template_fraction) if test else [False] * n
    heldout_c = _flags(rng, n, cfg.cirr.heldout_combo_fraction) if test else [False] * n
    pool = sorted(cfg.scene.heldout)
    return [
        guard.draw(
            lambda kind=kind, ht=ht, hc=hc: sample_cirr_query(
                rng,
                cfg.scene,
                cfg.heldout_templates,
                kind=kind,
                focus_pool=pool if hc else [],
                heldout_template=ht,
                n_distractors=4,
                style=cfg.style,
            )
        )
        for kind, ht, hc in zip(_balanced_kinds(rng, n, EXACT_KINDS), heldout_t, heldout_c, strict=True)
    ]


def _cirr_split(cfg: ShapesConfig, split: str, n: int, first_pairid: int, root: Path) -> int:
    """Samples, renders and writes one CIRR split; returns the number of gallery images."""
    rng = component_rng(cfg.seed, "cirr", split)
    guard = _Guard(cfg)
    queries = _cirr_queries(cfg, split, n, rng, guard)
    gallery = _Gallery()
    for q in queries:
        for scene in (q.reference, q.targets[0], *q.distractors):
            gallery.add(scene)
    # Extra scenes in test may hold held-out combinations too, so those are not a tell of the held-out queries.
    extra_ok = (lambda _: True) if split == "test1" else combo_filter(cfg.scene.heldout)
    gallery.add_extras(rng, cfg, cfg.cirr.extra_gallery, extra_ok, frozenset(), guard)

    folder = CIRR_SPLITS[split]
    scenes = gallery.shuffled(rng)
    width = max(5, len(str(len(scenes) - 1)))
    names = {s: f"{folder}-{i:0{width}d}" for i, s in enumerate(scenes)}
    paths, images, jobs = {}, {}, []
    for i, scene in enumerate(scenes):
        name = names[scene]
        sub = f"{folder}/{i % cfg.cirr.train_subdirs}" if split == "train" else folder
        seed = rng.getrandbits(31)
        paths[name] = f"./{sub}/{name}.png"
        images[name] = {"scene": scene.to_str(), "seed": seed}
        jobs.append((root / "img_raw" / sub / f"{name}.png", scene, seed))
    write_pngs(jobs, cfg.render)

    captions, meta = [], {}
    for k, q in enumerate(queries):
        pairid = first_pairid + k
        ref, tgt = names[q.reference], names[q.targets[0]]
        members = [ref, tgt, *(names[d] for d in q.distractors)]
        rng.shuffle(members)
        # Annotation-time ranks in the real CIRR are not positions in ``members``; random ranks keep loaders honest.
        reference_rank, target_rank = rng.sample(range(6), 2)
        captions.append(
            {
                "pairid": pairid,
                "reference": ref,
                "target_hard": tgt,
                "target_soft": {tgt: 1.0},
                "caption": q.verbalised.text,
                "img_set": {
                    "id": pairid,
                    "members": members,
                    "reference_rank": reference_rank,
                    "target_rank": target_rank,
                },
            }
        )
        meta[str(pairid)] = _query_meta(q)
    dump_json(root / "captions" / f"cap.rc2.{split}.json", captions)
    dump_json(root / "image_splits" / f"split.rc2.{split}.json", dict(sorted(paths.items())))
    dump_json(root / f"shapes_meta.{split}.json", meta, indent=1)
    dump_json(root / f"shapes_images.{split}.json", dict(sorted(images.items())), indent=1)
    return len(scenes)


def write_cirr(cfg: ShapesConfig, root: Path, log: Log) -> dict[str, int]:
    """Writes the three CIRR splits under ``root`` (the ``cirr`` folder); pairids are unique across splits."""
    sizes = {"train": cfg.cirr.train_queries, "val": cfg.cirr.val_queries, "test1": cfg.cirr.test_queries}
    counts, first = {}, 0
    for split, n in sizes.items():
        counts[f"{split}_images"] = _cirr_split(cfg, split, n, first, root)
        counts[f"{split}_queries"] = n
        first += n
        log(f"cirr {split}: {n} queries, {counts[f'{split}_images']} images")
    return counts


# --------------------------------------------------------------------------------------------------------------- CIRCO


def _circo_queries(
    cfg: ShapesConfig, rng: random.Random, guard: _Guard
) -> tuple[dict[str, list[ShapesQuery]], frozenset[Scene]]:
    """Samples the val and test queries, and the scenes no image may show.

    The seen queries are sampled first: a scene with a held-out combination that satisfies one of them is
    forbidden, so the held-out queries and the extra scenes never render it and it never becomes a ground truth
    of a seen query.
    """
    c = cfg.circo
    plan: dict[str, list[tuple[str, bool, bool]]] = {}
    for split, n in (("val", c.val_queries), ("test", c.test_queries)):
        test = split == "test"
        heldout_t = _flags(rng, n, c.heldout_template_fraction) if test else [False] * n
        heldout_c = _flags(rng, n, c.heldout_combo_fraction) if test else [False] * n
        plan[split] = list(zip(_balanced_kinds(rng, n, OPEN_KINDS), heldout_t, heldout_c, strict=True))
    heldout = cfg.scene.heldout
    pool = sorted(heldout)
    out: dict[str, list[ShapesQuery | None]] = {split: [None] * len(p) for split, p in plan.items()}
    forbidden: set[Scene] = set()
    for want_focus in (False, True):
        for split, p in plan.items():
            for i, (kind, ht, hc) in enumerate(p):
                if hc != want_focus:
                    continue
                frozen = frozenset(forbidden)
                q = guard.draw(
                    lambda kind=kind, ht=ht, hc=hc, frozen=frozen: sample_circo_query(
                        rng,
                        cfg.scene,
                        cfg.heldout_templates,
                        kind=kind,
                        focus_pool=pool if hc else [],
                        heldout_template=ht,
                        max_gts=c.max_gts,
                        n_distractors=c.distractors_per_query,
                        forbidden=frozen,
                        style=cfg.style,
                    )
                )
                out[split][i] = q
                if not hc:
                    # Scenes with held-out combinations that satisfy a seen query must never be rendered.
                    forbidden |= {t for t in q.all_targets if t.combos() & heldout}
    return {split: [q for q in qs if q is not None] for split, qs in out.items()}, frozenset(forbidden)


def write_circo(cfg: ShapesConfig, root: Path, log: Log) -> dict[str, int]:
    """Writes the CIRCO val and test annotations, the shared gallery and its image list under ``root``."""
    rng = component_rng(cfg.seed, "circo")
    guard = _Guard(cfg)
    queries, forbidden = _circo_queries(cfg, rng, guard)
    gallery = _Gallery()
    for split in CIRCO_SPLITS:
        for q in queries[split]:
            for scene in (q.reference, *q.targets, *q.distractors):
                gallery.add(scene)
    gallery.add_extras(rng, cfg, cfg.circo.extra_gallery, lambda _: True, forbidden, guard)

    scenes = gallery.shuffled(rng)
    ids = sorted(rng.sample(range(1, 1_000_000), len(scenes)))
    scene_id = dict(zip(scenes, ids, strict=True))
    coco_root = root / "COCO2017_unlabeled"
    size = cfg.render.image_size
    image_info, images, jobs = [], {}, []
    for scene, image_id in zip(scenes, ids, strict=True):
        seed = rng.getrandbits(31)
        file_name = f"{image_id:012d}.png"
        image_info.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        images[str(image_id)] = {"scene": scene.to_str(), "seed": seed}
        jobs.append((coco_root / "unlabeled2017" / file_name, scene, seed))
    write_pngs(jobs, cfg.render)
    dump_json(coco_root / "annotations" / "image_info_unlabeled2017.json", {"images": image_info})
    dump_json(root / "shapes_images.json", images, indent=1)

    counts = {"gallery_images": len(scenes)}
    for split in CIRCO_SPLITS:
        annotations, meta = [], {}
        for i, q in enumerate(queries[split]):
            target = scene_id[q.targets[0]]
            others = sorted(scene_id[s] for s in q.all_targets if s in gallery and s != q.targets[0])
            annotations.append(
                {
                    "reference_img_id": scene_id[q.reference],
                    "target_img_id": target,
                    "relative_caption": q.verbalised.text,
                    "shared_concept": shared_concept(q.reference, q.edit, anywhere=cfg.style.reshoot),
                    "gt_img_ids": [target, *others],
                    "id": i,
                    "semantic_aspects": [q.edit.kind],
                }
            )
            meta[str(i)] = _query_meta(q) | {"satisfying_scenes": len(q.all_targets)}
        dump_json(root / "annotations" / f"{split}.json", annotations, indent=4)
        dump_json(root / f"shapes_meta.{split}.json", meta, indent=1)
        counts[f"{split}_queries"] = len(annotations)
        log(f"circo {split}: {len(annotations)} queries")
    log(f"circo gallery: {len(scenes)} images")
    return counts
