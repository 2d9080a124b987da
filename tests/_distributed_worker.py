"""One process of the multi-process tests (``tests/test_distributed.py`` launches it with ``torchrun``).

``OUT PATHS_JSON``: in ``OUT``, trains Pic2Word's mapping on tiny-backbone features (``full/``), each process
reading its share of every global batch; trains it again stopped after step 3 and then resumed from the checkpoint
on disk (``resumed/``); encodes the image files listed in ``PATHS_JSON`` into a feature cache (``cache/``), split
over the processes, and saves what this process got back (``rank<r>.npy``). One launch does it all because
starting processes is what costs. The test imports :func:`train_pic2word` for its single-process reference run, and
``tests/test_training_loop.py`` trains through the same :func:`train_mapping`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cirlab
from cirlab.distributed import World, process_group
from cirlab.features.cache import FeatureCache
from cirlab.features.images import FileImages, ImageEncoder, image_features
from cirlab.methods import create_method
from cirlab.training.data import FeatureTable, make_batch_fn
from cirlab.training.loop import TrainConfig, TrainResult, train

CFG = TrainConfig(steps=8, batch_size=8, grad_accum=2, lr=3e-3, eval_every=4, log_every=1, progress=False, seed=3)


def train_pic2word(out_dir: Path, world: World, steps: int = CFG.steps, stop_after: int | None = None) -> TrainResult:
    """Pic2Word's mapping on 48 random tiny-backbone images (dropout off, so processes add no noise of their own)."""
    backbone = cirlab.create_backbone("tiny").freeze()
    pixels = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # (48, 3, 32, 32)
    with torch.no_grad():
        table = FeatureTable([f"i{i}" for i in range(48)], backbone.encode_image(pixels).embeds)
    cfg = TrainConfig(**{**CFG.__dict__, "steps": steps})
    _, result = train_mapping(backbone, {"dropout": 0.0, "hidden": 64}, table, cfg, out_dir, 8, stop_after, world)
    return result


def train_mapping(
    backbone: Any,
    options: dict[str, Any] | None,
    table: FeatureTable,
    cfg: TrainConfig,
    out_dir: Path,
    probe_size: int,
    stop_after: int | None = None,
    world: World | None = None,
) -> tuple[Any, TrainResult]:
    """Trains the mapping stage of a new Pic2Word on ``table`` through the one loop.

    Selection is on a probe score (mean cosine of the first ``probe_size`` images with their own "is red" query),
    so checkpoint selection and resume are exercised without a benchmark. ``test_training_loop`` runs the same
    helper in one process, so the single- and multi-process tests train alike.

    Args:
        backbone: the frozen backbone the method wraps.
        options: the method config (None: Pic2Word's defaults).
        table: the training images' features.
        cfg: the loop settings; ``cfg.seed`` also seeds the method's initialisation.
        out_dir: the run directory (an existing checkpoint there is resumed).
        probe_size: images scored for selection.
        stop_after: stop after this step, as a kill would.
        world: the processes sharing each batch (None: this process alone).

    Returns:
        The trained method and the loop's result.
    """
    torch.manual_seed(cfg.seed)  # method initialisation is seeded here, as `cirlab train` does
    method = create_method("pic2word", backbone, options)
    method.prepare_stage("mapping")
    batch_fn = make_batch_fn("images", cfg.batch_size, cfg.seed, cfg.grad_accum, images=table, world=world)
    probe = table.gather(torch.arange(probe_size))

    def evaluate() -> dict[str, float]:
        q = method.compose(probe, ["is red"] * probe_size)
        return {"score": float((q @ torch.nn.functional.normalize(probe.embeds, dim=-1).t()).diag().mean())}

    result = train(
        method,
        method.trainable_parameters("mapping"),
        batch_fn,
        lambda b: method.training_loss("mapping", b),
        cfg,
        out_dir,
        eval_fn=evaluate,
        select_metric="score",
        save_fn=method.save,
        stop_after=stop_after,
        world=world,
    )
    return method, result


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    out = Path(argv[0])
    with process_group() as world:
        train_pic2word(out / "full", world)
        train_pic2word(out / "resumed", world, stop_after=3)
        train_pic2word(out / "resumed", world)
        paths = [Path(p) for p in json.loads(Path(argv[1]).read_text())]
        backbone = cirlab.create_backbone("tiny").freeze()
        cache = FeatureCache(out / "cache")
        feats = image_features(ImageEncoder.of_backbone(backbone), FileImages(paths), cache, batch_size=4, world=world)
        np.save(out / f"rank{world.rank}.npy", feats.tensor().numpy())


if __name__ == "__main__":
    main(sys.argv[1:])
