"""The Shapes world's scene model: objects on a 3x3 grid, the vocabulary, the config and scene sampling.

A scene is a set of 1 to 4 objects, at most one per grid cell; an object has a shape, a colour, a size and a cell.
Scenes are abstract (no pixels): the same scene renders to different images under different render seeds
(see ``render.py``). Everything random takes an explicit ``random.Random``; nothing here holds state.

Some (colour, shape) combinations are *held out*: they appear in no training image, caption or triplet and only
in the held-out part of the test queries, so results can be reported on seen and on unseen combinations.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
SIZES: tuple[str, ...] = ("small", "large")
GRID = 3
N_CELLS = GRID * GRID
# Cell index = row * 3 + column, row 0 at the top.
CELL_NAMES: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)

Combo = tuple[str, str]
"""A (colour, shape) pair, e.g. ``("purple", "star")``."""


@dataclass(frozen=True, order=True)
class ShapeObject:
    """One object of a scene.

    Attributes:
        cell: grid cell 0..8 (row-major, top left first); compared first so sorting orders objects by cell.
        shape: one of ``SHAPES``.
        colour: one of ``COLOURS``.
        size: ``"small"`` or ``"large"``.
    """

    cell: int
    shape: str
    colour: str
    size: str

    @property
    def combo(self) -> Combo:
        """The object's (colour, shape) pair."""
        return (self.colour, self.shape)

    def replace(self, **changes: object) -> ShapeObject:
        """A copy with some attributes changed (``cell``, ``shape``, ``colour`` or ``size``)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def to_str(self) -> str:
        """Compact text form ``"<cell>:<size>:<colour>:<shape>"`` used in the metadata files."""
        return f"{self.cell}:{self.size}:{self.colour}:{self.shape}"

    @classmethod
    def parse(cls, text: str) -> ShapeObject:
        """Inverse of ``to_str``."""
        cell, size, colour, shape = text.split(":")
        return cls(cell=int(cell), shape=shape, colour=colour, size=size)


@dataclass(frozen=True)
class Scene:
    """An immutable, hashable scene: objects sorted by cell, at most one per cell.

    Two scenes are equal exactly when they hold the same objects, so a scene can key dictionaries (the gallery
    builders use this to give every distinct scene one image and to look ground truths up).
    """

    objects: tuple[ShapeObject, ...]

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.objects))
        object.__setattr__(self, "objects", ordered)
        cells = [o.cell for o in ordered]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell: {self.to_str()}")
        if any(not 0 <= c < N_CELLS for c in cells):
            raise ValueError(f"cell out of the 3x3 grid: {self.to_str()}")

    def __len__(self) -> int:
        return len(self.objects)

    @property
    def cells(self) -> frozenset[int]:
        """Occupied cells."""
        return frozenset(o.cell for o in self.objects)

    def free_cells(self) -> list[int]:
        """Empty cells in increasing order."""
        return [c for c in range(N_CELLS) if c not in self.cells]

    def at(self, cell: int) -> ShapeObject:
        """The object in ``cell``; ``KeyError`` when the cell is empty."""
        for obj in self.objects:
            if obj.cell == cell:
                return obj
        raise KeyError(f"no object in cell {cell} of {self.to_str()}")

    def without(self, cell: int) -> Scene:
        """The scene with the object in ``cell`` removed."""
        self.at(cell)
        return Scene(tuple(o for o in self.objects if o.cell != cell))

    def with_object(self, obj: ShapeObject) -> Scene:
        """The scene with ``obj`` added; ``ValueError`` when its cell is taken."""
        return Scene((*self.objects, obj))

    def replaced(self, cell: int, obj: ShapeObject) -> Scene:
        """The scene with the object in ``cell`` replaced by ``obj`` (which may sit in another, free cell)."""
        return self.without(cell).with_object(obj)

    def combos(self) -> set[Combo]:
        """The (colour, shape) pairs present."""
        return {o.combo for o in self.objects}

    def to_str(self) -> str:
        """Compact text form, objects joined by ``|``; round-trips through ``Scene.parse``."""
        return "|".join(o.to_str() for o in self.objects)

    @classmethod
    def parse(cls, text: str) -> Scene:
        """Inverse of ``to_str``."""
        return cls(tuple(ShapeObject.parse(t) for t in text.split("|") if t))


def parse_combo(text: str) -> Combo:
    """``"purple star"`` -> ``("purple", "star")``."""
    colour, shape = text.split()
    return (colour, shape)


@dataclass(frozen=True)
class RenderConfig:
    """How scenes become pixels (all lengths are fractions of the image side, so any image size works).

    Attributes:
        image_size: output side in pixels.
        supersample: render at ``image_size * supersample`` and box-downsample, for anti-aliased edges.
        small_extent: half-extent of a small object (6 px at 64 px).
        large_extent: half-extent of a large object (9.5 px at 64 px).
        position_jitter: maximum shift of an object's centre from its cell centre, each axis.
        size_jitter: maximum relative change of an object's extent.
        colour_jitter: maximum change per RGB channel.
        background: inclusive range of the background grey level.
    """

    image_size: int = 64
    supersample: int = 4
    small_extent: float = 0.094
    large_extent: float = 0.148
    position_jitter: float = 0.03
    size_jitter: float = 0.08
    colour_jitter: int = 15
    background: tuple[int, int] = (70, 100)

    def __post_init__(self) -> None:
        if self.image_size < 8 or self.supersample < 1:
            raise ValueError("image_size must be >= 8 and supersample >= 1")
        lo, hi = self.background
        if not 0 <= lo <= hi <= 255:
            raise ValueError(f"background range {self.background} must satisfy 0 <= lo <= hi <= 255")


@dataclass(frozen=True)
class SceneConfig:
    """The vocabulary and the scene distribution.

    Attributes:
        shapes: shapes in use (a subset of ``SHAPES``).
        colours: colours in use (a subset of ``COLOURS``).
        min_objects: fewest objects in a sampled scene (at least 1).
        max_objects: most objects in a sampled scene (at most 9).
        heldout_combos: ``"colour shape"`` pairs that appear in no training data of any kind.
    """

    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOURS
    min_objects: int = 1
    max_objects: int = 4
    heldout_combos: tuple[str, ...] = (
        "purple star",
        "cyan triangle",
        "orange circle",
        "green diamond",
        "white cross",
        "yellow square",
    )

    def __post_init__(self) -> None:
        unknown = [s for s in self.shapes if s not in SHAPES] + [c for c in self.colours if c not in COLOURS]
        if unknown:
            raise ValueError(f"unknown shape or colour {unknown}; known: {SHAPES}, {COLOURS}")
        if len(self.shapes) < 2 or len(self.colours) < 3:
            raise ValueError("need at least 2 shapes and 3 colours (edits must have somewhere to go)")
        if not 1 <= self.min_objects < self.max_objects <= N_CELLS - 1:
            # Adding needs a reference below the maximum and a free cell; removing needs one above the minimum.
            raise ValueError("need 1 <= min_objects < max_objects <= 8 so that add and remove edits exist")
        for text in self.heldout_combos:
            colour, shape = parse_combo(text)
            if colour not in self.colours or shape not in self.shapes:
                raise ValueError(f"held-out combo {text!r} uses a colour or shape not in the vocabulary")
        if len(self.heldout) >= len(self.shapes) * len(self.colours):
            raise ValueError("every combination is held out; nothing is left to train on")

    @functools.cached_property
    def heldout(self) -> frozenset[Combo]:
        """The held-out (colour, shape) pairs (cached: it is consulted for every sampled object)."""
        return frozenset(parse_combo(t) for t in self.heldout_combos)

    def seen_combos(self) -> list[Combo]:
        """All (colour, shape) pairs that are not held out, in vocabulary order."""
        return [(c, s) for c in self.colours for s in self.shapes if (c, s) not in self.heldout]


@dataclass(frozen=True)
class CirrConfig:
    """Sizes of the CIRR-format benchmark (one query per 6-image set).

    Attributes:
        train_queries: training triplets (the supervised methods' data).
        val_queries: validation queries (seen templates and combinations only).
        test_queries: test queries (``test1``), with held-out parts.
        extra_gallery: random extra scenes added to each split's gallery beyond the query images.
        train_subdirs: the train images are spread over this many sub-folders, like CIRR's ``./train/<k>/``.
        heldout_template_fraction: fraction of test queries verbalised with held-out templates.
        heldout_combo_fraction: fraction of test queries whose edited object is a held-out combination.
    """

    train_queries: int = 4000
    val_queries: int = 1000
    test_queries: int = 1000
    extra_gallery: int = 500
    train_subdirs: int = 10
    heldout_template_fraction: float = 0.3
    heldout_combo_fraction: float = 0.3


@dataclass(frozen=True)
class CircoConfig:
    """Sizes of the CIRCO-format benchmark (under-specified edits with several ground truths).

    Attributes:
        val_queries: validation queries (seen templates and combinations only).
        test_queries: test queries, with held-out parts.
        max_gts: most ground-truth scenes rendered on purpose per query (others may satisfy it by chance).
        distractors_per_query: near-miss scenes rendered per query (one step away from a ground truth).
        extra_gallery: random extra scenes in the shared gallery.
        heldout_template_fraction: fraction of test queries verbalised with held-out templates.
        heldout_combo_fraction: fraction of test queries built around a held-out combination.
    """

    val_queries: int = 200
    test_queries: int = 600
    max_gts: int = 6
    distractors_per_query: int = 3
    extra_gallery: int = 1000
    heldout_template_fraction: float = 0.3
    heldout_combo_fraction: float = 0.3


@dataclass(frozen=True)
class BenchmarkStyle:
    """How both benchmark formats shoot their ground truths and word their texts, in every split.

    The defaults make a Shapes query read like a CIRR one (docs/RESULTS.md, calibration section, has the probes
    that chose them on val): the target is another photograph of the edited scene, so the reference's look misleads
    as it does on CIRR, and the text describes the target, as CIRR's relative captions mostly do.

    Attributes:
        reshoot: each ground truth is rendered with the objects the edit did not touch moved to other random cells
            (the object the edit made or changed keeps its cell; after a removal every object moves). A query's
            ground truth is then any scene satisfying its edit *anywhere* (``Edit.satisfied_anywhere``), and the
            builder keeps every other such scene out of the galleries. False: the edit in place, exact semantics.
        texts: ``state+alt``: a target-state phrase (``STATE_TEMPLATES``; the removals keep their instruction)
            followed by an alt-text caption of the (main) target, drawn as the pretraining captions are; ``edit``:
            the instruction alone (``BENCHMARK_TEMPLATES``).
        alt_full: chance that the target's alt-text is its complete caption (0: always a partial one).
    """

    reshoot: bool = True
    texts: str = "state+alt"
    alt_full: float = 0.0

    def __post_init__(self) -> None:
        if self.texts not in ("state+alt", "edit"):
            raise ValueError(f"unknown benchmark text style {self.texts!r} (state+alt, edit)")
        if not 0.0 <= self.alt_full <= 1.0:
            raise ValueError(f"alt_full must be a probability, got {self.alt_full}")


DEFAULT_STYLE = BenchmarkStyle()
"""The default: re-shot ground truths, target-state + alt-text texts."""

LEGACY_STYLE = BenchmarkStyle(reshoot=False, texts="edit")
"""Code version 2's benchmark: edits applied in place, instruction texts."""


@dataclass(frozen=True)
class CorpusConfig:
    """The image-caption corpus for backbone pretraining and the zero-shot methods (no triplets).

    Attributes:
        images: number of scenes, stored as one uint8 array.
        captions_per_image: pre-sampled phrasings written per image (trainers can draw fresh ones).
        caption_style: ``alt-text`` (complete and partial descriptions, like web alt-text; see ``alttext.py``) or
            ``scene`` (complete scene captions only).
    """

    images: int = 20000
    captions_per_image: int = 3
    caption_style: str = "alt-text"

    def __post_init__(self) -> None:
        if self.caption_style not in ("alt-text", "scene"):
            raise ValueError(f"unknown caption style {self.caption_style!r} (alt-text, scene)")


@dataclass(frozen=True)
class SyntheticConfig:
    """The zero-shot methods' synthetic triplets: another generator and template family than the benchmark's.

    Attributes:
        triplets: number of triplets.
        corrupt_fraction: fraction of triplets in ``triplets.jsonl`` whose target is wrong.
        extra_corrupt_fractions: further files ``triplets.corruptNN.jsonl`` at these fractions; the corrupted
            records are nested (every record corrupted at 20% is also corrupted at 40%).
    """

    triplets: int = 2000
    corrupt_fraction: float = 0.0
    extra_corrupt_fractions: tuple[float, ...] = (0.2, 0.4)

    def __post_init__(self) -> None:
        for f in (self.corrupt_fraction, *self.extra_corrupt_fractions):
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"corruption fraction {f} is not in [0, 1]")


DEFAULT_HELDOUT_TEMPLATES: tuple[str, ...] = (
    "add/3",
    "remove/3",
    "recolour/3",
    "reshape/3",
    "resize/3",
    "move/3",
    "add_any/2",
    "recolour_group/2",
    "move_region/2",
    "reshape_any/2",
    "recolour_any/2",
    "remove_one/2",
    "state/add/3",
    "state/recolour/3",
    "state/reshape/3",
    "state/resize/3",
    "state/move/3",
    "state/add_any/2",
    "state/recolour_group/2",
    "state/move_region/2",
    "state/reshape_any/2",
    "state/recolour_any/2",
)


@dataclass(frozen=True)
class ShapesConfig:
    """Everything that determines a Shapes world; equal configs build byte-identical worlds.

    Attributes:
        seed: master seed; every component draws from its own stream derived from it.
        render: rendering and jitter.
        scene: vocabulary, scene distribution and held-out combinations.
        heldout_templates: benchmark and target-state template ids (``"<kind>/<index>"``,
            ``"state/<kind>/<index>"``, see ``edits.py``) used only in test queries.
        style: how the benchmarks shoot their targets and word their texts.
        cirr: the CIRR-format benchmark.
        circo: the CIRCO-format benchmark.
        corpus: the image-caption corpus.
        synthetic: the synthetic triplets.
    """

    seed: int = 0
    render: RenderConfig = field(default_factory=RenderConfig)
    scene: SceneConfig = field(default_factory=SceneConfig)
    heldout_templates: tuple[str, ...] = DEFAULT_HELDOUT_TEMPLATES
    style: BenchmarkStyle = field(default_factory=BenchmarkStyle)
    cirr: CirrConfig = field(default_factory=CirrConfig)
    circo: CircoConfig = field(default_factory=CircoConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    @classmethod
    def quick(cls, seed: int = 0) -> ShapesConfig:
        """A small world that builds in a few seconds (smoke tests, ``cirlab demo --quick``)."""
        return cls(
            seed=seed,
            cirr=CirrConfig(train_queries=500, val_queries=100, test_queries=200, extra_gallery=100),
            circo=CircoConfig(val_queries=40, test_queries=100, extra_gallery=200),
            corpus=CorpusConfig(images=5000),
            synthetic=SyntheticConfig(triplets=500),
        )


def component_rng(seed: int, *parts: str) -> random.Random:
    """An independent random stream for one component (e.g. ``("cirr", "train")``) of the world.

    String seeds are hashed with SHA-512 by ``random.Random``, so streams do not depend on ``PYTHONHASHSEED``, and
    resizing one component leaves the others unchanged.
    """
    return random.Random("/".join(("shapes", str(seed), *parts)))


def combo_filter(heldout: Iterable[Combo], allowed_heldout: Iterable[Combo] = ()) -> Callable[[Combo], bool]:
    """A predicate accepting every combination except held-out ones not listed in ``allowed_heldout``."""
    banned = frozenset(heldout) - frozenset(allowed_heldout)
    return lambda combo: combo not in banned


def scene_ok(scene: Scene, combo_ok: Callable[[Combo], bool]) -> bool:
    """Whether every object of ``scene`` passes ``combo_ok``."""
    return all(combo_ok(o.combo) for o in scene.objects)


def sample_object(rng: random.Random, cfg: SceneConfig, cell: int, combo_ok: Callable[[Combo], bool]) -> ShapeObject:
    """A random object in ``cell`` whose (colour, shape) passes ``combo_ok``."""
    combos = [(c, s) for c in cfg.colours for s in cfg.shapes if combo_ok((c, s))]
    colour, shape = rng.choice(combos)
    return ShapeObject(cell=cell, shape=shape, colour=colour, size=rng.choice(SIZES))


def sample_objects(
    rng: random.Random, cfg: SceneConfig, n: int, free: Iterable[int], combo_ok: Callable[[Combo], bool]
) -> list[ShapeObject]:
    """``n`` random objects in distinct cells drawn from ``free``."""
    cells = rng.sample(sorted(free), n)
    return [sample_object(rng, cfg, c, combo_ok) for c in cells]


def sample_scene(
    rng: random.Random,
    cfg: SceneConfig,
    combo_ok: Callable[[Combo], bool] | None = None,
    n_objects: int | None = None,
) -> Scene:
    """A random scene.

    Args:
        rng: the random stream.
        cfg: vocabulary and object-count range.
        combo_ok: which (colour, shape) pairs may appear; default: every pair that is not held out.
        n_objects: exact object count; default: uniform in ``[min_objects, max_objects]``.
    """
    ok = combo_ok if combo_ok is not None else combo_filter(cfg.heldout)
    n = n_objects if n_objects is not None else rng.randint(cfg.min_objects, cfg.max_objects)
    return Scene(tuple(sample_objects(rng, cfg, n, range(N_CELLS), ok)))
