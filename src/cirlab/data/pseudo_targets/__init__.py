"""Pseudo-target images: what the target of a (reference image, modification text) pair should look like, made by
a generator instead of a photographer (TMCIR, arXiv 2504.10995, aligns CLIP's text encoder with such images).

Two generators sit behind one interface, ``PseudoTargetGenerator``:

* ``DiffusersGenerator``: a diffusers image-to-image or instruction-editing pipeline (InstructPix2Pix, SD/SD3
  img2img, ...) loaded from a hub id or a local directory; diffusers is the optional extra ``diffusion``.
* ``ShapesRendererGenerator``: in the Shapes world, the world's own renderer applied to the edited scene (the
  reference scene with the query's edit applied), with *attribute noise*: with probability ``noise`` one attribute
  of the edited object is changed, standing in for a diffusion model's mistakes. Reports must say so: these are
  rendered, not diffused, pseudo-targets.

``generate_pseudo_targets`` runs a generator over requests into a folder: ``images/<key>.png``, ``manifest.jsonl``
(one record per image with its provenance: generator, seed, source triplet, noise applied) and ``generator.json``
(the generator's settings and the run seed). Every image is written atomically before its record is appended, an
interrupted run resumes where it stopped, and images that already have a record are never generated again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from cirlab.config import to_dict
from cirlab.data.images import load_image
from cirlab.io import atomic_path, atomic_write_json, atomic_write_text, read_json

if TYPE_CHECKING:
    from PIL import Image

    from cirlab.data.benchmark import CIRSplit
    from cirlab.data.shapes import RenderConfig, Scene, ShapesWorld

MANIFEST_FILE = "manifest.jsonl"
GENERATOR_FILE = "generator.json"
IMAGES_DIR = "images"
NOISE_ATTRIBUTES = ("colour", "shape", "size", "cell")


@dataclass(frozen=True)
class PseudoRequest:
    """One source triplet to make a pseudo-target for.

    Attributes:
        key: unique id within a run (the benchmark's query id); names the output image.
        reference: the reference image's name.
        text: the modification text.
        reference_path: the reference image file (generators that read pixels need it).
        target: the real target's name, kept for provenance only (no generator sees it).
        meta: benchmark-specific facts; the Shapes world's ``shapes_meta`` entry (edit, reference scene).
    """

    key: str
    reference: str
    text: str
    reference_path: Path | None = None
    target: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def source(self) -> dict[str, Any]:
        """The source triplet as recorded in the manifest."""
        return {"key": self.key, "reference": self.reference, "text": self.text, "target": self.target}


@dataclass
class PseudoTarget:
    """A generated image and what the generator did to make it (recorded in the manifest).

    Attributes:
        image: the RGB image.
        info: JSON-serialisable facts, e.g. ``{"noise": {...}}`` or the prompt used.
    """

    image: Image.Image
    info: dict[str, Any] = field(default_factory=dict)


class PseudoTargetGenerator(ABC):
    """Makes pseudo-target images from requests; ``describe()`` names everything that determines the output."""

    name: ClassVar[str] = ""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-serialisable settings (recorded in ``generator.json``; a resumed run must have the same)."""

    @abstractmethod
    def generate(self, requests: Sequence[PseudoRequest], seeds: Sequence[int]) -> list[PseudoTarget]:
        """One pseudo-target per request; ``seeds[i]`` alone drives the randomness of request i."""


# --------------------------------------------------------------------------------------------------- Shapes world


@dataclass
class PseudoTargetOptions:
    """Where a ``pseudo_triplets`` stage gets its pseudo-targets (a method config section).

    Attributes:
        manifest: a folder written by ``generate_pseudo_targets`` (e.g. with ``DiffusersGenerator``) to read; empty:
            the data source generates its own (Shapes: ``ShapesRendererGenerator``, cached beside the world).
        noise: Shapes renderer: probability of changing one attribute of the edited object.
        noise_attributes: Shapes renderer: the attributes noise may change (``colour``, ``shape``, ``size``,
            ``cell``).
        seed: run seed (each image's seed derives from it and the request key).
    """

    manifest: str = ""
    noise: float = 0.2
    noise_attributes: tuple[str, ...] = ("colour", "shape", "size")
    seed: int = 0


class ShapesRendererGenerator(PseudoTargetGenerator):
    """The Shapes renderer applied to the edited scene, with attribute noise (a stand-in for a diffusion model).

    Requests must carry the ``shapes_meta`` entry of their query (``edit`` and ``reference_scene``). Noise never
    creates one of the world's held-out (colour, shape) combinations, so training data stays free of them.

    Args:
        render: the world's render settings (image size, jitter).
        shapes: the world's shape vocabulary.
        colours: the world's colour vocabulary.
        heldout: (colour, shape) pairs that must not appear.
        noise: probability of changing one attribute of the edited object.
        attributes: the attributes noise may change.
    """

    name = "shapes-renderer"

    def __init__(
        self,
        render: RenderConfig,
        shapes: Sequence[str],
        colours: Sequence[str],
        heldout: frozenset[tuple[str, str]] = frozenset(),
        noise: float = 0.2,
        attributes: Sequence[str] = ("colour", "shape", "size"),
    ) -> None:
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be a probability, got {noise}")
        unknown = sorted(set(attributes) - set(NOISE_ATTRIBUTES))
        if unknown:
            raise ValueError(f"unknown noise attributes {unknown}; known: {', '.join(NOISE_ATTRIBUTES)}")
        self.render = render
        self.shapes = tuple(shapes)
        self.colours = tuple(colours)
        self.heldout = frozenset(heldout)
        self.noise = noise
        self.attributes = tuple(attributes)

    @classmethod
    def for_world(
        cls, world: ShapesWorld, noise: float = 0.2, attributes: Sequence[str] = ("colour", "shape", "size")
    ) -> ShapesRendererGenerator:
        """The generator with a built world's renderer, vocabulary and held-out combinations."""
        scene = world.config.scene
        return cls(world.config.render, scene.shapes, scene.colours, scene.heldout, noise, attributes)

    def describe(self) -> dict[str, Any]:
        return {
            "generator": self.name,
            "noise": self.noise,
            "attributes": list(self.attributes),
            "render": to_dict(self.render),
            "shapes": list(self.shapes),
            "colours": list(self.colours),
            "heldout": sorted(f"{c} {s}" for c, s in self.heldout),
        }

    def edited_scene(self, request: PseudoRequest) -> tuple[Scene, int | None]:
        """The reference scene with the request's edit applied, and the cell of the edited object (None when the
        edit removed it: then noise falls on another object, if any)."""
        from cirlab.data.shapes import Edit, Scene

        try:
            edit = Edit.from_dict(request.meta["edit"])
            reference = Scene.parse(request.meta["reference_scene"])
        except KeyError as err:
            raise ValueError(f"request {request.key}: the Shapes renderer needs shapes_meta field {err}") from None
        scene = edit.apply(reference)
        cell = {"move": edit.to_cell, "remove": None}.get(edit.kind, edit.cell)
        return scene, cell

    def _changes(self, scene: Scene, cell: int) -> list[tuple[str, Any]]:
        """Every (attribute, new value) noise may give the object in ``cell``."""
        from cirlab.data.shapes import SIZES

        obj = scene.at(cell)
        changes: list[tuple[str, Any]] = []
        for attribute in self.attributes:
            if attribute == "colour":
                values = [c for c in self.colours if c != obj.colour and (c, obj.shape) not in self.heldout]
            elif attribute == "shape":
                values = [s for s in self.shapes if s != obj.shape and (obj.colour, s) not in self.heldout]
            elif attribute == "size":
                values = [s for s in SIZES if s != obj.size]
            else:
                values = scene.free_cells()
            changes += [(attribute, v) for v in values]
        return changes

    def perturb(self, scene: Scene, cell: int | None, rng: random.Random) -> tuple[Scene, dict[str, Any] | None]:
        """``scene`` with one attribute of the object in ``cell`` changed (a random other object when ``cell`` is
        None); returns the scene and what changed (None when nothing could change)."""
        if cell is None:
            if not scene.objects:
                return scene, None
            cell = rng.choice(scene.objects).cell
        # Attribute first, then value, so every attribute is equally likely whatever its number of values.
        by_attribute: dict[str, list[Any]] = {}
        for attribute, value in self._changes(scene, cell):
            by_attribute.setdefault(attribute, []).append(value)
        if not by_attribute:
            return scene, None
        attribute = rng.choice(sorted(by_attribute))
        value = rng.choice(by_attribute[attribute])
        obj = scene.at(cell)
        new = obj.replace(**{attribute: value})
        change = {"cell": cell, "attribute": attribute, "from": getattr(obj, attribute), "to": value}
        return scene.replaced(cell, new), change

    def generate(self, requests: Sequence[PseudoRequest], seeds: Sequence[int]) -> list[PseudoTarget]:
        from cirlab.data.shapes import render_image

        out = []
        for request, seed in zip(requests, seeds, strict=True):
            rng = random.Random(seed)
            scene, cell = self.edited_scene(request)
            noise = None
            if rng.random() < self.noise:
                scene, noise = self.perturb(scene, cell, rng)
            image = render_image(scene, rng.getrandbits(31), self.render)
            out.append(PseudoTarget(image, {"scene": scene.to_str(), "noise": noise}))
        return out


def shapes_requests(world: ShapesWorld, split: str = "train") -> list[PseudoRequest]:
    """Requests for every query of a Shapes CIRR-format split, with their ``shapes_meta`` entries."""
    from cirlab.data.cirr import load_cirr

    cirr = load_cirr(world.cirr_root, world.cirr_image_root, split)
    return split_requests(cirr, world.cirr_meta(split))


def shapes_pseudo_dir(world: ShapesWorld, generator: PseudoTargetGenerator, seed: int) -> Path:
    """The folder beside the world (worlds are immutable) where a generator's pseudo-targets of it are cached."""
    digest = _digest([world.world_id, generator.describe(), seed])
    return world.root.parent / f"{world.root.name}-pseudo" / f"{generator.name}-{digest}"


def shapes_pseudo_targets(
    world: ShapesWorld, options: PseudoTargetOptions, split: str = "train", log: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Manifest records of the pseudo-targets of a Shapes split: read from ``options.manifest`` when set, else
    rendered with noise into the world-adjacent cache (generated once, then reused)."""
    requests = shapes_requests(world, split)
    if options.manifest:
        return records_for(requests, Path(options.manifest))
    generator = ShapesRendererGenerator.for_world(world, options.noise, options.noise_attributes)
    out_dir = shapes_pseudo_dir(world, generator, options.seed)
    return generate_pseudo_targets(generator, requests, out_dir, seed=options.seed, batch_size=256, log=log)


# ------------------------------------------------------------------------------------------------------- diffusers


@dataclass
class DiffusersConfig:
    """Settings of a diffusers pseudo-target pipeline.

    Attributes:
        pipeline: a diffusers pipeline class name (``StableDiffusionInstructPix2PixPipeline``,
            ``AutoPipelineForImage2Image``, ...); empty: the class ``model_index.json`` names, switched to its
            image-to-image variant when it takes no image.
        prompt: prompt template; ``{text}`` is the modification text.
        steps: denoising steps.
        guidance_scale: text guidance.
        image_guidance_scale: image guidance (instruction-editing pipelines only).
        strength: how far from the reference image generation starts (image-to-image pipelines only).
        image_size: the reference is resized to this square side first.
        dtype: ``float32``, ``float16`` or ``bfloat16``.
    """

    pipeline: str = ""
    prompt: str = "{text}"
    steps: int = 30
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    strength: float = 0.75
    image_size: int = 512
    dtype: str = "float32"


class DiffusersGenerator(PseudoTargetGenerator):
    """A diffusers image-to-image or instruction-editing pipeline (loaded on first use).

    Args:
        model: a hub id (``timbrooks/instruct-pix2pix``, ``stabilityai/stable-diffusion-3-medium-diffusers``) or a
            local directory written by ``pipeline.save_pretrained``.
        config: pipeline settings.
        device: where the pipeline runs.
    """

    name = "diffusers"

    def __init__(self, model: str, config: DiffusersConfig | None = None, device: str = "cpu") -> None:
        self.model = str(model)
        self.config = config or DiffusersConfig()
        self.device = device
        self._pipe: Any = None

    def describe(self) -> dict[str, Any]:
        return {"generator": self.name, "model": self.model, **to_dict(self.config)}

    def pipeline(self) -> Any:
        """The loaded pipeline (diffusers is imported here, not at module import)."""
        if self._pipe is None:
            import torch

            from cirlab._optional import require

            diffusers = require("diffusers", extra="diffusion", purpose="diffusion pseudo-targets")
            name = self.config.pipeline or "DiffusionPipeline"
            cls = getattr(diffusers, name, None)
            if cls is None or not hasattr(cls, "from_pretrained"):
                raise ValueError(f"diffusers has no pipeline class {name!r}")
            dtype = getattr(torch, self.config.dtype)
            pipe = cls.from_pretrained(self.model, torch_dtype=dtype)
            if "image" not in inspect.signature(pipe.__call__).parameters:
                # A text-to-image checkpoint (e.g. SD3): reuse its components in the matching image-to-image pipeline.
                pipe = diffusers.AutoPipelineForImage2Image.from_pipe(pipe)
            pipe = pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
            self._pipe = pipe
        return self._pipe

    def call_kwargs(self) -> dict[str, Any]:
        """Arguments of the pipeline's ``__call__`` besides prompts, images and generators (only those it takes)."""
        cfg = self.config
        wanted = {
            "num_inference_steps": cfg.steps,
            "guidance_scale": cfg.guidance_scale,
            "image_guidance_scale": cfg.image_guidance_scale,
            "strength": cfg.strength,
            "output_type": "pil",
        }
        params = inspect.signature(self.pipeline().__call__).parameters
        named = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
        return {k: v for k, v in wanted.items() if k in named}

    def generate(self, requests: Sequence[PseudoRequest], seeds: Sequence[int]) -> list[PseudoTarget]:
        import torch

        if any(r.reference_path is None for r in requests):
            raise ValueError("diffusers pseudo-targets need each request's reference_path")
        pipe = self.pipeline()
        size = self.config.image_size
        images = [load_image(r.reference_path).resize((size, size)) for r in requests]
        prompts = [self.config.prompt.replace("{text}", r.text.strip()) for r in requests]
        # One generator per image: an image does not depend on the batch it was generated in.
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        out = pipe(prompt=prompts, image=images, generator=generators, **self.call_kwargs())
        return [PseudoTarget(im.convert("RGB"), {"prompt": p}) for im, p in zip(out.images, prompts, strict=True)]


# ----------------------------------------------------------------------------------------------------- generation


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def item_seed(seed: int, key: str) -> int:
    """The seed of one request: a function of the run seed and the key only, so batching and resuming cannot
    change an image."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=4).digest(), "big") & 0x7FFFFFFF


def image_file(key: str) -> str:
    """``images/<key>.png``; keys with characters unsafe in file names get a hash suffix to stay unique."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
    if safe != key:
        safe = f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    return f"{IMAGES_DIR}/{safe}.png"


def split_requests(split: CIRSplit, meta: dict[str, dict[str, Any]] | None = None) -> list[PseudoRequest]:
    """One request per query of a benchmark split (with its ``meta`` entry, keyed by query id, when given)."""
    meta = meta or {}
    return [
        PseudoRequest(
            key=q.qid,
            reference=q.reference,
            text=q.text,
            reference_path=split.image_path(q.reference) if split.image_root is not None else None,
            target=q.targets[0] if q.targets else None,
            meta=meta.get(q.qid, {}),
        )
        for q in split.queries
    ]


def read_manifest(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a pseudo-target folder whose image exists, in generation order, the latest per key.

    A final line cut short by a crash is ignored (its image is generated again on resume).
    """
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        return []
    records: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("key"), str):
            continue  # not a record this module wrote (a hand-edited line): ignored like a torn one
        if isinstance(record.get("image"), str) and (Path(out_dir) / record["image"]).is_file():
            records[record["key"]] = record
    return list(records.values())


def records_for(requests: Sequence[PseudoRequest], out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The manifest records of ``requests`` (in their order) from a generated folder; raises naming missing keys."""
    by_key = {r["key"]: r for r in read_manifest(out_dir)}
    missing = [r.key for r in requests if r.key not in by_key]
    if missing:
        raise FileNotFoundError(f"{out_dir}: no pseudo-target for {len(missing)} requests, e.g. {missing[:3]}")
    return [_with_path(by_key[r.key], Path(out_dir)) for r in requests]


def _with_path(record: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    return record | {"path": str(out_dir / record["image"])}


def _check_generator(out_dir: Path, info: dict[str, Any]) -> None:
    """Writes ``generator.json``, or checks that an existing folder was made by the same generator and seed."""
    path = out_dir / GENERATOR_FILE
    if path.is_file():
        existing = read_json(path)
        if existing != info:
            raise ValueError(
                f"{out_dir} holds pseudo-targets of another generator or seed ({path}); use another folder"
            )
        return
    atomic_write_json(path, info)


def _append(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Appends whole lines in one write and syncs, so a crash can cut at most the last line."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def generate_pseudo_targets(
    generator: PseudoTargetGenerator,
    requests: Sequence[PseudoRequest],
    out_dir: str | os.PathLike,
    seed: int = 0,
    batch_size: int = 16,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Generates the pseudo-targets of ``requests`` that ``out_dir`` lacks; returns every request's record.

    Args:
        generator: the generator.
        requests: source triplets; keys must be unique.
        out_dir: the output folder (created; resumed when it already holds a run of the same generator and seed).
        seed: run seed; request ``key`` gets ``item_seed(seed, key)``.
        batch_size: requests per ``generator.generate`` call (images are written and recorded after each).
        log: progress messages.

    Returns:
        Manifest records in the order of ``requests``: ``key``, ``image`` (relative to ``out_dir``), ``path``,
        ``generator``, ``seed``, ``source`` (the triplet) and the generator's facts (e.g. ``noise``).

    Raises:
        ValueError: duplicate keys, or ``out_dir`` holds a run of another generator or seed.
    """
    out_dir = Path(out_dir)
    keys = [r.key for r in requests]
    if len(set(keys)) != len(keys):
        raise ValueError("pseudo-target request keys must be unique")
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_generator(out_dir, {"generator": generator.describe(), "seed": seed})
    done = {r["key"]: r for r in read_manifest(out_dir)}
    manifest = out_dir / MANIFEST_FILE
    compact = "".join(json.dumps(r, sort_keys=True) + "\n" for r in done.values())
    if not manifest.is_file() or manifest.read_text(encoding="utf-8") != compact:
        # Drop torn lines and records of deleted images before appending to the manifest.
        atomic_write_text(manifest, compact)
    todo = [r for r in requests if r.key not in done]
    if log is not None:
        log(f"pseudo-targets in {out_dir}: {len(requests) - len(todo)} present, {len(todo)} to generate")
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        seeds = [item_seed(seed, r.key) for r in chunk]
        made = generator.generate(chunk, seeds)
        records = []
        for request, item, s in zip(chunk, made, seeds, strict=True):
            rel = image_file(request.key)
            with atomic_path(out_dir / rel) as tmp:
                item.image.save(tmp, format="PNG")
            provenance = {"generator": generator.name, "seed": s, "source": request.source(), "noise": None}
            records.append({"key": request.key, "image": rel, **provenance} | item.info)
        _append(manifest, records)
        done.update((r["key"], r) for r in records)
        if log is not None:
            log(f"pseudo-targets: {start + len(chunk)}/{len(todo)}")
    return [_with_path(done[k], out_dir) for k in keys]
