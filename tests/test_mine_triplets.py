"""Caption-mined triplets: which caption pairs make triplets, the templates, determinism, resuming, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _corpora import write_image_folder, write_shards
from cirlab.cli.main import main
from cirlab.data import mining
from cirlab.data.corpora import TripletCorpus
from cirlab.data.mining import Caption, MiningOptions, mine_triplets

CAPTIONS = [
    Caption("i0", "a red car"),
    Caption("i1", "a blue car"),  # colour substitution with i0
    Caption("i2", "a red bus"),  # object substitution with i0
    Caption("i3", "two dogs on grass"),
    Caption("i4", "three dogs on grass"),  # count substitution with i3
    Caption("i5", "a red car parked"),  # i0 plus one word: add / remove
    Caption("i6", "the red car"),  # differs from i0 only by a stop word: no triplet
    Caption("i8", "a yellow boat"),
    Caption("i8", "a white boat"),  # two captions of one image: never paired
]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_edit_pairs_become_triplets_both_ways(tmp_path):
    report = mine_triplets(CAPTIONS, tmp_path / "t.jsonl", MiningOptions(partitions=4))
    records = _read(tmp_path / "t.jsonl")
    edits = {(r["reference"], r["target"]): r for r in records}
    assert edits[("i0", "i1")]["edit"] == {"type": "colour", "from": "red", "to": "blue"}
    assert edits[("i1", "i0")]["edit"] == {"type": "colour", "from": "blue", "to": "red"}
    assert edits[("i0", "i2")]["edit"]["type"] == "object"
    assert edits[("i3", "i4")]["edit"] == {"type": "count", "from": "two", "to": "three"}
    assert edits[("i0", "i5")]["edit"] == {"type": "add", "word": "parked"}
    assert edits[("i5", "i0")]["edit"] == {"type": "remove", "word": "parked"}
    assert not any("i6" in pair for pair in edits), "a stop-word difference is no edit"
    assert all(r["reference"] != r["target"] for r in records)
    assert "blue" in edits[("i0", "i1")]["text"] and "red" in edits[("i1", "i0")]["text"]
    assert "parked" in edits[("i0", "i5")]["text"]
    assert report["by_edit_type"] == {"colour": 2, "count": 2, "object": 2, "add": 1, "remove": 1}
    assert report["triplets"] == len(records)
    assert json.loads((tmp_path / "t.jsonl.report.json").read_text()) == report
    assert not (tmp_path / "t.jsonl.work").exists()


def test_deterministic_and_edit_types_selectable(tmp_path):
    mine_triplets(CAPTIONS, tmp_path / "a.jsonl", MiningOptions(partitions=3))
    mine_triplets(CAPTIONS, tmp_path / "b.jsonl", MiningOptions(partitions=3))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    only = mine_triplets(CAPTIONS, tmp_path / "c.jsonl", MiningOptions(partitions=3, edit_types=["colour"]))
    assert only["by_edit_type"] == {"colour": 2}
    assert {r["edit"]["type"] for r in _read(tmp_path / "c.jsonl")} == {"colour"}


def test_popular_keys_are_capped(tmp_path):
    many = [Caption(f"i{i}", f"a {c} car") for i, c in enumerate(["red", "blue", "green", "pink", "black", "white"])]
    report = mine_triplets(many, tmp_path / "t.jsonl", MiningOptions(partitions=2, max_pairs_per_key=3))
    assert report["triplets"] == 2 * 3


def test_an_interrupted_run_resumes_with_the_same_output(tmp_path, monkeypatch):
    options = MiningOptions(partitions=5)
    groups: list[int] = []
    pairs = mining._pairs

    def counting_pairs(group, cap):
        groups.append(1)
        return pairs(group, cap)

    monkeypatch.setattr(mining, "_pairs", counting_pairs)
    mine_triplets(CAPTIONS, tmp_path / "full.jsonl", options)
    every = len(groups)

    class Interrupt(Exception):
        pass

    def stop_after_two(phase: str, done: int, total: int | None) -> None:
        if phase == "pairing" and done == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        mine_triplets(CAPTIONS, tmp_path / "t.jsonl", options, progress=stop_after_two)
    work = tmp_path / "t.jsonl.work"
    done = sorted((work / "results").glob("*.jsonl"))
    assert len(done) == 2 and not (tmp_path / "t.jsonl").exists()
    groups.clear()
    phases: list[str] = []
    mine_triplets(CAPTIONS, tmp_path / "t.jsonl", options, progress=lambda phase, d, t: phases.append(phase))
    assert "indexing captions" not in phases, "pass 1 is not redone"
    assert 0 < len(groups) < every, "finished partitions are not paired again"
    assert (tmp_path / "t.jsonl").read_bytes() == (tmp_path / "full.jsonl").read_bytes()


def test_cli_on_an_image_folder_writes_loadable_triplets(tmp_path, capsys):
    write_image_folder(tmp_path / "imgs", n=12)
    out = tmp_path / "out" / "triplets.jsonl"
    assert main(["mine-triplets", str(tmp_path / "imgs"), "--out", str(out), "--partitions", "4"]) == 0
    printed = capsys.readouterr().out
    assert "colour" in printed and "triplets" in printed
    corpus = TripletCorpus(out)  # paths relative to the JSONL's folder
    assert len(corpus) > 0
    assert all(Path(r.reference).is_file() and Path(r.target).is_file() for r in corpus.records)


def test_cli_on_shards_names_images_by_key(tmp_path):
    pattern, keys = write_shards(tmp_path / "wds", 2, 4)
    out = tmp_path / "t.jsonl"
    assert main(["mine-triplets", pattern, "--out", str(out), "--partitions", "2", "--edit-type", "colour"]) == 0
    records = _read(out)
    assert records and {r["reference"] for r in records} <= set(keys)
    assert main(["mine-triplets", pattern, "--out", str(out), "--edit-type", "shape"]) != 0
