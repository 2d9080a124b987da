"""Sampling benchmark queries: a reference scene, an edit, its words, the ground truths and hard distractors.

CIRR-style queries use exact edits: one target, and distractors one step away from the target (the edited object
with the wrong colour, shape, size or position; for a removal, the removed object back but changed; then one-step
changes of the other objects). CIRCO-style queries use open edits: several rendered ground truths and near misses.

Held-out combinations: every object is drawn from the seen (colour, shape) pairs, except that a query with a
*focus* combination is built around it (the added, recoloured, reshaped, resized, moved or removed object is that
combination before or after the edit). Only queries with a focus may contain a held-out combination.

The ``BenchmarkStyle`` decides the rest: with ``reshoot`` every ground truth is shot again with the untouched
objects in other cells (``reshoot``), and no hard negative satisfies the edit anywhere; with ``state+alt`` texts the
text is a target-state phrase followed by an alt-text caption of the main target.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from cirlab.data.shapes.alttext import AltTextConfig, alt_caption
from cirlab.data.shapes.captions import (
    COUNT_WORDS,
    join_phrases,
    object_fact,
    object_phrase,
    size_word,
    where_phrase,
)
from cirlab.data.shapes.edits import (
    COLOUR_GROUPS,
    EXACT_KINDS,
    REGIONS,
    STATE_TEMPLATES,
    Edit,
    Verbalised,
    benchmark_template_ids,
    one_step_edits,
    plural,
    state_referable,
    state_template_ids,
    verbalise,
)
from cirlab.data.shapes.world import (
    DEFAULT_STYLE,
    N_CELLS,
    SIZES,
    BenchmarkStyle,
    Combo,
    Scene,
    SceneConfig,
    ShapeObject,
    combo_filter,
    sample_objects,
    scene_ok,
)

_MAX_ATTEMPTS = 200


@dataclass(frozen=True)
class ShapesQuery:
    """One benchmark query.

    Attributes:
        reference: the reference scene.
        edit: the edit.
        verbalised: the modification text, its template and referring form.
        targets: rendered ground truths; ``targets[0]`` is the target the text was written for.
        distractors: hard negatives that do not satisfy the edit.
        all_targets: every scene of the world that satisfies the edit (one for exact edits).
        heldout_template: whether the text comes from a held-out template.
        heldout_combo: whether the query is built around a held-out combination.
    """

    reference: Scene
    edit: Edit
    verbalised: Verbalised
    targets: tuple[Scene, ...]
    distractors: tuple[Scene, ...]
    all_targets: frozenset[Scene]
    heldout_template: bool
    heldout_combo: bool


def choose_template(
    rng: random.Random, kind: str, heldout_ids: Collection[str], heldout: bool, state: bool = False
) -> str:
    """A random benchmark template of ``kind``, from the held-out ones or from the others.

    With ``state``, a target-state template where the kind has any (the removals do not: they keep instructions).
    """
    family = state_template_ids(kind) if state and kind in STATE_TEMPLATES else benchmark_template_ids(kind)
    pool = [t for t in family if (t in heldout_ids) == heldout]
    if not pool:
        which = "held-out" if heldout else "non-held-out"
        raise ValueError(f"no {which} template for {kind!r} edits among {family}; check heldout_templates")
    return rng.choice(pool)


def changed_cell(reference: Scene, target: Scene) -> int | None:
    """The cell of the one object an edit made or changed in ``target`` (None after a removal)."""
    made = set(target.objects) - set(reference.objects)
    return next(iter(made)).cell if len(made) == 1 else None


def reshoot(scene: Scene, cell: int | None, rng: random.Random) -> Scene:
    """``scene`` shot again: every object but the one in ``cell`` moved to random other cells (a new layout).

    The object in ``cell`` stays (none does when ``cell`` is None). Tries a few layouts for one that differs from
    ``scene``; a scene whose objects cannot move (none besides the kept one) comes back as it is.
    """
    keep = [scene.at(cell)] if cell is not None and cell in scene.cells else []
    others = [o for o in scene.objects if not keep or o.cell != cell]
    free = [c for c in range(N_CELLS) if c != cell]
    new = scene
    for _ in range(20):
        cells = rng.sample(free, len(others))
        new = Scene((*keep, *(o.replace(cell=c) for o, c in zip(others, cells, strict=True))))
        if new != scene:
            break
    return new


def satisfied(style: BenchmarkStyle, edit: Edit, reference: Scene, candidate: Scene) -> bool:
    """The ground truth of a world of ``style``: ``satisfied_anywhere`` when it re-shoots, else ``satisfied_by``."""
    if style.reshoot:
        return edit.satisfied_anywhere(reference, candidate)
    return edit.satisfied_by(reference, candidate)


def _seen(cfg: SceneConfig) -> Callable[[Combo], bool]:
    return combo_filter(cfg.heldout)


def _edited_before(rng: random.Random, cfg: SceneConfig, kind: str, focus: Combo | None) -> ShapeObject | None:
    """The edited object before the edit (in cell 0 for now), chosen so the edit can reach ``focus``.

    None when the vocabulary leaves no such object (e.g. every other colour of the focus shape is held out).
    """
    seen = _seen(cfg)
    if focus is None or kind in ("remove", "resize", "move", "move_region", "remove_one"):
        colour, shape = focus if focus is not None else rng.choice(cfg.seen_combos())
    elif kind in ("recolour", "recolour_group", "recolour_any"):
        shape = focus[1]
        colours = [c for c in cfg.colours if c != focus[0] and seen((c, shape))]
        if not colours:
            return None
        colour = rng.choice(colours)
    else:  # reshape, reshape_any: keep the focus colour, change towards the focus shape
        colour = focus[0]
        shapes = [s for s in cfg.shapes if s != focus[1] and seen((colour, s))]
        if not shapes:
            return None
        shape = rng.choice(shapes)
    return ShapeObject(cell=0, shape=shape, colour=colour, size=rng.choice(SIZES))


def _exact_edit(
    rng: random.Random, cfg: SceneConfig, kind: str, obj: ShapeObject, free: list[int], focus: Combo | None
) -> Edit | None:
    """An exact edit of ``obj`` towards ``focus`` (or towards a seen combination); None when there is none."""
    seen = _seen(cfg)
    if kind == "remove":
        return Edit("remove", cell=obj.cell)
    if kind == "resize":
        return Edit("resize", cell=obj.cell, size="small" if obj.size == "large" else "large")
    if kind == "move":
        return Edit("move", cell=obj.cell, to_cell=rng.choice(free))
    if kind == "recolour":
        colours = [c for c in cfg.colours if c != obj.colour and seen((c, obj.shape))]
        if focus is None and not colours:
            return None
        return Edit("recolour", cell=obj.cell, colour=focus[0] if focus else rng.choice(colours))
    shapes = [s for s in cfg.shapes if s != obj.shape and seen((obj.colour, s))]
    if focus is None and not shapes:
        return None
    return Edit("reshape", cell=obj.cell, shape=focus[1] if focus else rng.choice(shapes))


def _open_edit(rng: random.Random, cfg: SceneConfig, kind: str, obj: ShapeObject, focus: Combo | None) -> Edit | None:
    """An open edit of ``obj`` (None when this object admits none, e.g. no region to move to)."""
    if kind == "recolour_group":
        groups = [g for g, cs in COLOUR_GROUPS.items() if obj.colour not in cs and (focus is None or focus[0] in cs)]
        return Edit("recolour_group", cell=obj.cell, group=rng.choice(groups)) if groups else None
    if kind == "move_region":
        regions = [r for r, cells in REGIONS.items() if obj.cell not in cells]
        return Edit("move_region", cell=obj.cell, region=rng.choice(regions)) if regions else None
    return Edit(kind, cell=obj.cell)


def _sample_edit(rng: random.Random, cfg: SceneConfig, kind: str, focus: Combo | None) -> tuple[Scene, Edit] | None:
    """One attempt at a (reference, edit) pair of ``kind``; None when the attempt is not valid."""
    seen = _seen(cfg)
    lo, hi = cfg.min_objects, cfg.max_objects
    if kind in ("add", "add_any"):
        reference = Scene(tuple(sample_objects(rng, cfg, rng.randint(lo, hi - 1), range(N_CELLS), seen)))
        colour, shape = focus if focus is not None else rng.choice(cfg.seen_combos())
        if kind == "add_any":
            return reference, Edit("add_any", shape=shape, colour=colour)
        cell = rng.choice(reference.free_cells())
        return reference, Edit("add", cell=cell, shape=shape, colour=colour, size=rng.choice(SIZES))
    if kind == "remove_one":
        return _sample_remove_one(rng, cfg, focus)
    n = rng.randint(max(lo + 1, 2), hi) if kind == "remove" else rng.randint(lo, hi)
    cells = rng.sample(range(N_CELLS), n)
    before = _edited_before(rng, cfg, kind, focus)
    if before is None:
        return None
    obj = before.replace(cell=cells[0])
    reference = Scene((obj, *sample_objects(rng, cfg, n - 1, cells[1:], seen)))
    if kind in EXACT_KINDS:
        edit = _exact_edit(rng, cfg, kind, obj, reference.free_cells(), focus)
    else:
        edit = _open_edit(rng, cfg, kind, obj, focus)
    return (reference, edit) if edit is not None else None


def _sample_remove_one(rng: random.Random, cfg: SceneConfig, focus: Combo | None) -> tuple[Scene, Edit]:
    """A reference with 2+ objects sharing a shape (or a colour), and "remove one of them"."""
    seen = _seen(cfg)
    by_shape = rng.random() < 0.5
    colour, shape = focus if focus is not None else rng.choice(cfg.seen_combos())
    n_match = rng.randint(2, cfg.max_objects)
    n_total = rng.randint(n_match, cfg.max_objects)
    cells = rng.sample(range(N_CELLS), n_total)
    objs = [ShapeObject(cells[0], shape, colour, rng.choice(SIZES))]
    for cell in cells[1:n_match]:
        if by_shape:
            options = [c for c in cfg.colours if seen((c, shape))]
            objs.append(ShapeObject(cell, shape, rng.choice(options), rng.choice(SIZES)))
        else:
            options = [s for s in cfg.shapes if seen((colour, s))]
            objs.append(ShapeObject(cell, rng.choice(options), colour, rng.choice(SIZES)))

    def unselected(combo: Combo) -> bool:
        # The remaining objects stay out of the selection, so exactly ``n_match`` objects can be removed.
        return seen(combo) and (combo[1] != shape if by_shape else combo[0] != colour)

    objs += sample_objects(rng, cfg, n_total - n_match, cells[n_match:], unselected)
    edit = Edit("remove_one", shape=shape) if by_shape else Edit("remove_one", colour=colour)
    return Scene(tuple(objs)), edit


def _policy_ok(cfg: SceneConfig, reference: Scene, targets: Collection[Scene], focus: Combo | None) -> bool:
    """Held-out combinations appear only as the focus, and the focus does appear."""
    ok = combo_filter(cfg.heldout, [focus] if focus is not None else [])
    scenes = [reference, *targets]
    if not all(scene_ok(s, ok) for s in scenes):
        return False
    if any(not cfg.min_objects <= len(s) <= cfg.max_objects for s in scenes):
        return False
    return focus is None or any(focus in s.combos() for s in scenes)


def _neighbours(target: Scene, cfg: SceneConfig, cells: Collection[int] | None = None) -> list[tuple[str, Scene]]:
    """(edit kind, scene) for every scene one step from ``target`` that changes an object in ``cells``."""
    return [(e.kind, e.apply(target)) for e in one_step_edits(target, cfg.shapes, cfg.colours, cells)]


def _changed_cells(reference: Scene, target: Scene) -> set[int]:
    """Cells of target objects that the edit created or changed."""
    return {o.cell for o in set(target.objects) - set(reference.objects)}


def _removal_variants(reference: Scene, target: Scene, cfg: SceneConfig) -> list[tuple[str, Scene]]:
    """For a removal: the removed object kept but changed in one attribute (a "half-done" edit)."""
    (gone,) = set(reference.objects) - set(target.objects)
    variants = [("recolour", gone.replace(colour=c)) for c in cfg.colours if c != gone.colour]
    variants += [("reshape", gone.replace(shape=s)) for s in cfg.shapes if s != gone.shape]
    variants.append(("resize", gone.replace(size="small" if gone.size == "large" else "large")))
    variants += [("move", gone.replace(cell=c)) for c in target.free_cells() if c != gone.cell]
    return [(kind, target.with_object(v)) for kind, v in variants]


def choose_distractors(
    rng: random.Random,
    cfg: SceneConfig,
    reference: Scene,
    edit: Edit,
    target: Scene,
    n: int,
    combo_ok: Callable[[Combo], bool],
    style: BenchmarkStyle = DEFAULT_STYLE,
) -> list[Scene]:
    """``n`` hard negatives one step away from ``target`` (the edit in place), none satisfying ``edit``.

    The edited object's wrong variants come first, one per attribute (colour, shape, size, position), then
    one-step changes of the other objects. In a re-shooting ``style`` no negative satisfies the edit anywhere (a
    move of an untouched object would), and they keep the reference's layout: look-alikes, as CIRR's are.

    Raises:
        RuntimeError: when fewer than ``n`` valid candidates exist.
    """

    def valid(s: Scene) -> bool:
        return (
            s != reference
            and s not in chosen
            and cfg.min_objects <= len(s) <= cfg.max_objects
            and scene_ok(s, combo_ok)
            and not satisfied(style, edit, reference, s)
        )

    changed = _changed_cells(reference, target)
    primary = _neighbours(target, cfg, changed) if changed else _removal_variants(reference, target, cfg)
    rng.shuffle(primary)
    chosen: list[Scene] = []
    used_kinds: set[str] = set()
    for kind, s in primary:  # one per attribute first
        if len(chosen) < n and kind not in used_kinds and valid(s):
            chosen.append(s)
            used_kinds.add(kind)
    for _, s in primary:
        if len(chosen) < n and valid(s):
            chosen.append(s)
    if len(chosen) < n:
        others = _neighbours(target, cfg, target.cells - changed)
        rng.shuffle(others)
        for _, s in others:
            if len(chosen) < n and valid(s):
                chosen.append(s)
    if len(chosen) < n:
        raise RuntimeError(f"only {len(chosen)} distractors for {reference.to_str()} -> {target.to_str()}")
    return chosen


# (targets, distractors, every scene satisfying the edit) of one sampled edit, or None to draw again.
_Outcome = tuple[tuple[Scene, ...], list[Scene], frozenset[Scene]]


def sample_cirr_query(
    rng: random.Random,
    cfg: SceneConfig,
    heldout_templates: Collection[str],
    *,
    kind: str,
    focus_pool: Sequence[Combo],
    heldout_template: bool,
    n_distractors: int = 4,
    style: BenchmarkStyle = DEFAULT_STYLE,
) -> ShapesQuery:
    """A CIRR-style query: exact edit, one target, ``n_distractors`` hard negatives.

    Args:
        rng: the random stream.
        cfg: vocabulary and scene distribution.
        heldout_templates: ids of the held-out benchmark templates.
        kind: one of the exact edit kinds.
        focus_pool: held-out combinations to build the query around (one is drawn); empty for a seen query.
        heldout_template: verbalise with a held-out template.
        n_distractors: hard negatives (4 makes a 6-image set with the reference and the target).
        style: how the target is shot and the text worded.
    """

    def targets_and_distractors(reference: Scene, edit: Edit, focus: Combo | None) -> _Outcome | None:
        target = edit.apply(reference)
        if not _policy_ok(cfg, reference, [target], focus):
            return None
        combo_ok = combo_filter(cfg.heldout, target.combos())
        distractors = choose_distractors(rng, cfg, reference, edit, target, n_distractors, combo_ok, style)
        if style.reshoot:
            target = reshoot(target, edit.kept_cell, rng)
        return (target,), distractors, frozenset({target})

    return _sample_query(
        rng, cfg, heldout_templates, kind, focus_pool, heldout_template, targets_and_distractors, style
    )


def sample_circo_query(
    rng: random.Random,
    cfg: SceneConfig,
    heldout_templates: Collection[str],
    *,
    kind: str,
    focus_pool: Sequence[Combo],
    heldout_template: bool,
    max_gts: int,
    n_distractors: int,
    forbidden: Collection[Scene] = frozenset(),
    style: BenchmarkStyle = DEFAULT_STYLE,
) -> ShapesQuery:
    """A CIRCO-style query: open edit, 1 to ``max_gts`` rendered ground truths (mostly several), near misses.

    An open edit may be satisfied by scenes with held-out combinations even when the query is seen ("give the
    circle a different colour"); such scenes are never rendered for a seen query, and the builder passes them as
    ``forbidden`` to the held-out queries so that no gallery image makes them a ground truth.

    Args:
        rng: the random stream.
        cfg: vocabulary and scene distribution.
        heldout_templates: ids of the held-out benchmark templates.
        kind: one of the open edit kinds.
        focus_pool: held-out combinations to build the query around (one is drawn); empty for a seen query.
        heldout_template: verbalise with a held-out template.
        max_gts: most ground truths to render.
        n_distractors: near misses to render.
        forbidden: scenes this query must not render.
        style: how the ground truths are shot and the text worded; re-shot ground truths leave ``all_targets`` as
            the rendered ones (the builder keeps the other scenes satisfying the edit anywhere out of the gallery).
    """

    def targets_and_distractors(reference: Scene, edit: Edit, focus: Combo | None) -> _Outcome | None:
        all_targets = edit.targets(reference, cfg.shapes, cfg.colours)
        ok = combo_filter(cfg.heldout, [focus] if focus is not None else [])
        pool = sorted((t for t in all_targets if t not in forbidden and scene_ok(t, ok)), key=Scene.to_str)
        if not pool or reference in forbidden or not _policy_ok(cfg, reference, pool, focus):
            return None
        rng.shuffle(pool)
        if focus is not None:
            pool.sort(key=lambda s, f=focus: f not in s.combos())  # stable: focus-showing targets first
        k = rng.randint(min(2, len(pool)), min(max_gts, len(pool)))
        targets = pool[:k]
        distractors = _circo_distractors(rng, cfg, reference, edit, targets, n_distractors, ok, forbidden, style)
        if style.reshoot:
            targets = [reshoot(t, changed_cell(reference, t), rng) for t in targets]
            all_targets = frozenset(targets)
        return tuple(targets), distractors, all_targets

    return _sample_query(
        rng, cfg, heldout_templates, kind, focus_pool, heldout_template, targets_and_distractors, style
    )


def _sample_query(
    rng: random.Random,
    cfg: SceneConfig,
    heldout_templates: Collection[str],
    kind: str,
    focus_pool: Sequence[Combo],
    heldout_template: bool,
    targets_and_distractors: Callable[[Scene, Edit, Combo | None], _Outcome | None],
    style: BenchmarkStyle,
) -> ShapesQuery:
    """Draws (focus, reference, edit) until ``targets_and_distractors`` accepts one, then words it.

    The two benchmark formats share this loop and differ only in how targets and distractors are chosen; the order of
    random draws (edit, targets, distractors, template, phrasing, alt-text) is the same for both.
    """
    state = style.texts == "state+alt"
    for _ in range(_MAX_ATTEMPTS):
        focus = rng.choice(focus_pool) if focus_pool else None
        pair = _sample_edit(rng, cfg, kind, focus)
        if pair is None:
            continue
        reference, edit = pair
        if state and not state_referable(edit, reference):
            continue
        outcome = targets_and_distractors(reference, edit, focus)
        if outcome is None:
            continue
        targets, distractors, all_targets = outcome
        template = choose_template(rng, kind, heldout_templates, heldout_template, state)
        verbalised = verbalise(edit, reference, template, rng)
        if state:
            alt = alt_caption(targets[0], rng, AltTextConfig(full=style.alt_full))[0]
            verbalised = Verbalised(f"{verbalised.text}, {alt}", verbalised.template, verbalised.referring)
        return ShapesQuery(
            reference=reference,
            edit=edit,
            verbalised=verbalised,
            targets=targets,
            distractors=tuple(distractors),
            all_targets=all_targets,
            heldout_template=heldout_template,
            heldout_combo=focus is not None,
        )
    raise RuntimeError(f"could not sample a {kind} query (focus pool {focus_pool}) in {_MAX_ATTEMPTS} attempts")


def _circo_distractors(
    rng: random.Random,
    cfg: SceneConfig,
    reference: Scene,
    edit: Edit,
    targets: list[Scene],
    n: int,
    combo_ok: Callable[[Combo], bool],
    forbidden: Collection[Scene],
    style: BenchmarkStyle,
) -> list[Scene]:
    """Near misses: one step from a random ground truth (in place), touching what the edit changed when possible."""
    chosen: list[Scene] = []
    for _ in range(n):
        target = rng.choice(targets)
        changed = _changed_cells(reference, target)
        near = _neighbours(target, cfg, changed or None)
        candidates = [
            s
            for _, s in near
            if s != reference
            and s not in chosen
            and s not in forbidden
            and cfg.min_objects <= len(s) <= cfg.max_objects
            and scene_ok(s, combo_ok)
            and not satisfied(style, edit, reference, s)
        ]
        if candidates:
            chosen.append(rng.choice(candidates))
    return chosen


def shared_concept(reference: Scene, edit: Edit, anywhere: bool = False) -> str:
    """What the reference and every ground truth of an open edit have in common (CIRCO's ``shared_concept``).

    With ``anywhere`` (re-shot ground truths) the untouched objects are named without their cells, which the ground
    truths do not share.

    Example:
        "a large circle at the top left and a small blue square at the center" for "make the red circle a cool
        colour" on a scene with a large red circle at the top left and a small blue square at the center.
    """

    def fact(o: ShapeObject) -> str:
        return f"a {object_phrase(o)}" if anywhere else object_fact(o)

    if edit.kind == "add_any":
        return join_phrases([fact(o) for o in reference.objects])
    if edit.kind == "remove_one":
        kept = [o for o in reference.objects if not edit.selects(o)]
        left = len(reference) - len(kept) - 1
        noun = edit.shape if edit.shape is not None else f"{edit.colour} shape"
        group = f"{COUNT_WORDS[left]} {noun if left == 1 else plural(noun)}"
        return join_phrases([fact(o) for o in kept] + [group])
    assert edit.cell is not None
    obj = reference.at(edit.cell)
    size = size_word(obj.size)
    if edit.kind == "move_region":
        partial = f"a {size} {obj.colour} {obj.shape}"
    elif edit.kind == "reshape_any":
        partial = f"a {size} {obj.colour} shape {where_phrase(obj.cell)}"
    else:
        partial = f"a {size} {obj.shape} {where_phrase(obj.cell)}"
    return join_phrases([partial] + [fact(o) for o in reference.objects if o.cell != obj.cell])
