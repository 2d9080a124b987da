"""The Shapes world: a procedural, compositional CIR benchmark that trains and evaluates end to end on a CPU.

Scenes of 1 to 4 coloured shapes on a 3x3 grid are rendered with PIL; edits (add, remove, recolour, reshape,
resize, move, and under-specified variants) have checkable semantics; ``build_world`` writes CIRR- and
CIRCO-format benchmarks with held-out templates and (colour, shape) combinations, an image-caption corpus and a
separate synthetic triplet set for the zero-shot methods. By default (``BenchmarkStyle``) a benchmark's ground
truths are re-shot, another photograph of the edited scene with the untouched objects elsewhere, and its texts
say what the edited object is in the target and then describe the target partially, as CIRR's captions do. See
``shapes_world.py`` for the directory layout.

Registered as benchmark ``"shapes"``: ``BENCHMARKS.get("shapes")`` is ``load_shapes(world_dir, image_root=None,
split="val", **options) -> CIRSplit``, the same signature as the ``cirr`` and ``circo`` loaders (splits ``train``,
``val``, ``test1`` in CIRR format, ``circo-val``, ``circo-test`` in CIRCO format). ``build_world`` makes the
world directory first.

Example:
    >>> from cirlab.data.shapes import ShapesConfig, build_world
    >>> world = build_world(ShapesConfig.quick(), "runs/shapes-quick")  # doctest: +SKIP
    >>> test = load_shapes(world.root, split="test1")  # doctest: +SKIP
    >>> query_groups(test)["heldout_combo"][:3]  # doctest: +SKIP
    [0, 4, 7]
"""

from cirlab.data.shapes.captions import KEYWORDS, caption, eval_caption
from cirlab.data.shapes.corpus import ShapesCorpus
from cirlab.data.shapes.edits import (
    BENCHMARK_TEMPLATES,
    EXACT_KINDS,
    OPEN_KINDS,
    STATE_TEMPLATES,
    SYNTHETIC_TEMPLATES,
    Edit,
    TemplateMatcher,
    Verbalised,
    benchmark_template_ids,
    satisfies,
    satisfies_anywhere,
    state_template_ids,
    synthetic_template_ids,
    template_regex,
    text_opening,
    verbalise,
)
from cirlab.data.shapes.loader import load_shapes, query_groups
from cirlab.data.shapes.render import render_image, render_scene
from cirlab.data.shapes.shapes_world import (
    CODE_VERSION,
    ShapesWorld,
    build_world,
    default_world_dir,
    load_world,
    world_id,
)
from cirlab.data.shapes.synthetic import read_triplets
from cirlab.data.shapes.world import (
    CELL_NAMES,
    COLOURS,
    SHAPES,
    SIZES,
    BenchmarkStyle,
    CircoConfig,
    CirrConfig,
    CorpusConfig,
    RenderConfig,
    Scene,
    SceneConfig,
    ShapeObject,
    ShapesConfig,
    SyntheticConfig,
    sample_scene,
)
from cirlab.registry import BENCHMARKS

BENCHMARKS.add("shapes", load_shapes)

__all__ = [
    "BENCHMARK_TEMPLATES",
    "CELL_NAMES",
    "CODE_VERSION",
    "COLOURS",
    "EXACT_KINDS",
    "KEYWORDS",
    "OPEN_KINDS",
    "SHAPES",
    "SIZES",
    "STATE_TEMPLATES",
    "SYNTHETIC_TEMPLATES",
    "BenchmarkStyle",
    "CircoConfig",
    "CirrConfig",
    "CorpusConfig",
    "Edit",
    "RenderConfig",
    "Scene",
    "SceneConfig",
    "ShapeObject",
    "ShapesConfig",
    "ShapesCorpus",
    "ShapesWorld",
    "SyntheticConfig",
    "TemplateMatcher",
    "Verbalised",
    "benchmark_template_ids",
    "build_world",
    "caption",
    "default_world_dir",
    "eval_caption",
    "load_shapes",
    "load_world",
    "query_groups",
    "read_triplets",
    "render_image",
    "render_scene",
    "sample_scene",
    "satisfies",
    "satisfies_anywhere",
    "state_template_ids",
    "synthetic_template_ids",
    "template_regex",
    "text_opening",
    "verbalise",
    "world_id",
]
