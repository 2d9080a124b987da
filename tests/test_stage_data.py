"""The training-data contract: a method states what each stage reads in a ``DataRequest``; every training data
source serves it through the servers it names; batches follow the kind's shape."""

from __future__ import annotations

import pytest
import torch

from cirlab.data.pseudo_targets import PseudoTargetOptions
from cirlab.features.cache import FeatureCache
from cirlab.features.table import FeatureTable
from cirlab.methods import METHODS, create_method
from cirlab.methods.base import DATA_KINDS, DataRequest, Stage
from cirlab.training.corpus_source import CorpusSource
from cirlab.training.data import Triplet, make_batch_fn
from cirlab.training.run_config import DataOptions, SyntheticOptions
from cirlab.training.sources import ShapesSource, SplitSource, StageData


def test_every_stage_of_every_method_reads_a_kind_both_sources_serve(tmp_path):
    cache = FeatureCache(tmp_path)
    served = [set(ShapesSource(None, cache).servers()), set(CorpusSource(DataOptions(), cache).servers())]
    for name in METHODS.list():
        for stage in METHODS.get(name).stages:
            assert stage.data in DATA_KINDS, (name, stage)
            assert all(stage.data in kinds for kinds in served), (name, stage)
    assert served == [set(DATA_KINDS)] * 2


def test_the_request_carries_what_the_method_says(tiny_backbone):
    tmcir = create_method("tmcir", tiny_backbone, {"pseudo_targets": {"noise": 0.25, "seed": 3}})
    align, fusion = tmcir.data_request("align"), tmcir.data_request("fusion")
    assert align.kind == "pseudo_triplets" and align.pseudo_targets == PseudoTargetOptions(noise=0.25, seed=3)
    assert fusion.kind == "triplets" and fusion.pseudo_targets is None
    assert align.encode is None and align.backbone is tmcir.backbone  # frozen until a stage trains the tower
    tmcir.prepare_stage("align")
    assert tmcir.data_request("align").encode == tmcir.encode_images
    m2c = create_method("map-to-compose", tiny_backbone)
    assert m2c.data_request("stage2").hard_negatives == m2c.hard_negatives("stage2") > 0
    assert m2c.data_request("stage1").hard_negatives == 0
    tokens = next(n for n in METHODS.list() if METHODS.get(n).needs_image_tokens and METHODS.get(n).stages)
    method = create_method(tokens, tiny_backbone)
    assert method.data_request(method.stages[0].name).tokens


def test_a_source_is_never_asked_to_read_a_methods_config(tiny_backbone, tmp_path):
    """The Shapes source's pseudo-targets come from the request alone: a method whose config happens to hold a
    ``pseudo_targets`` field it does not declare in its requests leaves the source's default in place."""
    served = []

    class Recording(SplitSource):
        def split(self, name: str):
            raise KeyError(name)

        def servers(self):
            return {"pseudo_triplets": lambda request, synthetic: served.append(request) or StageData()}

    method = create_method("tmcir", tiny_backbone, {"pseudo_targets": {"noise": 0.5}})
    method.pseudo_targets = lambda stage: None  # the method declares no pseudo-targets
    Recording().stage_data(method.data_request("align"))
    assert served[0].pseudo_targets is None


def test_a_kind_the_source_does_not_serve_is_a_clear_error(tiny_backbone):
    class CaptionsOnly(SplitSource):
        def split(self, name: str):
            raise KeyError(name)

        def servers(self):
            return {"captions": lambda request, synthetic: StageData(captions=[["a"]], info={"fraction": synthetic})}

    source = CaptionsOnly()
    with pytest.raises(ValueError, match=r"CaptionsOnly serves no 'images' data; it serves captions"):
        source.stage_data(DataRequest("images", tiny_backbone))
    data = source.stage_data(DataRequest("captions", tiny_backbone))
    assert data.captions == [["a"]] and data.info["fraction"] == SyntheticOptions()


def test_requests_and_stages_refuse_what_cannot_be_served(tiny_backbone):
    with pytest.raises(ValueError, match="unknown data kind 'videos'"):
        DataRequest("videos", tiny_backbone)
    with pytest.raises(ValueError, match="unknown data kind 'videos'"):
        Stage("s", "videos")
    with pytest.raises(ValueError, match="pair embeddings come from a frozen backbone"):
        DataRequest("pairs", tiny_backbone, pair_embeddings=True, encode=tiny_backbone.encode_image)
    with pytest.raises(ValueError, match="unknown data kind 'videos'"):
        make_batch_fn("videos", 4, 0)


def test_triplet_kinds_share_one_batch_shape(tiny_backbone):
    names = [f"img{i}" for i in range(6)]
    table = FeatureTable(names, torch.randn(6, tiny_backbone.embed_dim))
    triplets = [Triplet(names[i], f"edit {i}", names[(i + 1) % 6]) for i in range(6)]
    kinds = [kind for kind, shape in DATA_KINDS.items() if shape == "triplets"]
    shaped = [make_batch_fn(kind, 4, 0, images=table, triplets=triplets)(1, 0) for kind in kinds]
    assert kinds == ["triplets", "synthetic_triplets", "pseudo_triplets"]
    assert all(b["text"] == shaped[0]["text"] for b in shaped)
    assert all(torch.equal(b["target_rows"], shaped[0]["target_rows"]) for b in shaped)
