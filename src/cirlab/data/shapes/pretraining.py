"""The Shapes CLIP's pretraining stream: batches of near-duplicate scene groups with alt-text captions.

Real CLIPs learn from hundreds of millions of photos; a few thousand steps on two cores learn little unless every
batch is informative. Two habits of real CLIP training make it so here:

* **Hard negatives** (NegCLIP's lesson): a batch is made of groups of ``group`` scenes one step apart (an object
  recoloured, reshaped, resized, moved, added or removed), so telling a scene from its one-attribute variants is
  what the contrastive loss rewards. These are scenes, not triplets: no edit text is ever shown.
* **Alt-text captions** (``alttext.py``): complete and partial descriptions, with the truth matrix of which caption
  is true of which image in the batch.

Scenes are drawn fresh for every batch from the world's scene distribution with every held-out (colour, shape)
combination excluded, so the backbone never sees what the test splits hold out. A batch is a pure function of
(seed, step, micro-batch), so a resumed run replays exactly the data of an uninterrupted one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from cirlab.data.shapes.alttext import AltTextConfig, Claim, alt_caption, truth_matrix
from cirlab.data.shapes.edits import one_step_edits
from cirlab.data.shapes.render import render_batch
from cirlab.data.shapes.world import (
    RenderConfig,
    Scene,
    SceneConfig,
    combo_filter,
    sample_object,
    sample_scene,
    scene_ok,
)

_ATTEMPTS = 20


def near_duplicate(scene: Scene, cfg: SceneConfig, rng: random.Random, p_add: float = 0.15) -> Scene | None:
    """A random scene one step from ``scene`` (seen combinations only, object count in range); None if none found."""
    seen = combo_filter(cfg.heldout)
    for _ in range(_ATTEMPTS):
        if rng.random() < p_add and len(scene) < cfg.max_objects:
            other = scene.with_object(sample_object(rng, cfg, rng.choice(scene.free_cells()), seen))
        else:
            other = rng.choice(one_step_edits(scene, cfg.shapes, cfg.colours)).apply(scene)
        if other != scene and scene_ok(other, seen) and cfg.min_objects <= len(other) <= cfg.max_objects:
            return other
    return None


def scene_groups(rng: random.Random, cfg: SceneConfig, n: int, group: int) -> list[Scene]:
    """``n`` scenes in consecutive groups of ``group``: a random scene, then near duplicates of the group's members."""
    seen = combo_filter(cfg.heldout)
    out: list[Scene] = []
    while len(out) < n:
        members = [sample_scene(rng, cfg, seen)]
        for _ in range(_ATTEMPTS * group):
            if len(members) == group:
                break
            other = near_duplicate(rng.choice(members), cfg, rng)
            if other is not None and other not in members:
                members.append(other)
        out += members
    return out[:n]


@dataclass
class PretrainBatch:
    """One batch: images (B, H, W, 3) uint8, captions, and ``positives[i, j]``: caption ``j`` is true of image ``i``."""

    images: np.ndarray
    captions: list[str]
    positives: np.ndarray
    claims: list[Claim]


def pretrain_batch(
    seed: int,
    step: int,
    micro: int,
    size: int,
    group: int,
    scene: SceneConfig,
    render: RenderConfig,
    captions: AltTextConfig,
) -> PretrainBatch:
    """The batch of (``seed``, ``step``, ``micro``): ``size`` scenes in near-duplicate groups, rendered, captioned."""
    rng = random.Random(f"shapes-clip/{seed}/{step}/{micro}")
    scenes = scene_groups(rng, scene, size, group)
    drawn = [alt_caption(s, rng, captions) for s in scenes]
    images = render_batch([(s, rng.getrandbits(31)) for s in scenes], render)
    claims = [claim for _, claim in drawn]
    return PretrainBatch(images, [text for text, _ in drawn], truth_matrix(scenes, claims), claims)
