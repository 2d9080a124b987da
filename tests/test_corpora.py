"""Corpus readers (image folder, webdataset shards, captions, triplet JSONL), the exactly-once split across
processes x DataLoader workers, corrupt-sample accounting, and every method trained from these corpora."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch

import cirlab.data.corpora.imagefolder as imagefolder_module
from _corpora import (
    caption_of,
    data_overrides,
    every_method_worker,
    few_steps_config,
    two_process_worker,
    write_captions,
    write_corpora,
    write_image_folder,
    write_shards,
    write_triplets,
)
from cirlab.data import BENCHMARKS, CORPORA
from cirlab.data.corpora import (
    CaptionCorpus,
    ImageFolderCorpus,
    ShardContext,
    SkipCounter,
    TripletCorpus,
    WebDatasetCorpus,
    expand_braces,
    read_records,
)
from cirlab.features.cache import FeatureCache
from cirlab.features.corpus import INDEX_DIR, encode_corpus, index_corpus
from cirlab.methods import METHODS, create_method
from cirlab.methods.base import DataRequest
from cirlab.training.corpus_source import CorpusSource
from cirlab.training.run import fit
from cirlab.training.run_config import DataOptions


def test_registered_as_datasets():
    assert {"imagefolder", "webdataset", "captions", "triplet-jsonl"} <= set(CORPORA.list())
    assert not set(CORPORA.list()) & set(BENCHMARKS.list())


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("/d/{000..002}.tar") == ["/d/000.tar", "/d/001.tar", "/d/002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    with pytest.raises(ValueError, match="empty range"):
        expand_braces("{5..1}.tar")


# ------------------------------------------------------------------------------------------------ exactly once
def _all_parts(corpus, world_size: int, workers: int) -> list[list[str]]:
    parts = []
    for rank in range(world_size):
        for worker in range(workers):
            parts.append([s.name for s in corpus.samples(ShardContext(rank, world_size, worker, workers))])
    return parts


@pytest.mark.parametrize(("shards", "per_shard"), [(5, 3), (3, 4), (1, 7)])
def test_webdataset_every_sample_once_across_2_ranks_x_2_workers(tmp_path, shards, per_shard):
    """5 shards: whole shards per reader; 3 or 1 shard(s) for 4 readers: the sample-level split."""
    pattern, keys = write_shards(tmp_path, shards, per_shard)
    parts = _all_parts(WebDatasetCorpus(pattern), 2, 2)
    flat = [name for part in parts for name in part]
    assert sorted(flat) == sorted(keys), "every sample exactly once"
    assert all(parts), "every reader got work"


@pytest.mark.parametrize("unit", [3, 4096])
def test_image_folder_every_image_once_across_2_ranks_x_2_workers(tmp_path, monkeypatch, unit):
    monkeypatch.setattr(imagefolder_module, "FOLDER_UNIT", unit)
    names = write_image_folder(tmp_path / "imgs", n=13)
    flat = [n for part in _all_parts(ImageFolderCorpus(tmp_path / "imgs"), 2, 2) for n in part]
    assert sorted(flat) == names


def test_dataloader_workers_of_two_simulated_ranks_read_disjoint_parts(tmp_path):
    pattern, keys = write_shards(tmp_path / "wds", 5, 3)
    corpus = WebDatasetCorpus(pattern)
    seen = [e.name for rank in range(2) for e in index_corpus(corpus, num_workers=2, rank=rank, world_size=2)[0]]
    assert sorted(seen) == sorted(keys)


@pytest.mark.integration
def test_two_real_processes_split_the_corpus_and_train(tmp_path):
    """Two gloo processes: each indexes its own shards with 2 DataLoader workers (union = corpus, no overlap),
    both end with the same gathered feature table, and both run Pic2Word's stage through ``fit``."""
    pattern, keys = write_shards(tmp_path / "wds", 5, 4)
    out = tmp_path / "out"
    out.mkdir()
    torch.multiprocessing.spawn(
        two_process_worker,
        args=(2, str(tmp_path / "init"), pattern, str(tmp_path / "cache"), str(out)),
        nprocs=2,
        join=True,
    )
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert not set(ranks[0]["local"]) & set(ranks[1]["local"])
    assert sorted(ranks[0]["local"] + ranks[1]["local"]) == sorted(keys)
    assert ranks[0]["table"] == ranks[1]["table"] == keys  # corpus order on every process
    assert ranks[0]["embeds_sum"] == pytest.approx(ranks[1]["embeds_sum"])
    assert all(r["report"]["mapping"]["steps"] == 2 for r in ranks)
    assert (out / "checkpoint" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ readers
def test_image_folder_sidecar_captions_and_manifests(tmp_path):
    names = write_image_folder(tmp_path / "imgs", n=6)
    corpus = ImageFolderCorpus(tmp_path / "imgs")
    samples = list(corpus.samples(ShardContext()))
    assert [s.name for s in samples] == names
    assert samples[0].captions == [caption_of(0), caption_of(0).replace("a ", "one ")]
    rows = [{"image": n, "caption": f"caption {i}"} for i, n in enumerate(names[:4])]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "m.csv").write_text("path,text\n" + "".join(f"{r['image']},{r['caption']}\n" for r in rows))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    for manifest in ("m.jsonl", "m.csv", "m.parquet"):
        listed = list(ImageFolderCorpus(tmp_path / "imgs", tmp_path / manifest).samples(ShardContext()))
        assert [(s.name, s.captions) for s in listed] == [(r["image"], [r["caption"]]) for r in rows], manifest


def test_webdataset_samples_group_files_by_key(tmp_path):
    pattern, keys = write_shards(tmp_path, 2, 3)
    samples = list(WebDatasetCorpus(pattern).samples(ShardContext()))
    assert [s.name for s in samples] == keys
    assert samples[0].captions == [caption_of(0), caption_of(1)]  # txt, then the json caption
    assert samples[0].read()[:2] == b"\xff\xd8"  # read back by offset: the JPEG itself
    with pytest.raises(FileNotFoundError, match=r"shard-009\.tar"):
        WebDatasetCorpus(str(tmp_path / "shard-{000,009}.tar"))


def test_caption_corpus_formats_and_blank_lines(tmp_path):
    captions = write_captions(tmp_path / "c.txt", 10)
    corpus = CaptionCorpus(tmp_path / "c.txt")
    assert corpus.captions == captions
    assert corpus.skips.as_dict() == {"empty caption": 1}
    (tmp_path / "c.jsonl").write_text('{"text": "a red car"}\n{"caption": ""}\nnot json\n{"caption": "a dog"}\n')
    corpus = CaptionCorpus(tmp_path / "c.jsonl")
    assert corpus.captions == ["a red car", "a dog"]
    assert corpus.skips.as_dict() == {"empty caption": 1, "malformed line": 1}
    assert sorted(corpus.shard(ShardContext(0, 2)) + corpus.shard(ShardContext(1, 2))) == sorted(corpus.captions)
    with pytest.raises(ValueError, match="unknown table format"):
        read_records(tmp_path / "c.txt")


def test_triplet_jsonl_resolves_paths_and_counts_bad_records(tmp_path):
    write_triplets(tmp_path / "t.jsonl", ["a.png", "b.png", "c.png"])
    (tmp_path / "t.jsonl").write_text(
        (tmp_path / "t.jsonl").read_text() + '{"reference": "a.png", "target": "b.png"}\n'
    )
    corpus = TripletCorpus(tmp_path / "t.jsonl")
    assert len(corpus) == 3
    assert corpus.records[0].reference == str(tmp_path / "a.png")
    assert corpus.records[0].pseudo_target == str(tmp_path / "c.png")
    assert corpus.skips.as_dict() == {"incomplete triplet": 1, "malformed line": 1}
    assert TripletCorpus(tmp_path / "t.jsonl", by_name=True).records[0].reference == "a.png"


# ------------------------------------------------------------------------------------------------ corrupt input
def test_corrupt_samples_are_skipped_and_counted(tmp_path, tiny_backbone, caplog):
    write_image_folder(tmp_path / "imgs", n=6, corrupt=2)
    cache = FeatureCache(tmp_path / "cache")
    encoded = encode_corpus(ImageFolderCorpus(tmp_path / "imgs"), tiny_backbone, cache, batch_size=4)
    assert len(encoded.table) == 6
    assert encoded.skipped == {"undecodable image": 2}
    assert "skipped 2 samples" in caplog.text

    pattern, keys = write_shards(tmp_path / "wds", 3, 3, no_image=1)
    damaged = tmp_path / "wds" / "shard-001.tar"
    with tarfile.open(damaged) as tar:
        cut = tar.getmembers()[3].offset_data + 10  # inside the second sample's image
    damaged.write_bytes(damaged.read_bytes()[:cut])
    encoded = encode_corpus(WebDatasetCorpus(pattern), tiny_backbone, cache, batch_size=4)
    assert encoded.skipped == {"damaged shard": 1, "no image in sample": 1, "truncated sample": 1}
    assert encoded.table.names == keys[:4] + keys[6:]  # the intact shards whole, the damaged one up to the cut


def test_encoding_is_cached_and_the_index_reused(tmp_path, tiny_backbone):
    pattern, _ = write_shards(tmp_path / "wds", 3, 3)
    cache = FeatureCache(tmp_path / "cache")
    first = encode_corpus(WebDatasetCorpus(pattern), tiny_backbone, cache, batch_size=4)
    assert len(list((tmp_path / "cache" / INDEX_DIR).glob("*.json"))) == 3
    with tarfile.open(tmp_path / "wds" / "shard-000.tar") as tar:
        assert tar.getnames()  # still a valid shard: the index cache never rewrites input
    again = encode_corpus(WebDatasetCorpus(pattern), tiny_backbone, cache, batch_size=4)
    assert again.table.names == first.table.names
    torch.testing.assert_close(again.table.embeds, first.table.embeds)


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    return write_corpora(tmp_path_factory.mktemp("corpora"))


TRAINED = sorted(m for m in METHODS.list() if METHODS.get(m).stages)
# Also trained from these corpora by their presets' dry runs (tests/test_presets.py) in the default suite.
COVERED_BY_PRESETS = {"map-to-compose", "tmcir"}


@pytest.mark.integration  # every method through fit, from the corpora on disk
@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=[pytest.mark.slow] if m in COVERED_BY_PRESETS else []) for m in TRAINED]
)
def test_every_method_trains_a_few_steps_from_corpora(method, corpora, tiny_backbone, tmp_path):
    cls = METHODS.get(method)
    run_cfg = few_steps_config(method, data_overrides(method, corpora, tmp_path / "cache"))
    source = CorpusSource(run_cfg.data, FeatureCache(run_cfg.data.cache_dir))
    torch.manual_seed(0)
    model = create_method(method, tiny_backbone, run_cfg.method)
    report = fit(model, source, run_cfg, tmp_path / "out", val_split=run_cfg.data.val or None, progress=False)
    assert set(report) == {s.name for s in cls.stages}
    for stage, info in report.items():
        assert info["steps"] == 2, stage
        assert "skipped" in info, stage
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.integration
def test_every_method_trains_in_two_processes_from_corpora(corpora, tmp_path):
    """Two gloo processes train every method with stages from the corpora (global batch 4, 2 per process): each
    stage runs its steps, and both processes end each stage with identical weights (gradients averaged)."""
    (tmp_path / "corpora.json").write_text(json.dumps(corpora))
    out = tmp_path / "out"
    out.mkdir()
    torch.multiprocessing.spawn(
        every_method_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path / "corpora.json"), str(out)),
        nprocs=2,
        join=True,
    )
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert set(ranks[0]) == set(TRAINED)
    for method in TRAINED:
        report = ranks[0][method]["report"]
        assert {stage: info["steps"] for stage, info in report.items()} == {
            s.name: 2 for s in METHODS.get(method).stages
        }, method
        stages = ranks[0][method]["stage_weights"]
        assert set(stages) == {s.name for s in METHODS.get(method).stages}, method
        assert stages == ranks[1][method]["stage_weights"], f"{method}: the processes' weights diverged"
        assert (out / method / "model.safetensors").is_file(), method


def test_pairs_drop_images_without_captions_and_say_so(tmp_path, tiny_backbone):
    write_image_folder(tmp_path / "imgs", n=6)
    for txt in list((tmp_path / "imgs").rglob("*.txt"))[:2]:
        txt.unlink()
    source = CorpusSource(DataOptions(images=str(tmp_path / "imgs"), num_workers=0), FeatureCache(tmp_path / "c"))
    data = source.stage_data(DataRequest("pairs", tiny_backbone))
    assert len(data.images) == len(data.captions) == 4
    assert data.info["without_caption"] == 2


def test_missing_data_settings_are_clear_errors(tmp_path, tiny_backbone):
    source = CorpusSource(DataOptions(), FeatureCache(tmp_path))
    with pytest.raises(ValueError, match=r"data\.images"):
        source.stage_data(DataRequest("images", tiny_backbone))
    with pytest.raises(ValueError, match=r"data\.triplets"):
        source.stage_data(DataRequest("synthetic_triplets", tiny_backbone))
    with pytest.raises(ValueError, match=r"pseudo_targets\.manifest"):
        source.stage_data(DataRequest("pseudo_triplets", tiny_backbone))
    with pytest.raises(ValueError, match=r"data\.benchmark"):
        CorpusSource(DataOptions(benchmark="circo"), FeatureCache(tmp_path))


def test_skip_counter_logs_only_the_first_few(caplog):
    skips = SkipCounter(log_first=2)
    for i in range(5):
        skips.add("bad", f"item {i}")
    assert skips.as_dict() == {"bad": 5}
    assert caplog.text.count("skipped (bad)") == 2
