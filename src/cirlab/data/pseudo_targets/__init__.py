"""Pseudo-target images: what the target of a (reference image, modification text) pair should look like, made by
a generator instead of a photographer (TMCIR, arXiv 2504.10995, aligns CLIP's text encoder with such images).

Two generators sit behind one interface, ``PseudoTargetGenerator``:

* ``DiffusersGenerator`` (``diffusion``): a diffusers image-to-image or instruction-editing pipeline loaded from
  a hub id or a local directory; diffusers is the optional extra ``diffusion``.
* ``ShapesRendererGenerator`` (``shapes``): in the Shapes world, the world's own renderer applied to the edited
  scene, with attribute noise standing in for a diffusion model's mistakes.

``generate_pseudo_targets`` (``runner``) runs a generator over requests into a folder, resumably, and
``read_pseudo_targets`` / ``records_for`` read such a folder back.
"""

from cirlab.data.pseudo_targets.diffusion import DiffusersConfig, DiffusersGenerator
from cirlab.data.pseudo_targets.runner import (
    GENERATOR_FILE,
    IMAGES_DIR,
    MANIFEST_FILE,
    PseudoRequest,
    PseudoTarget,
    PseudoTargetGenerator,
    PseudoTargetOptions,
    generate_pseudo_targets,
    image_file,
    item_seed,
    read_pseudo_targets,
    records_for,
    split_requests,
)
from cirlab.data.pseudo_targets.shapes import (
    NOISE_ATTRIBUTES,
    ShapesRendererGenerator,
    shapes_pseudo_dir,
    shapes_pseudo_targets,
    shapes_requests,
)

__all__ = [
    "GENERATOR_FILE",
    "IMAGES_DIR",
    "MANIFEST_FILE",
    "NOISE_ATTRIBUTES",
    "DiffusersConfig",
    "DiffusersGenerator",
    "PseudoRequest",
    "PseudoTarget",
    "PseudoTargetGenerator",
    "PseudoTargetOptions",
    "ShapesRendererGenerator",
    "generate_pseudo_targets",
    "image_file",
    "item_seed",
    "read_pseudo_targets",
    "records_for",
    "shapes_pseudo_dir",
    "shapes_pseudo_targets",
    "shapes_requests",
    "split_requests",
]
