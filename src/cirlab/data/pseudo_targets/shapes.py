"""Shapes-world pseudo-targets: the world's own renderer applied to the edited scene (the reference scene with the
query's edit applied), with *attribute noise*: with probability ``noise`` one attribute of the edited object is
changed, standing in for a diffusion model's mistakes. Reports must say so: these are rendered, not diffused,
pseudo-targets. They are cached beside the world (``shapes_pseudo_dir``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cirlab.config import config_digest, to_dict
from cirlab.data.pseudo_targets.runner import (
    PseudoRequest,
    PseudoTarget,
    PseudoTargetGenerator,
    PseudoTargetOptions,
    generate_pseudo_targets,
    records_for,
    split_requests,
)

if TYPE_CHECKING:
    from cirlab.data.shapes import RenderConfig, Scene, ShapesWorld

NOISE_ATTRIBUTES = ("colour", "shape", "size", "cell")


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
    digest = config_digest([world.world_id, generator.describe(), seed], 10)
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
