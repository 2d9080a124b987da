"""The Shapes world: determinism, verifiable edit semantics, held-out hygiene and the CIRR/CIRCO file formats.

A tiny world (smaller than the quick preset) is built twice per session; every test reads the written files, so
the checks hold for what the loaders and trainers actually see.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cirlab.config import from_dict, to_dict
from cirlab.data.shapes import (
    EXACT_KINDS,
    OPEN_KINDS,
    STATE_TEMPLATES,
    BenchmarkStyle,
    CircoConfig,
    CirrConfig,
    CorpusConfig,
    Edit,
    Scene,
    SceneConfig,
    ShapesConfig,
    ShapesCorpus,
    SyntheticConfig,
    TemplateMatcher,
    benchmark_template_ids,
    build_world,
    eval_caption,
    load_world,
    render_scene,
    sample_scene,
    satisfies,
    satisfies_anywhere,
    state_template_ids,
    synthetic_template_ids,
    template_regex,
    text_opening,
    verbalise,
    world_id,
)
from cirlab.data.shapes.edits import looks, one_step_edits, referring_forms, state_referable
from cirlab.data.shapes.queries import reshoot, sample_circo_query, sample_cirr_query, satisfied
from cirlab.data.shapes.world import DEFAULT_STYLE, LEGACY_STYLE
from cirlab.registry import BENCHMARKS

CIRR_SPLITS = ("train", "val", "test1")
CIRR_KEYS = {"pairid", "reference", "target_hard", "target_soft", "caption", "img_set"}
CIRCO_KEYS = {
    "id",
    "reference_img_id",
    "relative_caption",
    "shared_concept",
    "target_img_id",
    "gt_img_ids",
    "semantic_aspects",
}


def tiny_config(seed: int = 0, style: BenchmarkStyle = DEFAULT_STYLE) -> ShapesConfig:
    """Smaller than ``ShapesConfig.quick()``: about a second to build."""
    return ShapesConfig(
        seed=seed,
        style=style,
        cirr=CirrConfig(train_queries=120, val_queries=40, test_queries=90, extra_gallery=30),
        circo=CircoConfig(val_queries=24, test_queries=60, extra_gallery=60),
        corpus=CorpusConfig(images=200),
        synthetic=SyntheticConfig(triplets=150),
    )


@pytest.fixture(scope="module", params=["reshot", "legacy"])
def world(request, tmp_path_factory):
    """The default world (re-shot targets, target-state + alt-text texts), and code version 2's style."""
    style = BenchmarkStyle() if request.param == "reshot" else LEGACY_STYLE
    return build_world(tiny_config(style=style), tmp_path_factory.mktemp("shapes") / "world")


def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def heldout_in(scene_text: str, heldout) -> bool:
    return bool(Scene.parse(scene_text).combos() & heldout)


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_builds_byte_identical_worlds(world, tmp_path):
    world_again = build_world(world.config, tmp_path / "again")  # the same config, in either style
    files = sorted(p.relative_to(world.root) for p in world.root.rglob("*") if p.is_file())
    files_again = sorted(p.relative_to(world_again.root) for p in world_again.root.rglob("*") if p.is_file())
    assert files == files_again
    for rel in files:  # annotations, metadata, PNGs and the corpus array alike
        assert (world.root / rel).read_bytes() == (world_again.root / rel).read_bytes(), rel
    assert np.array_equal(world.corpus(mmap=False).images, world_again.corpus(mmap=False).images)


def test_world_id_depends_on_config_only():
    assert world_id(tiny_config()) == world_id(tiny_config())
    assert world_id(tiny_config(seed=1)) != world_id(tiny_config())
    cfg = tiny_config()
    assert from_dict(ShapesConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_build_reuses_same_world_and_refuses_another(world, tmp_path):
    stamp = (world.root / "world.json").stat().st_mtime_ns
    again = build_world(world.config, world.root)
    assert again.world_id == world.world_id
    assert (world.root / "world.json").stat().st_mtime_ns == stamp
    assert load_world(world.root).config == world.config
    with pytest.raises(FileExistsError):
        build_world(tiny_config(seed=5), world.root)
    assert not [p for p in world.root.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_a_built_world_gets_the_umask_mode_not_a_private_one(world):
    """Built in a temporary folder and renamed into place: that folder must not keep mkdtemp's 0o700."""
    umask = os.umask(0)
    os.umask(umask)
    assert world.root.stat().st_mode & 0o777 == 0o777 & ~umask


@settings(max_examples=40, deadline=None)
@given(scene_seed=st.integers(0, 2**32 - 1), a=st.integers(0, 2**31 - 1), b=st.integers(0, 2**31 - 1))
def test_render_is_a_function_of_scene_and_seed(scene_seed, a, b):
    cfg = ShapesConfig()
    scene = sample_scene(random.Random(scene_seed), cfg.scene)
    image = render_scene(scene, a, cfg.render)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert np.array_equal(image, render_scene(scene, a, cfg.render))
    if a != b:
        assert not np.array_equal(image, render_scene(scene, b, cfg.render))


# ----------------------------------------------------------------------------------------------- edit semantics


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_exact_edits_keep_the_grid_valid(seed):
    cfg = SceneConfig()
    rng = random.Random(seed)
    scene = sample_scene(rng, cfg)
    for edit in one_step_edits(scene, cfg.shapes, cfg.colours):
        target = edit.apply(scene)  # Scene() itself rejects two objects in one cell
        assert len({o.cell for o in target.objects}) == len(target)
        assert target != scene
        assert satisfies(edit, scene, target) and not satisfies(edit, scene, scene)
        assert len(target) == len(scene) - (edit.kind == "remove")
        assert Edit.from_dict(edit.to_dict()) == edit


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(OPEN_KINDS))
def test_open_edit_targets_agree_with_the_predicate(seed, kind):
    cfg = SceneConfig()
    rng = random.Random(seed)
    query = sample_circo_query(
        rng, cfg, (), kind=kind, focus_pool=[], heldout_template=False, max_gts=4, n_distractors=2
    )
    targets = query.edit.targets(query.reference, cfg.shapes, cfg.colours)
    assert query.reference not in targets
    neighbours = {e.apply(t) for t in targets for e in one_step_edits(t, cfg.shapes, cfg.colours)}
    for scene in targets | neighbours | {query.reference}:
        assert satisfies(query.edit, query.reference, scene) == (scene in targets)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_a_reshot_target_answers_its_edit_anywhere_and_one_step_misses_do_not(seed):
    cfg = SceneConfig()
    rng = random.Random(seed)
    reference = sample_scene(rng, cfg)
    for edit in one_step_edits(reference, cfg.shapes, cfg.colours):
        target = edit.apply(reference)
        shot = reshoot(target, edit.kept_cell, rng)
        keys = edit.target_looks(reference, cfg.shapes, cfg.colours)
        assert satisfies_anywhere(edit, reference, target) and satisfies_anywhere(edit, reference, shot)
        assert looks(target.objects) in keys and looks(shot.objects) in keys
        assert not satisfies_anywhere(edit, reference, reference)
        if edit.kept_cell is not None:
            assert shot.at(edit.kept_cell) == target.at(edit.kept_cell)
            # The edited object changed once more (another colour, shape, size or cell) answers nothing.
            for miss in one_step_edits(target, cfg.shapes, cfg.colours, [edit.kept_cell]):
                wrong = miss.apply(target)
                if wrong != reference and miss.kind != "remove":
                    assert not satisfies_anywhere(edit, reference, wrong), (edit, miss)
        # Anywhere is looser than in place, never stricter.
        for other in one_step_edits(target, cfg.shapes, cfg.colours):
            near = other.apply(target)
            assert not satisfies(edit, reference, near) or satisfies_anywhere(edit, reference, near)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(OPEN_KINDS))
def test_reshot_open_ground_truths_keep_what_the_edit_made(seed, kind):
    cfg = SceneConfig()
    q = sample_circo_query(
        random.Random(seed), cfg, (), kind=kind, focus_pool=[], heldout_template=False, max_gts=4, n_distractors=2
    )
    keys = q.edit.target_looks(q.reference, cfg.shapes, cfg.colours)
    in_place = q.edit.targets(q.reference, cfg.shapes, cfg.colours)
    for target in q.targets:
        assert satisfies_anywhere(q.edit, q.reference, target) and looks(target.objects) in keys
    # Another shot of each in-place ground truth: one of them shows the same objects.
    assert all(any(looks(t.objects) == looks(target.objects) for t in in_place) for target in q.targets)
    for scene in in_place:
        assert satisfies_anywhere(q.edit, q.reference, scene)
    for scene in (q.reference, *q.distractors):
        assert not satisfies_anywhere(q.edit, q.reference, scene)
    assert q.all_targets == frozenset(q.targets)


def test_style_validation_and_state_referents():
    with pytest.raises(ValueError, match="text style"):
        BenchmarkStyle(texts="captions")
    with pytest.raises(ValueError, match="probability"):
        BenchmarkStyle(alt_full=1.5)
    twins = Scene.parse("0:small:red:circle|4:small:red:circle")
    edit = Edit("move", cell=0, to_cell=8)
    assert not state_referable(edit, twins)  # "the red circle is at the bottom right" cannot say which one
    single = Scene.parse("0:small:red:circle|4:large:red:circle")
    text = verbalise(edit, single, "state/move/0", random.Random(0)).text
    assert text.startswith("the small red circle is") or text.startswith("the little red circle is"), text


def test_every_template_matches_its_own_texts_and_heldout_ones_nothing_else():
    cfg = SceneConfig()
    rng = random.Random(0)
    heldout = set(ShapesConfig().heldout_templates)
    matcher = TemplateMatcher(benchmark_template_ids() + state_template_ids() + synthetic_template_ids())
    for kind in EXACT_KINDS + OPEN_KINDS:
        for _ in range(40):
            if kind in EXACT_KINDS:
                q = sample_cirr_query(rng, cfg, heldout, kind=kind, focus_pool=[], heldout_template=False)
            else:
                q = sample_circo_query(
                    rng, cfg, heldout, kind=kind, focus_pool=[], heldout_template=False, max_gts=2, n_distractors=0
                )
            families = benchmark_template_ids(kind) + state_template_ids(kind)
            families += synthetic_template_ids(kind) if kind in EXACT_KINDS else []
            for template in families:
                text = verbalise(q.edit, q.reference, template, rng).text
                found = matcher.matches(text)
                assert template in found, (template, text)
                if template in heldout or template.startswith("syn/"):
                    assert found == [template], (template, text, found)
                else:
                    assert not set(found) & heldout and not any(t.startswith("syn/") for t in found), (text, found)


# ------------------------------------------------------------------------------------------- held-out hygiene


def test_heldout_templates_and_combos_are_absent_from_all_training_data(world):
    heldout_combos = world.heldout_combos
    heldout_templates = TemplateMatcher(world.heldout_templates)
    combo_words = [f"{c} {s}" for c, s in heldout_combos]

    # Caption corpus: scenes and every written caption.
    for record in read_jsonl(world.corpus_dir / "captions.jsonl"):
        assert not heldout_in(record["scene"], heldout_combos)
        for text in [*record["captions"], record["eval_caption"]]:
            assert not any(w in text for w in combo_words), text

    # Synthetic triplets: scenes of every image any file points at, and texts (no benchmark template at all).
    benchmark = TemplateMatcher(benchmark_template_ids())
    for path in sorted(world.synthetic_dir.glob("triplets*.jsonl")):
        for record in read_jsonl(path):
            assert not heldout_in(record["reference_scene"], heldout_combos)
            assert not heldout_in(record["target_scene"], heldout_combos)
            assert not benchmark.matches(record["text"]), record["text"]
            assert not any(w in record["text"] for w in combo_words)

    # Benchmark train and val: every image of the gallery, every text, every flag.
    for split in ("train", "val"):
        for name, info in read(world.cirr_root / f"shapes_images.{split}.json").items():
            assert not heldout_in(info["scene"], heldout_combos), (split, name)
        for entry in read(world.cirr_root / "captions" / f"cap.rc2.{split}.json"):
            assert not heldout_templates.matches(text_opening(entry["caption"])), entry["caption"]
        for meta in read(world.cirr_root / f"shapes_meta.{split}.json").values():
            assert not meta["heldout_template"] and not meta["heldout_combo"]

    # CIRCO val: references and ground truths, texts, flags.
    images = read(world.circo_root / "shapes_images.json")
    meta = read(world.circo_root / "shapes_meta.val.json")
    for q in read(world.circo_root / "annotations" / "val.json"):
        for image_id in [q["reference_img_id"], *q["gt_img_ids"]]:
            assert not heldout_in(images[str(image_id)]["scene"], heldout_combos)
        assert not heldout_templates.matches(text_opening(q["relative_caption"]))
        assert not meta[str(q["id"])]["heldout_template"] and not meta[str(q["id"])]["heldout_combo"]


def test_test_splits_hold_flagged_heldout_queries(world):
    heldout_templates = TemplateMatcher(world.heldout_templates)
    cirr_images = read(world.cirr_root / "shapes_images.test1.json")
    cirr_meta = read(world.cirr_root / "shapes_meta.test1.json")
    for entry in read(world.cirr_root / "captions" / "cap.rc2.test1.json"):
        m = cirr_meta[str(entry["pairid"])]
        opening = text_opening(entry["caption"])
        assert bool(heldout_templates.matches(opening)) == m["heldout_template"], entry["caption"]
        scenes = [cirr_images[entry["reference"]]["scene"], cirr_images[entry["target_hard"]]["scene"]]
        assert any(heldout_in(s, world.heldout_combos) for s in scenes) == m["heldout_combo"]
    flags = [(m["heldout_template"], m["heldout_combo"]) for m in cirr_meta.values()]
    assert {(True, False), (False, True), (False, False)} <= set(flags)

    circo_images = read(world.circo_root / "shapes_images.json")
    circo_meta = read(world.circo_root / "shapes_meta.test.json")
    for q in read(world.circo_root / "annotations" / "test.json"):
        m = circo_meta[str(q["id"])]
        assert bool(heldout_templates.matches(text_opening(q["relative_caption"]))) == m["heldout_template"]
        scenes = [circo_images[str(i)]["scene"] for i in [q["reference_img_id"], *q["gt_img_ids"]]]
        assert any(heldout_in(s, world.heldout_combos) for s in scenes) == m["heldout_combo"]
    assert any(m["heldout_combo"] for m in circo_meta.values())
    assert any(m["heldout_template"] for m in circo_meta.values())


# ----------------------------------------------------------------------------------------------------- CIRR


@pytest.mark.parametrize("split", CIRR_SPLITS)
def test_cirr_split_files_follow_the_format(world, split):
    entries = read(world.cirr_root / "captions" / f"cap.rc2.{split}.json")
    paths = read(world.cirr_root / "image_splits" / f"split.rc2.{split}.json")
    assert len(entries) == getattr(world.config.cirr, f"{'test' if split == 'test1' else split}_queries")
    for name, rel in paths.items():
        assert rel.startswith("./") and rel.endswith(f"/{name}.png")
        assert (world.cirr_image_root / rel).is_file()
    for e in entries:
        assert set(e) == CIRR_KEYS and isinstance(e["pairid"], int)
        members = e["img_set"]["members"]
        assert len(members) == 6 == len(set(members))
        assert e["reference"] in members and e["target_hard"] in members and e["reference"] != e["target_hard"]
        assert all(name in paths for name in members)
        assert e["target_soft"] == {e["target_hard"]: 1.0}
        assert 0 <= e["img_set"]["reference_rank"] <= 5
        assert 0 <= e["img_set"]["target_rank"] <= 5
    scenes = [info["scene"] for info in read(world.cirr_root / f"shapes_images.{split}.json").values()]
    assert len(scenes) == len(set(scenes)) == len(paths), "every gallery image shows a different scene"
    gallery = {
        name: Scene.parse(info["scene"]) for name, info in read(world.cirr_root / f"shapes_images.{split}.json").items()
    }
    meta = read(world.cirr_root / f"shapes_meta.{split}.json")
    for e in entries:  # the target is the only correct image of the split's gallery
        m = meta[str(e["pairid"])]
        edit, reference = Edit.from_dict(m["edit"]), gallery[e["reference"]]
        answers = [n for n, scene in gallery.items() if satisfied(world.config.style, edit, reference, scene)]
        assert answers == [e["target_hard"]], (e["pairid"], answers)


def test_cirr_pairids_are_unique_across_splits(world):
    ids = [e["pairid"] for s in CIRR_SPLITS for e in read(world.cirr_root / "captions" / f"cap.rc2.{s}.json")]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("split", CIRR_SPLITS)
def test_cirr_targets_satisfy_and_distractors_do_not(world, split):
    images = read(world.cirr_root / f"shapes_images.{split}.json")
    meta = read(world.cirr_root / f"shapes_meta.{split}.json")
    for e in read(world.cirr_root / "captions" / f"cap.rc2.{split}.json"):
        m = meta[str(e["pairid"])]
        edit = Edit.from_dict(m["edit"])
        reference = Scene.parse(images[e["reference"]]["scene"])
        style = world.config.style
        target = Scene.parse(images[e["target_hard"]]["scene"])
        assert satisfied(style, edit, reference, target)
        if style.reshoot:  # another shot of the edited scene: the edited object in place, the rest anywhere
            assert satisfies_anywhere(edit, reference, edit.apply(reference))
            if edit.kept_cell is not None:
                assert target.at(edit.kept_cell) == edit.apply(reference).at(edit.kept_cell)
        else:
            assert target == edit.apply(reference)
        others = [n for n in e["img_set"]["members"] if n not in (e["reference"], e["target_hard"])]
        for name in others:
            assert not satisfied(style, edit, reference, Scene.parse(images[name]["scene"])), (e["pairid"], name)
        if m["referring"]:  # the text's description picks out exactly the edited object
            obj = reference.at(edit.cell)
            same = [o for o in reference.objects if all(getattr(o, a) == getattr(obj, a) for a in m["referring"])]
            assert same == [obj]
            if not m["template"].startswith("state/"):
                assert tuple(m["referring"]) in referring_forms(reference, edit.cell)
        assert template_regex(m["template"]).match(text_opening(e["caption"])), (m["template"], e["caption"])
        assert m["template"].startswith("state/") == (style.texts == "state+alt" and edit.kind in STATE_TEMPLATES)


def test_cirr_distractors_are_one_step_from_the_target(world):
    images = read(world.cirr_root / "shapes_images.val.json")
    cfg = world.config.scene
    meta = read(world.cirr_root / "shapes_meta.val.json")
    for e in read(world.cirr_root / "captions" / "cap.rc2.val.json"):
        # One step from the edit in place: look-alikes of the reference, also when the target is re-shot.
        reference = Scene.parse(images[e["reference"]]["scene"])
        target = Edit.from_dict(meta[str(e["pairid"])]["edit"]).apply(reference)
        near = {s.apply(target) for s in one_step_edits(target, cfg.shapes, cfg.colours)}
        for name in e["img_set"]["members"]:
            if name not in (e["reference"], e["target_hard"]):
                scene = Scene.parse(images[name]["scene"])
                # One attribute of one object changed, or one object more (a removal left half-done).
                assert scene in near or (len(scene) == len(target) + 1 and set(target.objects) < set(scene.objects))


# ---------------------------------------------------------------------------------------------------- CIRCO


@pytest.mark.parametrize("split", ["val", "test"])
def test_circo_files_follow_the_format_and_ground_truth_is_exact(world, split):
    queries = read(world.circo_root / "annotations" / f"{split}.json")
    info = read(world.circo_root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")
    images = read(world.circo_root / "shapes_images.json")
    meta = read(world.circo_root / f"shapes_meta.{split}.json")
    gallery = {entry["id"]: Scene.parse(images[str(entry["id"])]["scene"]) for entry in info["images"]}
    for entry in info["images"]:
        assert re.fullmatch(r"\d{12}\.png", entry["file_name"]) and int(entry["file_name"][:12]) == entry["id"]
        assert (world.circo_root / "COCO2017_unlabeled" / "unlabeled2017" / entry["file_name"]).is_file()
    assert len(queries) == getattr(world.config.circo, f"{split}_queries")
    several = 0
    for position, q in enumerate(queries):
        assert set(q) == CIRCO_KEYS and q["id"] == position
        assert q["target_img_id"] == q["gt_img_ids"][0] and len(set(q["gt_img_ids"])) == len(q["gt_img_ids"])
        assert q["reference_img_id"] not in q["gt_img_ids"]
        m = meta[str(q["id"])]
        assert {"heldout_template", "heldout_combo"} <= set(m)
        edit, reference = Edit.from_dict(m["edit"]), gallery[q["reference_img_id"]]
        satisfying = {i for i, scene in gallery.items() if satisfied(world.config.style, edit, reference, scene)}
        assert satisfying == set(q["gt_img_ids"]), q  # every ground truth satisfies it, and only those
        assert q["semantic_aspects"] == [m["edit_type"]]
        several += len(q["gt_img_ids"]) > 1
    assert several >= len(queries) // 2


# ---------------------------------------------------------------------------------- corpus, synthetic, loader


def test_caption_corpus_gives_fresh_phrasings(world):
    corpus = world.corpus()
    assert isinstance(corpus, ShapesCorpus) and len(corpus) == world.config.corpus.images
    assert corpus.images.shape == (len(corpus), 64, 64, 3) and corpus.images.dtype == np.uint8
    stream = corpus.pairs(random.Random(0))
    pairs = [next(stream) for _ in range(50)]
    assert all(image.shape == (64, 64, 3) for image, _ in pairs)
    rng = random.Random(1)
    busy = max(range(len(corpus)), key=lambda i: len(corpus.scenes[i]))
    assert len({corpus.caption(busy, rng) for _ in range(20)}) > 5
    assert corpus.eval_caption(busy) == eval_caption(corpus.scenes[busy])
    cells = [int(c) for c in re.findall(r"(\d):", corpus.scenes[busy].to_str())]
    assert cells == sorted(cells)


def test_synthetic_corruption_is_nested_and_sized(world):
    clean = read_jsonl(world.synthetic_triplets())
    at20 = read_jsonl(world.synthetic_triplets(0.2))
    at40 = read_jsonl(world.synthetic_triplets(0.4))
    assert not any(r["corrupted"] for r in clean)
    bad20 = {r["id"] for r in at20 if r["corrupted"]}
    bad40 = {r["id"] for r in at40 if r["corrupted"]}
    assert bad20 <= bad40 and 0.05 < len(bad20) / len(at20) < 0.35 and 0.25 < len(bad40) / len(at40) < 0.55
    for clean_record, noisy in zip(clean, at40, strict=True):
        assert (clean_record["target_scene"] != noisy["target_scene"]) == noisy["corrupted"]
        assert (world.synthetic_dir / noisy["target"]).is_file()
    templates = TemplateMatcher(synthetic_template_ids())
    assert all(templates.matches(r["text"]) == [r["template"]] for r in clean)


@pytest.mark.parametrize("split", ["train", "val", "test1", "circo-val", "circo-test"])
def test_registered_loader_reads_every_split(world, split):
    split_data = BENCHMARKS.get("shapes")(world.root, split=split, check_images=True)
    assert split_data.queries and split_data.gallery
    assert all({"heldout_template", "heldout_combo", "edit_type"} <= set(q.extra) for q in split_data.queries)


def test_quick_preset_and_config_validation():
    quick = ShapesConfig.quick()
    assert quick.corpus.images < ShapesConfig().corpus.images
    with pytest.raises(ValueError):
        SceneConfig(heldout_combos=("purple hexagon",))
    with pytest.raises(ValueError):
        SceneConfig(min_objects=3, max_objects=3)
    assert dataclasses.replace(quick, seed=3).seed == 3
