"""A process that ``tests/test_crash_safety.py`` kills with SIGKILL at random moments, then runs again to resume.

``train OUT``: trains a 1M-parameter regression with a checkpoint (about 12 MB, so a kill often lands inside a
write) after every step and a ``best/`` checkpoint every 5 steps; prints ``step N`` as each step starts.
``encode PATHS_JSON CACHE``: encodes image files into a feature cache (a pixel-statistics encoder: the cache and its
writer are under test, and a process that imports no torch starts in a fraction of a second), committed in chunks of
8 files; prints ``chunk`` after each. Both print ``done`` at the end. The test imports the functions for its
uninterrupted reference runs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

STEPS = 20


def regression_problem():
    """A seeded linear model (1024 x 1024) and its data."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024)
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1))  # (64, 1024)
    y = torch.randn(64, 1024, generator=torch.Generator().manual_seed(2))  # (64, 1024)
    return model, x, y


def train_regression(out_dir: Path, say=lambda line: None):
    """Trains the regression for ``STEPS`` steps into ``out_dir`` (resuming when a checkpoint is there)."""
    import torch
    from safetensors.torch import save_file

    from cirlab.io import atomic_path
    from cirlab.training.loop import TrainConfig, train

    model, x, y = regression_problem()

    def batch_fn(step: int, micro: int):
        say(f"step {step + 1}")
        rows = torch.arange(step * 8, step * 8 + 8) % 64
        return x[rows], y[rows]

    def save(path: Path) -> None:
        with atomic_path(path / "model.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))

    cfg = TrainConfig(steps=STEPS, batch_size=8, lr=1e-3, eval_every=5, checkpoint_every=1, log_every=1, progress=False)
    train(
        model,
        list(model.parameters()),
        batch_fn,
        lambda b: {"loss": ((model(b[0]) - b[1]) ** 2).mean()},
        cfg,
        out_dir,
        eval_fn=lambda: {"neg_loss": -float(((model(x) - y) ** 2).mean())},
        select_metric="neg_loss",
        save_fn=save,
    )
    return model


ENCODER_KEY = "pixel-stats-v1"


def pixel_features(batch: list[Path]) -> np.ndarray:
    """(B, 48): per 4 x 4 block of each image, its mean RGB; slow enough that a kill often lands mid-chunk."""
    from cirlab.data.images import load_image

    time.sleep(0.05)
    images = np.stack([np.asarray(load_image(p).resize((4, 4)), dtype=np.float32) for p in batch])  # (B, 4, 4, 3)
    return images.reshape(len(batch), -1) / 255.0


def encode_files(paths: list[Path], cache_dir: Path, say=lambda line: None):
    """Features of ``paths`` through the cache, committed every 8 files."""
    from cirlab.features.cache import FeatureCache

    return FeatureCache(cache_dir).get_or_compute(
        paths, ENCODER_KEY, pixel_features, chunk=8, batch_size=4, progress=lambda done, total: say("chunk")
    )


def main(argv: list[str]) -> None:
    def say(line: str) -> None:
        print(line, flush=True)

    if argv[0] == "train":
        train_regression(Path(argv[1]), say)
    elif argv[0] == "encode":
        feats = encode_files([Path(p) for p in json.loads(Path(argv[1]).read_text())], Path(argv[2]), say)
        say(f"encoded {feats.n_encoded}")
    else:
        raise SystemExit(f"unknown mode {argv[0]!r}")
    say("done")


if __name__ == "__main__":
    main(sys.argv[1:])
