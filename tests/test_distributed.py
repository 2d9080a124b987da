"""Several processes through torch.distributed (gloo, CPU): training tracks one process, encoding is split.

Each test launches ``torchrun`` (``python -m torch.distributed.run --standalone``) with 2 CPU processes.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cirlab.distributed import World
from cirlab.features.cache import FeatureCache
from cirlab.modules.losses import info_nce
from cirlab.training.data import make_batch_fn

pytestmark = pytest.mark.integration  # every test launches torchrun processes

WORKER = Path(__file__).with_name("_distributed_worker.py")
sys.path.insert(0, str(WORKER.parent))
from _corpora import noise_pngs  # noqa: E402
from _distributed_worker import train_pic2word  # noqa: E402


def torchrun(*args: str, nproc: int = 2, timeout: int = 240, check: bool = True) -> subprocess.CompletedProcess:
    """Runs ``torchrun --standalone --nproc_per_node nproc ARGS`` and returns the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f)}


def test_world_slices_cover_the_batch_once():
    shares = [World(r, 4).local_slice(12) for r in range(4)]
    assert [list(range(12))[s] for s in shares] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    blocks = [World(r, 3).block(10) for r in range(3)]
    assert [(b.start, b.stop) for b in blocks] == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError, match="batch of 7 cannot be split evenly over 2 processes"):
        World(0, 2).local_slice(7)


def test_rank_batches_together_are_the_single_process_batch():
    captions = [[f"c{i}a", f"c{i}b", f"c{i}c"] for i in range(20)]
    whole = make_batch_fn("captions", 8, seed=1, captions=captions)(5, 0)["caption"]
    parts = [
        make_batch_fn("captions", 8, seed=1, captions=captions, world=World(r, 2))(5, 0)["caption"] for r in (0, 1)
    ]
    assert parts[0] + parts[1] == whole


def test_info_nce_without_a_process_group_is_unchanged():
    q = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    logits = q @ k.t() / 0.1
    labels = torch.arange(6)
    expected = 0.5 * (
        torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)
    )
    assert torch.equal(info_nce(q, k, 0.1, symmetric=True), expected)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    """One ``torchrun`` launch of 2 gloo processes: training, stopped-and-resumed training, encoding."""
    root = tmp_path_factory.mktemp("two-processes")
    paths = noise_pngs(root / "images", 21)
    (root / "paths.json").write_text(json.dumps([str(p) for p in paths]))
    torchrun(str(WORKER), str(root), str(root / "paths.json"))
    return root


def test_two_processes_track_one_process(two_process_run, tmp_path):
    """2 processes with a global batch of 8 (4 each, negatives gathered) vs one process with the same batch.

    The losses agree to float rounding; without gathering, each process would see 3 negatives instead of 7 and the
    loss would be far lower.
    """
    single = train_pic2word(tmp_path / "single", World())
    one, two = _losses(tmp_path / "single"), _losses(two_process_run / "full")
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), f"step {step}: {two[step]} vs {one[step]}"
    assert json.loads((two_process_run / "full" / "best" / "selection.json").read_text())["step"] == single.best_step


def test_two_processes_resume_exactly(two_process_run):
    from safetensors.torch import load_file

    assert _losses(two_process_run / "resumed") == _losses(two_process_run / "full")
    a = load_file(str(two_process_run / "full" / "best" / "model.safetensors"))
    b = load_file(str(two_process_run / "resumed" / "best" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_split_the_encoding_and_both_get_everything(two_process_run, tiny_backbone):
    from cirlab.features.images import FileImages, ImageEncoder, image_features

    paths = [Path(p) for p in json.loads((two_process_run / "paths.json").read_text())]
    encoder = ImageEncoder.of_backbone(tiny_backbone)
    reference = image_features(encoder, FileImages(paths), FeatureCache(two_process_run / "reference")).table(
        [p.name for p in paths]
    )
    for rank in (0, 1):
        got = np.load(two_process_run / f"rank{rank}.npy")
        np.testing.assert_allclose(got, reference.embeds.numpy(), rtol=1e-5, atol=1e-6)
    (manifest,) = (two_process_run / "cache").glob("*/manifest.json")
    shards = json.loads(manifest.read_text())["shards"]
    writers = {s["id"].split("-")[1] for s in shards}  # shard ids carry the writing process id
    assert len(writers) == 2 and sum(s["rows"] for s in shards) == 21
