"""Scene captions: several phrasings of the same facts, plus one fixed "eval caption" per scene.

Training captions vary the sentence frame, the synonyms (big/large, small/little, center/middle, at/in) and the
order of the objects, so a text encoder learns the facts rather than one string. The eval caption is a single
canonical phrasing with the objects in grid order, so equal scenes have equal eval captions.

Captions only describe scenes; modification texts live in ``edits.py``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from cirlab.data.shapes.world import CELL_NAMES, COLOURS, SHAPES, Scene, ShapeObject

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
# Synonyms of grid positions; the first name is canonical.
POSITION_WORDS: dict[int, tuple[str, ...]] = {i: (name,) for i, name in enumerate(CELL_NAMES)} | {
    4: ("center", "middle")
}
PREPOSITIONS: tuple[str, ...] = ("at", "in")
KEYWORDS: tuple[str, ...] = (*SHAPES, *COLOURS, *(w for words in SIZE_WORDS.values() for w in words))
"""The attribute and shape words of captions (what LinCIR-style training masks, what SEARLE-style concepts name)."""
COUNT_WORDS: tuple[str, ...] = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def size_word(size: str, rng: random.Random | None = None) -> str:
    """A word for ``size``: the canonical one without ``rng``, a random synonym with it."""
    words = SIZE_WORDS[size]
    return rng.choice(words) if rng is not None else words[0]


def position_word(cell: int, rng: random.Random | None = None) -> str:
    """A name for grid ``cell`` ("top left", "center"/"middle", ...); canonical without ``rng``."""
    words = POSITION_WORDS[cell]
    return rng.choice(words) if rng is not None else words[0]


def where_phrase(cell: int, rng: random.Random | None = None) -> str:
    """A locative phrase: "at the top left", "in the middle", ...; canonical ("at the ...") without ``rng``."""
    prep = rng.choice(PREPOSITIONS) if rng is not None else PREPOSITIONS[0]
    return f"{prep} the {position_word(cell, rng)}"


def object_phrase(obj: ShapeObject, rng: random.Random | None = None) -> str:
    """ "big red circle" (no article, no position); canonical words without ``rng``."""
    return f"{size_word(obj.size, rng)} {obj.colour} {obj.shape}"


def join_phrases(parts: Sequence[str]) -> str:
    """ "a, b and c"."""
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _style_list(objs: Sequence[ShapeObject], rng: random.Random) -> str:
    return join_phrases([f"a {object_phrase(o, rng)} {where_phrase(o.cell, rng)}" for o in objs])


def _style_colon(objs: Sequence[ShapeObject], rng: random.Random) -> str:
    return ", ".join(f"{position_word(o.cell, rng)}: a {object_phrase(o, rng)}" for o in objs)


def _style_there_is(objs: Sequence[ShapeObject], rng: random.Random) -> str:
    return "there is " + _style_list(objs, rng)


def _style_scene_with(objs: Sequence[ShapeObject], rng: random.Random) -> str:
    return "a scene with " + _style_list(objs, rng)


def _style_count(objs: Sequence[ShapeObject], rng: random.Random) -> str:
    noun = "shape" if len(objs) == 1 else "shapes"
    return f"{COUNT_WORDS[len(objs)]} {noun}: " + _style_list(objs, rng)


def _style_picture(objs: Sequence[ShapeObject], rng: random.Random) -> str:
    return "a picture showing " + _style_list(objs, rng)


CAPTION_STYLES: dict[str, Callable[[Sequence[ShapeObject], random.Random], str]] = {
    "list": _style_list,
    "colon": _style_colon,
    "there_is": _style_there_is,
    "scene_with": _style_scene_with,
    "count": _style_count,
    "picture": _style_picture,
}


def caption(scene: Scene, rng: random.Random) -> str:
    """A random phrasing of ``scene``: random frame, synonyms and object order.

    Example:
        "top left: a big red circle, middle: a little blue square"
    """
    objs = list(scene.objects)
    rng.shuffle(objs)
    style = CAPTION_STYLES[rng.choice(sorted(CAPTION_STYLES))]
    return style(objs, rng)


def eval_caption(scene: Scene) -> str:
    """The canonical caption: objects in grid order, canonical words.

    Example:
        "a large red circle at the top left and a small blue square at the center"
    """
    return join_phrases([object_fact(o) for o in scene.objects])


def object_fact(obj: ShapeObject) -> str:
    """The canonical phrase for one object: "a large red circle at the top left"."""
    return f"a {object_phrase(obj)} {where_phrase(obj.cell)}"
