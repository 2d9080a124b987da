"""Alt-text-like captions of Shapes scenes, each drawn together with the facts it states.

Web alt-text describes a photo partially: the salient object, a few of them, sometimes everything; some attributes
and not others; now and then a count. That variety is what lets a real CLIP place "a blue circle" near every image
that holds one, and so what lets training-free composition (image + text) mean anything. The Shapes CLIP is
pretrained on captions drawn here: with probability ``full`` a complete scene caption (``captions.caption``, every
object with every attribute), otherwise a partial one naming a random subset of the objects with a random subset of
their attributes, in varied frames, word orders and synonyms.

Every caption comes with its ``Claim``, so a trainer knows exactly which images of a batch a caption is true of
(``truth_matrix``): a partial caption is true of many scenes, and counting those as negatives would teach the model
to contradict true statements. No caption uses an edit word ("make", "remove", "instead"): edits are a benchmark's
business, never pretraining data.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cirlab.data.shapes.captions import COUNT_WORDS, SIZE_WORDS, caption, join_phrases, where_phrase
from cirlab.data.shapes.world import COLOURS, SHAPES, SIZES, Scene, ShapeObject


@dataclass(frozen=True)
class ObjectClaim:
    """What a caption says of one object; ``None`` leaves an attribute unstated."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None
    cell: int | None = None

    def holds_for(self, obj: ShapeObject) -> bool:
        """Whether ``obj`` fits every stated attribute."""
        return all(
            want is None or want == have
            for want, have in (
                (self.size, obj.size),
                (self.colour, obj.colour),
                (self.shape, obj.shape),
                (self.cell, obj.cell),
            )
        )


@dataclass(frozen=True)
class Claim:
    """The facts of one caption.

    Attributes:
        objects: objects the caption mentions; distinct mentions are distinct objects of the scene.
        count: the number of objects the caption states (``None``: not stated).
        complete: the caption lists every object of the scene.
    """

    objects: tuple[ObjectClaim, ...]
    count: int | None = None
    complete: bool = False

    def true_of(self, scene: Scene) -> bool:
        """Whether the caption is true of ``scene`` (the mentioned objects match distinct objects of it)."""
        objs = scene.objects
        if self.count is not None and self.count != len(objs):
            return False
        if len(self.objects) > len(objs) or (self.complete and len(self.objects) != len(objs)):
            return False
        return any(
            all(c.holds_for(objs[k]) for c, k in zip(self.objects, perm, strict=True))
            for perm in itertools.permutations(range(len(objs)), len(self.objects))
        )


@dataclass(frozen=True)
class AltTextConfig:
    """The caption distribution.

    Attributes:
        full: probability of a complete scene caption.
        p_shape: a mentioned object's shape is named (else "shape"/"object", unless its colour is not named either).
        p_colour: its colour is named.
        p_size: its size is named.
        p_cell: its position is named.
        p_count: a partial caption states the number of objects.
    """

    full: float = 0.4
    p_shape: float = 0.85
    p_colour: float = 0.8
    p_size: float = 0.4
    p_cell: float = 0.4
    p_count: float = 0.2


PARTIAL_FRAMES: tuple[str, ...] = (
    "{x}",
    "a picture of {x}",
    "a photo of {x}",
    "a scene with {x}",
    "there is {x}",
    "an image showing {x}",
    "{x} on a grey background",
    "{x} among other shapes",
)
"""Frames of partial captions; ``{x}`` is the list of mentioned objects."""


def _mention(claim: ObjectClaim, rng: random.Random) -> str:
    words = [rng.choice(SIZE_WORDS[claim.size])] if claim.size else []
    words += [claim.colour] if claim.colour else []
    words.append(claim.shape or rng.choice(("shape", "object")))
    noun = " ".join(words)
    noun = ("an " if noun[0] in "aeiou" else "a ") + noun
    if claim.cell is None:
        return noun
    return (
        f"{noun} {where_phrase(claim.cell, rng)}" if rng.random() < 0.8 else f"{where_phrase(claim.cell, rng)}, {noun}"
    )


def _object_claim(obj: ShapeObject, cfg: AltTextConfig, rng: random.Random) -> ObjectClaim:
    shape = obj.shape if rng.random() < cfg.p_shape else None
    colour = obj.colour if rng.random() < cfg.p_colour else None
    if shape is None and colour is None:
        shape = obj.shape
    return ObjectClaim(
        size=obj.size if rng.random() < cfg.p_size else None,
        colour=colour,
        shape=shape,
        cell=obj.cell if rng.random() < cfg.p_cell else None,
    )


def alt_caption(scene: Scene, rng: random.Random, cfg: AltTextConfig = AltTextConfig()) -> tuple[str, Claim]:
    """A random alt-text caption of ``scene`` and the claim it makes.

    Example:
        ("a photo of a red circle and a big star at the top left", Claim(...))
    """
    if rng.random() < cfg.full:
        text = caption(scene, rng)
        return text, Claim(tuple(ObjectClaim(o.size, o.colour, o.shape, o.cell) for o in scene.objects), None, True)
    objs = list(scene.objects)
    rng.shuffle(objs)
    claims = tuple(_object_claim(o, cfg, rng) for o in objs[: rng.randint(1, len(objs))])
    body = join_phrases([_mention(c, rng) for c in claims])
    if rng.random() < cfg.p_count:
        n = len(objs)
        counted = f"{COUNT_WORDS[n]} {'shape' if n == 1 else 'shapes'}"
        text = f"{counted}: {body}" if rng.random() < 0.5 else f"{counted}, among them {body}"
        return text, Claim(claims, n, False)
    return rng.choice(PARTIAL_FRAMES).format(x=body), Claim(claims, None, False)


_ATTRS: tuple[tuple[str, ...], ...] = (SIZES, COLOURS, SHAPES)
_PERMUTATIONS = np.array(list(itertools.permutations(range(4))), dtype=np.int64)  # (24, 4)
_MAX = 4


def _encode_scenes(scenes: Sequence[Scene]) -> tuple[np.ndarray, np.ndarray]:
    """(S, 4, 4) attribute codes (size, colour, shape, cell; -2 for an absent object) and (S,) object counts."""
    codes = np.full((len(scenes), _MAX, 4), -2, dtype=np.int64)
    for i, scene in enumerate(scenes):
        for k, o in enumerate(scene.objects):
            codes[i, k] = (SIZES.index(o.size), COLOURS.index(o.colour), SHAPES.index(o.shape), o.cell)
    return codes, np.array([len(s) for s in scenes])


def _encode_claims(claims: Sequence[Claim]) -> tuple[np.ndarray, np.ndarray]:
    """(C, 4, 4) stated codes (-1 for unstated) and (C, 4) flags of padding mentions (true of anything)."""
    codes = np.full((len(claims), _MAX, 4), -1, dtype=np.int64)
    pad = np.ones((len(claims), _MAX), dtype=bool)
    for j, claim in enumerate(claims):
        for k, c in enumerate(claim.objects):
            pad[j, k] = False
            codes[j, k] = [
                -1 if v is None else vocab.index(v)
                for v, vocab in zip((c.size, c.colour, c.shape), _ATTRS, strict=True)
            ] + [-1 if c.cell is None else c.cell]
    return codes, pad


def truth_matrix(scenes: Sequence[Scene], claims: Sequence[Claim]) -> np.ndarray:
    """``M[i, j]``: claim ``j`` is true of scene ``i`` (vectorised ``Claim.true_of`` for scenes of <= 4 objects).

    Mentions are padded to four with mentions true of anything and scenes to four with absent objects that only
    padding mentions fit; a claim holds when some permutation maps every mention to an object it fits.
    """
    if any(len(s) > _MAX for s in scenes) or any(len(c.objects) > _MAX for c in claims):
        return np.array([[c.true_of(s) for c in claims] for s in scenes], dtype=bool)
    scene_codes, n_objects = _encode_scenes(scenes)
    claim_codes, pad = _encode_claims(claims)
    stated = claim_codes[:, None, :, None, :]  # (C, 1, 4 mentions, 1, 4 attrs)
    fits = ((stated == -1) | (stated == scene_codes[None, :, None, :, :])).all(-1)  # (C, S, 4 mentions, 4 objects)
    fits &= scene_codes[None, :, None, :, 0] != -2
    fits |= pad[:, None, :, None]
    matched = fits[:, :, np.arange(_MAX)[None, :], _PERMUTATIONS].all(-1).any(-1)  # (C, S)
    counts = np.array([-1 if c.count is None else c.count for c in claims])
    complete = np.array([c.complete for c in claims])
    mentions = np.array([len(c.objects) for c in claims])
    matched &= (counts[:, None] == -1) | (counts[:, None] == n_objects[None, :])
    matched &= ~complete[:, None] | (mentions[:, None] == n_objects[None, :])
    return matched.T
