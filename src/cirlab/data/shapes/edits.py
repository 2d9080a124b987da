"""Edits of Shapes scenes, their verifiable semantics, and the template families that put them into words.

Two kinds of edit:

* **exact** (``add``, ``remove``, ``recolour``, ``reshape``, ``resize``, ``move``): one target scene,
  ``edit.apply(reference)``. The CIRR-format benchmark and the synthetic triplets use these.
* **open** (``add_any``, ``recolour_group``, ``move_region``, ``reshape_any``, ``recolour_any``, ``remove_one``):
  under-specified, several scenes satisfy them ("add a red star anywhere", "make the circle a warm colour").
  The CIRCO-format benchmark uses these; ``edit.targets(reference, ...)`` enumerates every satisfying scene.

``satisfies(edit, reference, candidate)`` is the ground truth used by the builders and the tests. The edited object
is identified by its cell; the text refers to it by a description that is unique in the reference scene.
``satisfies_anywhere`` is the same with the objects the edit does not touch allowed in any cell: the ground truth of a
world whose targets are re-shot (another photograph of the edited scene, as a CIRR target is; ``BenchmarkStyle``).

Templates come in three disjoint families. ``BENCHMARK_TEMPLATES`` (ids ``"<kind>/<i>"``) verbalise benchmark
queries as instructions; ``STATE_TEMPLATES`` (ids ``"state/<kind>/<i>"``) as *target-state* phrases, what the
edited object is in the target ("the circle at the top is blue"), the opening of a text that goes on to describe
the target as CIRR's relative captions do. The config names some templates of both held out, used only in test
queries. ``SYNTHETIC_TEMPLATES`` (ids ``"syn/<kind>/<i>"``) are used only by the synthetic triplet generator that
the zero-shot methods train on.
``template_regex`` turns a template into an anchored pattern, so tests can scan written texts for a template.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cirlab.data.shapes.captions import POSITION_WORDS, PREPOSITIONS, SIZE_WORDS, position_word, where_phrase
from cirlab.data.shapes.world import COLOURS, SHAPES, SIZES, Scene, ShapeObject

EXACT_KINDS: tuple[str, ...] = ("add", "remove", "recolour", "reshape", "resize", "move")
OPEN_KINDS: tuple[str, ...] = ("add_any", "recolour_group", "move_region", "reshape_any", "recolour_any", "remove_one")
COLOUR_GROUPS: dict[str, tuple[str, ...]] = {"warm": ("red", "orange", "yellow"), "cool": ("blue", "cyan", "purple")}
REGIONS: dict[str, tuple[int, ...]] = {
    "top row": (0, 1, 2),
    "bottom row": (6, 7, 8),
    "left column": (0, 3, 6),
    "right column": (2, 5, 8),
}
# Which optional fields each kind needs; every other field must be None.
_FIELDS: dict[str, tuple[str, ...]] = {
    "add": ("cell", "shape", "colour", "size"),
    "remove": ("cell",),
    "recolour": ("cell", "colour"),
    "reshape": ("cell", "shape"),
    "resize": ("cell", "size"),
    "move": ("cell", "to_cell"),
    "add_any": ("shape", "colour"),
    "recolour_group": ("cell", "group"),
    "move_region": ("cell", "region"),
    "reshape_any": ("cell",),
    "recolour_any": ("cell",),
    "remove_one": (),
}
_OPTIONAL = ("cell", "shape", "colour", "size", "to_cell", "group", "region")


@dataclass(frozen=True)
class Edit:
    """One modification of a reference scene.

    Attributes:
        kind: one of ``EXACT_KINDS`` or ``OPEN_KINDS``.
        cell: the edited object's cell in the reference; for ``add``, the cell of the new object.
        shape: the new shape (``reshape``), the added object's shape (``add``, ``add_any``) or, for
            ``remove_one``, the shape selecting the objects one of which is removed.
        colour: like ``shape``, for colours.
        size: the new size (``resize``) or the added object's size (``add``).
        to_cell: destination of a ``move``.
        group: a key of ``COLOUR_GROUPS`` (``recolour_group``).
        region: a key of ``REGIONS`` (``move_region``).
    """

    kind: str
    cell: int | None = None
    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    to_cell: int | None = None
    group: str | None = None
    region: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _FIELDS:
            raise ValueError(f"unknown edit kind {self.kind!r}; known: {', '.join(_FIELDS)}")
        needed = _FIELDS[self.kind]
        missing = [f for f in needed if getattr(self, f) is None]
        extra = [f for f in _OPTIONAL if f not in needed and getattr(self, f) is not None]
        if self.kind == "remove_one":
            # Exactly one selector: a shape or a colour.
            extra = [f for f in extra if f not in ("shape", "colour")]
            if (self.shape is None) == (self.colour is None):
                missing.append("shape xor colour")
        if missing or extra:
            raise ValueError(f"{self.kind} edit: missing {missing}, unexpected {extra}")
        if self.group is not None and self.group not in COLOUR_GROUPS:
            raise ValueError(f"unknown colour group {self.group!r}")
        if self.region is not None and self.region not in REGIONS:
            raise ValueError(f"unknown region {self.region!r}")

    @property
    def is_exact(self) -> bool:
        """Whether exactly one scene satisfies the edit."""
        return self.kind in EXACT_KINDS

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the kind and the fields that are set."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Edit:
        """Inverse of ``to_dict``."""
        return cls(**data)

    def apply(self, reference: Scene) -> Scene:
        """The target scene of an exact edit.

        Raises:
            ValueError: for an open edit, or an edit that does not apply (empty cell, occupied destination,
                a "change" to the value the object already has).
        """
        if not self.is_exact:
            raise ValueError(f"{self.kind} is open: several scenes satisfy it; use targets()")
        if self.kind == "add":
            assert self.cell is not None and self.shape and self.colour and self.size
            if self.cell in reference.cells:
                raise ValueError(f"cannot add to occupied cell {self.cell}")
            return reference.with_object(ShapeObject(self.cell, self.shape, self.colour, self.size))
        obj = _edited(reference, self.cell)
        if self.kind == "remove":
            return reference.without(obj.cell)
        if self.kind == "move":
            if self.to_cell in reference.cells:
                raise ValueError(f"cannot move to occupied cell {self.to_cell}")
            new = obj.replace(cell=self.to_cell)
        else:
            attr = {"recolour": "colour", "reshape": "shape", "resize": "size"}[self.kind]
            if getattr(obj, attr) == getattr(self, attr):
                raise ValueError(f"{self.kind} to the {attr} the object already has")
            new = obj.replace(**{attr: getattr(self, attr)})
        return reference.replaced(obj.cell, new)

    def targets(
        self, reference: Scene, shapes: Sequence[str] = SHAPES, colours: Sequence[str] = COLOURS
    ) -> frozenset[Scene]:
        """Every scene that satisfies the edit, for a world with vocabulary ``shapes`` and ``colours``."""
        if self.is_exact:
            return frozenset({self.apply(reference)})
        if self.kind == "add_any":
            assert self.shape and self.colour
            return frozenset(
                reference.with_object(ShapeObject(c, self.shape, self.colour, s))
                for c in reference.free_cells()
                for s in SIZES
            )
        if self.kind == "remove_one":
            return frozenset(reference.without(o.cell) for o in reference.objects if self.selects(o))
        obj = _edited(reference, self.cell)
        if self.kind == "recolour_group":
            assert self.group is not None
            news = [obj.replace(colour=c) for c in COLOUR_GROUPS[self.group] if c in colours and c != obj.colour]
        elif self.kind == "recolour_any":
            news = [obj.replace(colour=c) for c in colours if c != obj.colour]
        elif self.kind == "reshape_any":
            news = [obj.replace(shape=s) for s in shapes if s != obj.shape]
        else:
            assert self.region is not None
            free = set(reference.free_cells())
            news = [obj.replace(cell=c) for c in REGIONS[self.region] if c in free]
        return frozenset(reference.replaced(obj.cell, n) for n in news)

    def satisfied_by(self, reference: Scene, candidate: Scene) -> bool:
        """Whether ``candidate`` is a correct result of applying the edit to ``reference``.

        Decided from the two scenes alone (no vocabulary), so it also checks ``targets`` independently.
        """
        if self.is_exact:
            return candidate == self.apply(reference)
        ref, cand = set(reference.objects), set(candidate.objects)
        if self.kind == "add_any":
            added = cand - ref
            return (
                ref < cand and len(added) == 1 and {(o.shape, o.colour) for o in added} == {(self.shape, self.colour)}
            )
        if self.kind == "remove_one":
            removed = ref - cand
            return cand < ref and len(removed) == 1 and all(self.selects(o) for o in removed)
        obj = _edited(reference, self.cell)
        rest = ref - {obj}
        if len(cand) != len(ref) or not rest <= cand:
            return False
        (new,) = cand - rest
        same = {a: getattr(new, a) == getattr(obj, a) for a in ("cell", "shape", "colour", "size")}
        if self.kind == "move_region":
            assert self.region is not None
            moved_only = same["shape"] and same["colour"] and same["size"]
            return moved_only and not same["cell"] and new.cell in REGIONS[self.region]
        if self.kind == "reshape_any":
            return same["cell"] and same["colour"] and same["size"] and not same["shape"]
        recoloured_only = same["cell"] and same["shape"] and same["size"] and not same["colour"]
        if self.kind == "recolour_group":
            assert self.group is not None
            return recoloured_only and new.colour in COLOUR_GROUPS[self.group]
        return recoloured_only

    @property
    def kept_cell(self) -> int | None:
        """The cell the edit fixes for the object it makes or changes, in the target.

        None when the edit fixes none: the removals, ``add_any`` and ``move_region`` (their cell is open).
        """
        if self.kind in ("remove", "remove_one", "move_region", "add_any"):
            return None
        return self.to_cell if self.kind == "move" else self.cell

    def satisfied_anywhere(self, reference: Scene, candidate: Scene) -> bool:
        """``satisfied_by`` with the objects the edit does not touch allowed in any cell.

        The edited object must be as the edit leaves it (in its cell where the edit fixes one: for ``move`` and
        ``move_region``, its destination), and the other objects must be the reference's, wherever they are.
        """
        ref, cand = Counter(map(_look, reference.objects)), Counter(map(_look, candidate.objects))
        if self.kind in ("add", "add_any"):
            if len(candidate) != len(reference) + 1:
                return False
            return any(
                o.shape == self.shape
                and o.colour == self.colour
                and (self.kind == "add_any" or (o.cell == self.cell and o.size == self.size))
                and cand - Counter([_look(o)]) == ref
                for o in candidate.objects
            )
        if self.kind in ("remove", "remove_one"):
            if len(candidate) != len(reference) - 1:
                return False
            return any(ref - Counter([_look(o)]) == cand for o in self._removable(reference))
        old = _edited(reference, self.cell)
        if len(candidate) != len(reference):
            return False
        rest = ref - Counter([_look(old)])
        return any(cand - Counter([_look(new)]) == rest and self._changes_into(old, new) for new in candidate.objects)

    def _removable(self, reference: Scene) -> list[ShapeObject]:
        """The objects a removal may take away: the one in its cell, or any one ``remove_one`` selects."""
        if self.kind == "remove":
            return [_edited(reference, self.cell)]
        return [o for o in reference.objects if self.selects(o)]

    def _changes_into(self, old: ShapeObject, new: ShapeObject) -> bool:
        """Whether the edit turns the reference's edited object ``old`` into ``new`` (cells included)."""
        same = {a: getattr(new, a) == getattr(old, a) for a in ("cell", "shape", "colour", "size")}
        if self.kind == "move":
            return new == old.replace(cell=self.to_cell)
        if self.kind == "move_region":
            assert self.region is not None
            kept = same["shape"] and same["colour"] and same["size"]
            return kept and not same["cell"] and new.cell in REGIONS[self.region]
        if self.kind in ("recolour", "reshape", "resize"):
            attr = {"recolour": "colour", "reshape": "shape", "resize": "size"}[self.kind]
            return new == old.replace(**{attr: getattr(self, attr)})
        if self.kind == "reshape_any":
            return same["cell"] and same["colour"] and same["size"] and not same["shape"]
        recoloured = same["cell"] and same["shape"] and same["size"] and not same["colour"]
        if self.kind == "recolour_group":
            assert self.group is not None
            return recoloured and new.colour in COLOUR_GROUPS[self.group]
        return recoloured  # recolour_any

    def target_looks(self, reference: Scene, shapes: Sequence[str], colours: Sequence[str]) -> frozenset[Looks]:
        """The object multisets (``looks``) a scene satisfying the edit anywhere can have: an index key."""
        if self.kind in ("add", "add_any"):
            sizes = [self.size] if self.size is not None else list(SIZES)
            return frozenset(
                looks(reference.objects, add=(self.shape, self.colour, z))
                for z in sizes  # type: ignore[arg-type]
            )
        if self.kind in ("remove", "remove_one"):
            return frozenset(looks(reference.objects, remove=_look(o)) for o in self._removable(reference))
        old = _edited(reference, self.cell)
        if self.kind in ("move", "move_region"):
            return frozenset({looks(reference.objects)})
        if self.is_exact:
            return frozenset({looks(self.apply(reference).objects)})
        news = {_look(t.at(old.cell)) for t in self.targets(reference, shapes, colours)}
        return frozenset(looks(reference.objects, remove=_look(old), add=n) for n in news)

    def selects(self, obj: ShapeObject) -> bool:
        """For ``remove_one``: whether ``obj`` is one of the objects the text designates."""
        return obj.shape == self.shape if self.shape is not None else obj.colour == self.colour


def _edited(scene: Scene, cell: int | None) -> ShapeObject:
    if cell is None:
        raise ValueError("the edit names no cell")
    try:
        return scene.at(cell)
    except KeyError:
        raise ValueError(f"the edit refers to empty cell {cell} of {scene.to_str()}") from None


Look = tuple[str, str, str]
"""An object without its cell: (shape, colour, size)."""
Looks = tuple[Look, ...]
"""A scene's objects without their cells, sorted: equal for two shots of one scene."""


def _look(obj: ShapeObject) -> Look:
    return (obj.shape, obj.colour, obj.size)


def looks(objects: Iterable[ShapeObject], add: Look | None = None, remove: Look | None = None) -> Looks:
    """The sorted looks of ``objects``, with one look added or one removed (an index key; see ``target_looks``)."""
    out = [_look(o) for o in objects]
    if remove is not None:
        out.remove(remove)
    if add is not None:
        out.append(add)
    return tuple(sorted(out))


def satisfies(edit: Edit, reference: Scene, candidate: Scene) -> bool:
    """Whether ``candidate`` is a correct result of ``edit`` on ``reference`` (see ``Edit.satisfied_by``)."""
    return edit.satisfied_by(reference, candidate)


def satisfies_anywhere(edit: Edit, reference: Scene, candidate: Scene) -> bool:
    """``satisfies`` with the untouched objects in any cell (see ``Edit.satisfied_anywhere``)."""
    return edit.satisfied_anywhere(reference, candidate)


def one_step_edits(
    scene: Scene, shapes: Sequence[str], colours: Sequence[str], cells: Iterable[int] | None = None
) -> list[Edit]:
    """Every exact edit of ``scene`` other than ``add``: each object recoloured, reshaped, resized, moved, removed.

    The hard distractors of a query are one step away from its target; this lists those steps.

    Args:
        scene: the scene to change.
        shapes: the shape vocabulary.
        colours: the colour vocabulary.
        cells: only edit the objects in these cells (default: all objects).
    """
    edits: list[Edit] = []
    free = scene.free_cells()
    wanted = scene.cells if cells is None else frozenset(cells)
    for obj in scene.objects:
        if obj.cell not in wanted:
            continue
        edits += [Edit("recolour", cell=obj.cell, colour=c) for c in colours if c != obj.colour]
        edits += [Edit("reshape", cell=obj.cell, shape=s) for s in shapes if s != obj.shape]
        edits.append(Edit("resize", cell=obj.cell, size="small" if obj.size == "large" else "large"))
        edits += [Edit("move", cell=obj.cell, to_cell=c) for c in free]
        if len(scene) > 1:
            edits.append(Edit("remove", cell=obj.cell))
    return edits


# ----------------------------------------------------------------------------------------------------------------
# Templates. Fields: {obj} referring expression of the edited object (no article); {a_thing} an added object with
# its article; {where} "at the top left" / "in the middle"; {pos} a bare position name; {colour}; {a_shape} a shape
# with its article; {size}; {comparative} bigger/smaller; {resize_verb} enlarge/shrink; {group}; {region};
# {plural} the objects one of which is removed ("circles", "red shapes").

BENCHMARK_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "add {a_thing} {where}",
        "put {a_thing} {where}",
        "there should also be {a_thing} {where}",
        "place {a_thing} {where} as well",
        "include {a_thing} {where}",
    ),
    "remove": (
        "remove the {obj}",
        "take away the {obj}",
        "get rid of the {obj}",
        "the {obj} should be gone",
        "delete the {obj}",
    ),
    "recolour": (
        "make the {obj} {colour}",
        "the {obj} should be {colour} instead",
        "change the colour of the {obj} to {colour}",
        "paint the {obj} {colour}",
        "turn the {obj} {colour}",
    ),
    "reshape": (
        "make the {obj} {a_shape}",
        "the {obj} should be {a_shape} instead",
        "change the {obj} into {a_shape}",
        "swap the {obj} for {a_shape} of the same colour",
        "turn the {obj} into {a_shape}",
    ),
    "resize": (
        "make the {obj} {size}",
        "the {obj} should be {size} instead",
        "change the size of the {obj} to {size}",
        "{resize_verb} the {obj}",
        "make the {obj} {comparative}",
    ),
    "move": (
        "move the {obj} to the {pos}",
        "the {obj} should be {where} instead",
        "put the {obj} {where}",
        "shift the {obj} over to the {pos}",
        "relocate the {obj} to the {pos}",
    ),
    "add_any": (
        "add {a_thing} anywhere",
        "put {a_thing} somewhere in the picture",
        "{a_thing} should appear somewhere",
        "include {a_thing} of any size anywhere",
    ),
    "recolour_group": (
        "make the {obj} a {group} colour",
        "the {obj} should have a {group} colour",
        "give the {obj} some {group} colour",
    ),
    "move_region": (
        "move the {obj} to the {region}",
        "put the {obj} somewhere in the {region}",
        "the {obj} should end up in the {region}",
    ),
    "reshape_any": (
        "give the {obj} a different shape",
        "the {obj} should be some other shape",
        "change the shape of the {obj} to anything else",
    ),
    "recolour_any": (
        "give the {obj} a different colour",
        "the {obj} should be some other colour",
        "change the {obj} to any other colour",
    ),
    "remove_one": (
        "remove one of the {plural}",
        "take away one of the {plural}",
        "get rid of any one of the {plural}",
    ),
}

# Target-state phrases: what the edited object is in the target, never how it got there. Fields as above, plus {it}:
# the edited object named by what the edit keeps ("circle at the top left" for a recolour; see ``_state_referent``).
# A removal can only be said by naming what goes, so the removals have no state templates (their texts open with an
# instruction). Index i of a kind is held out in the default config exactly when its instruction counterpart is.
STATE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "there is also {a_thing} {where}",
        "{a_thing} {where} as well",
        "with {a_thing} {where} too",
        "{where} there is {a_thing} too",
        "also {a_thing} {where}",
    ),
    "recolour": (
        "the {it} is {colour}",
        "the {it} is coloured {colour}",
        "the {it} shows up {colour}",
        "{colour} is the colour of the {it}",
        "the {it} appears {colour}",
    ),
    "reshape": (
        "the {it} is {a_shape}",
        "the {it} has the shape of {a_shape}",
        "the {it} appears as {a_shape}",
        "the {it} takes the form of {a_shape}",
        "the {it} looks like {a_shape}",
    ),
    "resize": (
        "the {it} is {size}",
        "the {it} looks {size}",
        "the {it} is drawn {size}",
        "the {it} comes out {size}",
        "the {it} appears {size}",
    ),
    "move": (
        "the {it} is {where}",
        "the {it} sits {where}",
        "the {it} is placed {where}",
        "{where} is the {it}",
        "the {it} appears {where}",
    ),
    "add_any": (
        "there is also {a_thing}",
        "{a_thing} as well",
        "somewhere there is {a_thing} too",
    ),
    "recolour_group": (
        "the {it} is a {group} colour",
        "the {it} has a {group} colour",
        "a {group} colour is on the {it}",
    ),
    "move_region": (
        "the {it} is in the {region}",
        "the {it} sits in the {region}",
        "in the {region} is the {it}",
    ),
    "reshape_any": (
        "the {it} is another shape",
        "the {it} has another shape",
        "some other shape forms the {it}",
    ),
    "recolour_any": (
        "the {it} is another colour",
        "the {it} has another colour",
        "some other colour fills the {it}",
    ),
}

SYNTHETIC_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "same picture but with {a_thing} {where}",
        "{a_thing} added {where}",
        "now also showing {a_thing} {where}",
    ),
    "remove": (
        "same picture without the {obj}",
        "the {obj} is removed",
        "everything except the {obj}",
    ),
    "recolour": (
        "same picture but the {obj} is {colour}",
        "the {obj} now in {colour}",
        "{colour} version of the {obj}",
    ),
    "reshape": (
        "same picture but the {obj} is {a_shape}",
        "the {obj} replaced by {a_shape}",
        "{a_shape} where the {obj} was",
    ),
    "resize": (
        "same picture but the {obj} is {size}",
        "the {obj} now {size}",
        "a {size} version of the {obj}",
    ),
    "move": (
        "same picture but the {obj} is {where}",
        "the {obj} moved to the {pos}",
        "the {obj} now sits {where}",
    ),
}


def benchmark_template_ids(kind: str | None = None) -> list[str]:
    """Ids ``"<kind>/<i>"`` of the benchmark templates (of one kind, or all)."""
    kinds = [kind] if kind is not None else list(BENCHMARK_TEMPLATES)
    return [f"{k}/{i}" for k in kinds for i in range(len(BENCHMARK_TEMPLATES[k]))]


def state_template_ids(kind: str | None = None) -> list[str]:
    """Ids ``"state/<kind>/<i>"`` of the target-state templates (of one kind, or all; none for the removals)."""
    kinds = [kind] if kind is not None else list(STATE_TEMPLATES)
    return [f"state/{k}/{i}" for k in kinds if k in STATE_TEMPLATES for i in range(len(STATE_TEMPLATES[k]))]


def synthetic_template_ids(kind: str | None = None) -> list[str]:
    """Ids ``"syn/<kind>/<i>"`` of the synthetic templates (of one kind, or all)."""
    kinds = [kind] if kind is not None else list(SYNTHETIC_TEMPLATES)
    return [f"syn/{k}/{i}" for k in kinds for i in range(len(SYNTHETIC_TEMPLATES[k]))]


def template_text(template_id: str) -> str:
    """The format string of a template id of any family."""
    family, rest = BENCHMARK_TEMPLATES, template_id
    for prefix, templates in (("syn/", SYNTHETIC_TEMPLATES), ("state/", STATE_TEMPLATES)):
        if template_id.startswith(prefix):
            family, rest = templates, template_id.removeprefix(prefix)
    kind, index = rest.rsplit("/", 1)
    try:
        return family[kind][int(index)]
    except (KeyError, IndexError, ValueError):
        raise KeyError(f"unknown template id {template_id!r}") from None


def template_kind(template_id: str) -> str:
    """The edit kind a template id verbalises."""
    return template_id.removeprefix("syn/").removeprefix("state/").rsplit("/", 1)[0]


# ----------------------------------------------------------------------------------------------------------------
# Referring expressions: tried from the shortest; only forms that pick out exactly one object are used.

REFERRING_FORMS: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("colour", "shape"),
    ("size", "colour", "shape"),
    ("colour", "shape", "cell"),
)


def referring_forms(scene: Scene, cell: int) -> list[tuple[str, ...]]:
    """The referring forms that describe the object in ``cell`` uniquely within ``scene``.

    The last form names the cell, so the list is never empty.
    """
    obj = scene.at(cell)
    forms = []
    for form in REFERRING_FORMS:
        matches = [o for o in scene.objects if all(getattr(o, a) == getattr(obj, a) for a in form)]
        if len(matches) == 1:
            forms.append(form)
    return forms


def referring_phrase(obj: ShapeObject, form: Sequence[str], rng: random.Random) -> str:
    """Words for ``obj`` using the attributes in ``form`` ("red circle", "big red circle", ...)."""
    words = []
    if "size" in form:
        words.append(rng.choice(SIZE_WORDS[obj.size]))
    if "colour" in form:
        words.append(obj.colour)
    words.append(obj.shape)
    if "cell" in form:
        words.append(where_phrase(obj.cell, rng))
    return " ".join(words)


def with_article(phrase: str) -> str:
    """ "orange star" -> "an orange star"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def plural(shape: str) -> str:
    """ "cross" -> "crosses", "star" -> "stars"."""
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")


def _state_referent(edit: Edit, reference: Scene, rng: random.Random) -> tuple[str, tuple[str, ...]]:
    """How a target-state phrase names the edited object, and the attributes it uses: only what the edit keeps.

    A recolour names the shape and cell, a reshape the colour and cell ("red object at the top"), a resize all but
    the size; a move cannot name the cell, so it names the colour and shape, with the size when that is needed to
    pick the object out (``state_referable`` says whether anything does).
    """
    obj = _edited(reference, edit.cell)
    where = where_phrase(obj.cell, rng)
    if edit.kind in ("recolour", "recolour_group", "recolour_any"):
        return f"{obj.shape} {where}", ("shape", "cell")
    if edit.kind in ("reshape", "reshape_any"):
        return f"{obj.colour} {rng.choice(('object', 'shape'))} {where}", ("colour", "cell")
    if edit.kind == "resize":
        return f"{obj.colour} {obj.shape} {where}", ("colour", "shape", "cell")
    form = _move_form(reference, obj) or ("size", "colour", "shape")
    return referring_phrase(obj, form, rng), form


def _move_form(reference: Scene, obj: ShapeObject) -> tuple[str, ...] | None:
    """The shortest cell-free form that picks ``obj`` out of ``reference`` (None when none does)."""
    for form in (("colour", "shape"), ("size", "colour", "shape")):
        if [o for o in reference.objects if all(getattr(o, a) == getattr(obj, a) for a in form)] == [obj]:
            return form
    return None


def state_referable(edit: Edit, reference: Scene) -> bool:
    """Whether a target-state phrase can name the edited object unambiguously (false only for a move of one of two
    identical objects: the state cannot say which one moved)."""
    if edit.kind not in ("move", "move_region"):
        return True
    return _move_form(reference, _edited(reference, edit.cell)) is not None


@dataclass(frozen=True)
class Verbalised:
    """A modification text and how it was made.

    Attributes:
        text: the modification text.
        template: the template id.
        referring: the attributes used to refer to the edited object (empty when the text names no object).
    """

    text: str
    template: str
    referring: tuple[str, ...]


def _fields(edit: Edit, reference: Scene, form: Sequence[str], rng: random.Random) -> dict[str, str]:
    """Values for every template field that ``edit`` defines."""
    values: dict[str, str] = {}
    if edit.cell is not None and edit.kind != "add":
        values["obj"] = referring_phrase(reference.at(edit.cell), form, rng)
    if edit.kind in ("add", "add_any"):
        assert edit.colour and edit.shape
        size = f"{rng.choice(SIZE_WORDS[edit.size])} " if edit.size else ""
        values["a_thing"] = with_article(f"{size}{edit.colour} {edit.shape}")
    destination = edit.cell if edit.kind == "add" else edit.to_cell
    if destination is not None:
        values["where"] = where_phrase(destination, rng)
        values["pos"] = position_word(destination, rng)
    if edit.colour is not None:
        values["colour"] = edit.colour
    if edit.shape is not None:
        values["a_shape"] = with_article(edit.shape)
    if edit.size is not None:
        values["size"] = rng.choice(SIZE_WORDS[edit.size])
        values["comparative"] = "bigger" if edit.size == "large" else "smaller"
        values["resize_verb"] = "enlarge" if edit.size == "large" else "shrink"
    if edit.group is not None:
        values["group"] = edit.group
    if edit.region is not None:
        values["region"] = edit.region
    if edit.kind == "remove_one":
        values["plural"] = (
            plural(edit.shape) if edit.shape is not None else f"{edit.colour} {rng.choice(('shapes', 'objects'))}"
        )
    return values


def verbalise(edit: Edit, reference: Scene, template_id: str, rng: random.Random) -> Verbalised:
    """Puts ``edit`` into words with one template, referring to the edited object unambiguously.

    Args:
        edit: the edit.
        reference: the scene it applies to (to choose a unique referring expression).
        template_id: a template of the edit's kind, from either family.
        rng: the random stream (referring form, synonyms).
    """
    if template_kind(template_id) != edit.kind:
        raise ValueError(f"template {template_id!r} does not verbalise {edit.kind} edits")
    # An added object is described by its attributes, not referred to; open "remove one of" names a group.
    form = rng.choice(referring_forms(reference, edit.cell)) if edit.cell is not None and edit.kind != "add" else ()
    fields = _fields(edit, reference, form, rng)
    if template_id.startswith("state/") and edit.cell is not None and edit.kind != "add":
        fields["it"], form = _state_referent(edit, reference, rng)
    text = template_text(template_id).format(**fields)
    return Verbalised(text=text, template=template_id, referring=tuple(form))


# ----------------------------------------------------------------------------------------------------------------
# Template patterns, for auditing written texts.


def _alternation(words: Iterable[str]) -> str:
    # Longest first, so "top left" wins over "top".
    return "(?:" + "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True)) + ")"


def _field_patterns() -> dict[str, str]:
    size = _alternation(w for ws in SIZE_WORDS.values() for w in ws)
    colour = _alternation(COLOURS)
    shape = _alternation(SHAPES)
    pos = _alternation(w for ws in POSITION_WORDS.values() for w in ws)
    where = f"{_alternation(PREPOSITIONS)} the {pos}"
    return {
        "obj": f"(?:{size} )?(?:{colour} )?{shape}(?: {where})?",
        "it": (
            f"(?:{shape} {where}|{colour} (?:object|shape) {where}|{colour} {shape} {where}"
            f"|(?:{size} )?{colour} {shape})"
        ),
        "a_thing": f"an? (?:{size} )?{colour} {shape}",
        "where": where,
        "pos": pos,
        "colour": colour,
        "a_shape": f"an? {shape}",
        "size": size,
        "comparative": "(?:bigger|smaller)",
        "resize_verb": "(?:enlarge|shrink)",
        "group": _alternation(COLOUR_GROUPS),
        "region": _alternation(REGIONS),
        "plural": f"(?:{_alternation(plural(s) for s in SHAPES)}|{colour} (?:shapes|objects))",
    }


def template_regex(template_id: str) -> re.Pattern[str]:
    """An anchored pattern matching exactly the texts a template can produce (fields stand for their words)."""
    fields = _field_patterns()
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template_text(template_id)):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append(fields[name])
    return re.compile("^" + "".join(parts) + "$")


def text_opening(text: str) -> str:
    """The instruction or target-state phrase a benchmark text opens with: the text up to its first comma.

    Template texts hold no comma; a ``state+alt`` text goes on after one with the target's alt-text, so this is
    what a template produced (the whole text in the ``edit`` style).
    """
    return text.split(", ", 1)[0]


class TemplateMatcher:
    """Finds which of some templates could have produced a text (patterns compiled once).

    Example:
        >>> TemplateMatcher(["recolour/0", "remove/0"]).matches("make the red circle blue")
        ['recolour/0']
    """

    def __init__(self, template_ids: Iterable[str]) -> None:
        self.patterns = {t: template_regex(t) for t in template_ids}

    def matches(self, text: str) -> list[str]:
        """The template ids whose pattern matches ``text`` (a whole text, or a benchmark text's ``text_opening``)."""
        return [t for t, pattern in self.patterns.items() if pattern.match(text)]
