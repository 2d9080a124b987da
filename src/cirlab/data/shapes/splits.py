"""Builds a Shapes world on disk: CIRR- and CIRCO-format benchmarks, the caption corpus, the synthetic triplets.

``build_world(cfg, out_dir)`` writes everything into a temporary folder beside ``out_dir`` and renames it into
place, so a world directory is either complete or absent. Worlds are content-addressed: ``world_id(cfg)`` hashes
the config and ``CODE_VERSION``, and ``build_world`` returns an existing world with the same id instead of
rebuilding it. Layout (``<split>`` of CIRR is ``train``, ``val`` or ``test1``)::

    world.json                                   world_id, code_version, config, counts
    cirr/captions/cap.rc2.<split>.json           CIRR core annotation (FORMATS.md 1.2), ground truth in test1 too
    cirr/image_splits/split.rc2.<split>.json     name -> "./train/<k>/<name>.png" | "./dev/<name>.png" | ...
    cirr/img_raw/train/<k>/train-00000.png       image root = cirr/img_raw (the official CIRR README layout)
    cirr/img_raw/dev/dev-00000.png               val images, named "dev-*" in folder "dev" like the real CIRR
    cirr/img_raw/test1/test1-00000.png
    cirr/shapes_meta.<split>.json                pairid -> edit, template, held-out flags, scenes
    cirr/shapes_images.<split>.json              image name -> {"scene", "seed"} (re-renderable, auditable)
    circo/annotations/{val,test}.json            CIRCO annotation (FORMATS.md 2.1), ground truth in test too
    circo/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json    the gallery: {"images": [{id, file_name}]}
    circo/COCO2017_unlabeled/unlabeled2017/000000012345.png
    circo/shapes_meta.{val,test}.json            query id -> edit, template, held-out flags, scenes
    circo/shapes_images.json                     image id -> {"scene", "seed"}
    corpus/images.npy, corpus/captions.jsonl     see corpus.py
    synthetic/triplets*.jsonl, synthetic/images/ see synthetic.py

Every query of a CIRR split has a 6-image ``img_set``: reference, target and 4 hard distractors one step away
from the target. A split's gallery (its ``image_splits`` file) holds every image its queries use plus
``extra_gallery`` random scenes; every gallery image shows a different scene, so the target is the only image
that satisfies the edit. Image names and CIRCO ids are assigned after shuffling, so they say nothing about roles.

Held-out templates and combinations appear only in test queries (``test1``, CIRCO ``test``), flagged in the
``shapes_meta`` files; train and val images, texts and scenes contain neither.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cirlab.config import from_dict, to_dict
from cirlab.data.shapes.corpus import CaptionCorpus, write_corpus
from cirlab.data.shapes.edits import EXACT_KINDS, OPEN_KINDS
from cirlab.data.shapes.queries import Query, sample_circo_query, sample_cirr_query, shared_concept
from cirlab.data.shapes.render import write_pngs
from cirlab.data.shapes.synthetic import corrupt_file_name, write_synthetic
from cirlab.data.shapes.world import Combo, Scene, ShapesConfig, combo_filter, component_rng, sample_scene
from cirlab.io import read_json

CODE_VERSION = "shapes-world/2"
"""Bump whenever generation changes, so content-addressed worlds are rebuilt."""

CIRR_SPLITS: dict[str, str] = {"train": "train", "val": "dev", "test1": "test1"}
"""CIRR split name -> image folder and name prefix (val images are ``dev-*`` in the real CIRR as well)."""

CIRCO_SPLITS: tuple[str, ...] = ("val", "test")

Log = Callable[[str], None]


def world_id(cfg: ShapesConfig) -> str:
    """Content hash of the config and ``CODE_VERSION`` (16 hex digits)."""
    payload = json.dumps({"code_version": CODE_VERSION, "config": to_dict(cfg)}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _dump(path: Path, obj: Any, indent: int | None = None) -> None:
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
        self, rng: random.Random, cfg: ShapesConfig, n: int, combo_ok: Callable[[Combo], bool], avoid: frozenset[Scene]
    ) -> None:
        """Adds ``n`` random scenes that are not yet present and not in ``avoid``."""
        target = len(self) + n
        while len(self) < target:
            scene = sample_scene(rng, cfg.scene, combo_ok)
            if scene not in self and scene not in avoid:
                self.add(scene)

    def shuffled(self, rng: random.Random) -> list[Scene]:
        scenes = list(self.index)
        rng.shuffle(scenes)
        return scenes


def _query_meta(q: Query) -> dict[str, Any]:
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


def _cirr_queries(cfg: ShapesConfig, split: str, n: int, rng: random.Random) -> list[Query]:
    test = split == "test1"
    heldout_t = _flags(rng, n, cfg.cirr.heldout_template_fraction) if test else [False] * n
    heldout_c = _flags(rng, n, cfg.cirr.heldout_combo_fraction) if test else [False] * n
    pool = sorted(cfg.scene.heldout)
    return [
        sample_cirr_query(
            rng,
            cfg.scene,
            cfg.heldout_templates,
            kind=kind,
            focus_pool=pool if hc else [],
            heldout_template=ht,
            n_distractors=4,
        )
        for kind, ht, hc in zip(_balanced_kinds(rng, n, EXACT_KINDS), heldout_t, heldout_c, strict=True)
    ]


def _cirr_split(cfg: ShapesConfig, split: str, n: int, first_pairid: int, root: Path) -> int:
    """Samples, renders and writes one CIRR split; returns the number of gallery images."""
    rng = component_rng(cfg.seed, "cirr", split)
    queries = _cirr_queries(cfg, split, n, rng)
    gallery = _Gallery()
    for q in queries:
        for scene in (q.reference, q.targets[0], *q.distractors):
            gallery.add(scene)
    # Extra scenes in test may hold held-out combinations too, so those are not a tell of the held-out queries.
    extra_ok = (lambda _: True) if split == "test1" else combo_filter(cfg.scene.heldout)
    gallery.add_extras(rng, cfg, cfg.cirr.extra_gallery, extra_ok, frozenset())

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
    _dump(root / "captions" / f"cap.rc2.{split}.json", captions)
    _dump(root / "image_splits" / f"split.rc2.{split}.json", dict(sorted(paths.items())))
    _dump(root / f"shapes_meta.{split}.json", meta, indent=1)
    _dump(root / f"shapes_images.{split}.json", dict(sorted(images.items())), indent=1)
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


def _circo_queries(cfg: ShapesConfig, rng: random.Random) -> tuple[dict[str, list[Query]], frozenset[Scene]]:
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
    out: dict[str, list[Query | None]] = {split: [None] * len(p) for split, p in plan.items()}
    forbidden: set[Scene] = set()
    for want_focus in (False, True):
        for split, p in plan.items():
            for i, (kind, ht, hc) in enumerate(p):
                if hc != want_focus:
                    continue
                q = sample_circo_query(
                    rng,
                    cfg.scene,
                    cfg.heldout_templates,
                    kind=kind,
                    focus_pool=pool if hc else [],
                    heldout_template=ht,
                    max_gts=c.max_gts,
                    n_distractors=c.distractors_per_query,
                    forbidden=frozenset(forbidden),
                )
                out[split][i] = q
                if not hc:
                    # Scenes with held-out combinations that satisfy a seen query must never be rendered.
                    forbidden |= {t for t in q.all_targets if t.combos() & heldout}
    return {split: [q for q in qs if q is not None] for split, qs in out.items()}, frozenset(forbidden)


def write_circo(cfg: ShapesConfig, root: Path, log: Log) -> dict[str, int]:
    """Writes the CIRCO val and test annotations, the shared gallery and its image list under ``root``."""
    rng = component_rng(cfg.seed, "circo")
    queries, forbidden = _circo_queries(cfg, rng)
    gallery = _Gallery()
    for split in CIRCO_SPLITS:
        for q in queries[split]:
            for scene in (q.reference, *q.targets, *q.distractors):
                gallery.add(scene)
    gallery.add_extras(rng, cfg, cfg.circo.extra_gallery, lambda _: True, forbidden)

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
    _dump(coco_root / "annotations" / "image_info_unlabeled2017.json", {"images": image_info})
    _dump(root / "shapes_images.json", images, indent=1)

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
                    "shared_concept": shared_concept(q.reference, q.edit),
                    "gt_img_ids": [target, *others],
                    "id": i,
                    "semantic_aspects": [q.edit.kind],
                }
            )
            meta[str(i)] = _query_meta(q) | {"satisfying_scenes": len(q.all_targets)}
        _dump(root / "annotations" / f"{split}.json", annotations, indent=4)
        _dump(root / f"shapes_meta.{split}.json", meta, indent=1)
        counts[f"{split}_queries"] = len(annotations)
        log(f"circo {split}: {len(annotations)} queries")
    log(f"circo gallery: {len(scenes)} images")
    return counts


# ----------------------------------------------------------------------------------------------------- world handle


@dataclass(frozen=True)
class ShapesWorld:
    """A built world on disk: its root, config and id, with the paths the loaders and trainers need.

    Attributes:
        root: the world directory.
        config: the config it was built from.
        world_id: ``world_id(config)`` at build time.
        counts: numbers of queries and images per part, as written.
    """

    root: Path
    config: ShapesConfig
    world_id: str
    counts: dict[str, Any]

    @property
    def cirr_root(self) -> Path:
        """The CIRR annotation root (``captions/``, ``image_splits/``)."""
        return self.root / "cirr"

    @property
    def cirr_image_root(self) -> Path:
        """The folder the ``image_splits`` paths are relative to."""
        return self.root / "cirr" / "img_raw"

    @property
    def circo_root(self) -> Path:
        """The CIRCO root (``annotations/``, ``COCO2017_unlabeled/``)."""
        return self.root / "circo"

    @property
    def corpus_dir(self) -> Path:
        """The caption corpus folder (``images.npy``, ``captions.jsonl``)."""
        return self.root / "corpus"

    @property
    def synthetic_dir(self) -> Path:
        """The synthetic triplets folder."""
        return self.root / "synthetic"

    @property
    def heldout_templates(self) -> tuple[str, ...]:
        """Benchmark template ids used only in test queries."""
        return self.config.heldout_templates

    @property
    def heldout_combos(self) -> frozenset[Combo]:
        """(colour, shape) pairs that appear only in test queries."""
        return self.config.scene.heldout

    def cirr_meta(self, split: str) -> dict[str, dict[str, Any]]:
        """Per-query Shapes metadata of a CIRR split, keyed by pairid (a string)."""
        return read_json(self.cirr_root / f"shapes_meta.{split}.json")

    def circo_meta(self, split: str) -> dict[str, dict[str, Any]]:
        """Per-query Shapes metadata of a CIRCO split, keyed by query id (a string)."""
        return read_json(self.circo_root / f"shapes_meta.{split}.json")

    def corpus(self, mmap: bool = True) -> CaptionCorpus:
        """The image-caption corpus."""
        return CaptionCorpus.load(self.corpus_dir, mmap=mmap, style=self.config.corpus.caption_style)

    def synthetic_triplets(self, corrupt_fraction: float | None = None) -> Path:
        """The synthetic triplet file at ``corrupt_fraction`` (default: the config's ``corrupt_fraction``)."""
        default = self.config.synthetic.corrupt_fraction
        if corrupt_fraction is None or corrupt_fraction == default:
            return self.synthetic_dir / "triplets.jsonl"
        path = self.synthetic_dir / corrupt_file_name(corrupt_fraction)
        if not path.is_file():
            built = [default, *self.config.synthetic.extra_corrupt_fractions]
            raise FileNotFoundError(f"no synthetic file for corruption {corrupt_fraction}; built: {built}")
        return path


def load_world(out_dir: str | os.PathLike) -> ShapesWorld:
    """Reads a built world's ``world.json`` (config, id, counts)."""
    root = Path(out_dir)
    info = read_json(root / "world.json")
    return ShapesWorld(
        root=root,
        config=from_dict(ShapesConfig, info["config"]),
        world_id=info["world_id"],
        counts=info["counts"],
    )


def _write_all(cfg: ShapesConfig, root: Path, log: Log) -> dict[str, Any]:
    counts: dict[str, Any] = {"cirr": write_cirr(cfg, root / "cirr", log)}
    counts["circo"] = write_circo(cfg, root / "circo", log)
    counts["corpus"] = {"images": write_corpus(cfg, root / "corpus")}
    log(f"corpus: {counts['corpus']['images']} images")
    counts["synthetic"] = {"triplets": cfg.synthetic.triplets, "corrupted": write_synthetic(cfg, root / "synthetic")}
    log(f"synthetic: {cfg.synthetic.triplets} triplets")
    return counts


def _install(tmp: Path, out: Path) -> None:
    """Renames the finished ``tmp`` onto ``out``, moving an old ``out`` aside first and deleting it after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "world")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def build_world(
    cfg: ShapesConfig, out_dir: str | os.PathLike, overwrite: bool = False, log: Log | None = None
) -> ShapesWorld:
    """Builds the world of ``cfg`` in ``out_dir`` (or returns the one already there with the same id).

    Args:
        cfg: the world's config.
        out_dir: the world directory; created atomically.
        overwrite: replace a different world found in ``out_dir`` instead of raising.
        log: receives one progress line per part (default: silent).

    Raises:
        FileExistsError: ``out_dir`` holds something else (another world, other files) and ``overwrite`` is off.
    """
    out = Path(out_dir)
    say = log or (lambda _: None)
    wid = world_id(cfg)
    if (out / "world.json").is_file():
        existing = load_world(out)
        if existing.world_id == wid:
            say(f"reusing world {wid} in {out}")
            return existing
        if not overwrite:
            raise FileExistsError(
                f"{out} holds world {existing.world_id}, not {wid}; overwrite it or use another folder"
            )
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not a Shapes world; overwrite it or use another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        counts = _write_all(cfg, tmp, say)
        info = {"world_id": wid, "code_version": CODE_VERSION, "config": to_dict(cfg), "counts": counts}
        _dump(tmp / "world.json", info, indent=2)
        _install(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        # Another process may have installed the same world meanwhile: then its copy is as good as ours.
        if (out / "world.json").is_file() and load_world(out).world_id == wid:
            return load_world(out)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"built world {wid} in {out}")
    return load_world(out)


def default_world_dir(cfg: ShapesConfig, cache_root: str | os.PathLike) -> Path:
    """``<cache_root>/shapes-<world_id>``: a per-config folder, so builds are reused across runs."""
    return Path(cache_root) / f"shapes-{world_id(cfg)}"
