"""``ShapesWorld``, a built Shapes world on disk, and ``build_world``, which writes one: CIRR- and CIRCO-format
benchmarks (``splits.py``), the caption corpus, the synthetic triplets.

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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cirlab.config import from_dict, to_dict
from cirlab.data.shapes.corpus import ShapesCorpus, write_corpus
from cirlab.data.shapes.splits import Log, dump_json, write_circo, write_cirr
from cirlab.data.shapes.synthetic import corrupt_file_name, write_synthetic
from cirlab.data.shapes.world import Combo, ShapesConfig
from cirlab.io import create_temp_dir, read_json

CODE_VERSION = "shapes-world/3"
"""Bump whenever generation changes, so content-addressed worlds are rebuilt."""


def world_id(cfg: ShapesConfig) -> str:
    """Content hash of the config and ``CODE_VERSION`` (16 hex digits)."""
    payload = json.dumps({"code_version": CODE_VERSION, "config": to_dict(cfg)}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


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

    def corpus(self, mmap: bool = True) -> ShapesCorpus:
        """The image-caption corpus."""
        return ShapesCorpus.load(self.corpus_dir, mmap=mmap, style=self.config.corpus.caption_style)

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
        old = create_temp_dir(out.parent, f".{out.name}.old.")
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
    # Not tempfile.mkdtemp: its 0o700 would make the installed world unreadable to anyone else.
    tmp = create_temp_dir(out.parent, f".{out.name}.", ".tmp")
    try:
        counts = _write_all(cfg, tmp, say)
        info = {"world_id": wid, "code_version": CODE_VERSION, "config": to_dict(cfg), "counts": counts}
        dump_json(tmp / "world.json", info, indent=2)
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
