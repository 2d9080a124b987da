"""Training a study's runs in parallel worker processes, each with its share of the CPU threads.

The Shapes models are small: on 2 cores one training process with 2 threads gets far less than twice the work of one
thread done (small matrix products), so training two runs at once, a thread each, finishes a study's training sooner.
Runs are content-addressed (``cirlab.experiments.runs``): the workers write them, and the study then loads them as
it would load runs from an earlier call. Only the training happens in workers; evaluation stays in the caller.
"""

from __future__ import annotations

import functools
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cirlab.experiments.runs import is_trained, run_of, train_or_load
from cirlab.experiments.shapes_env import ShapesEnv, prepare_shapes
from cirlab.methods import METHODS


@dataclass(frozen=True)
class TrainTask:
    """One run to train: a method with run-config ``overrides`` for ``seed``."""

    method: str
    overrides: tuple[str, ...]
    seed: int


def pending_tasks(env: ShapesEnv, tasks: Sequence[TrainTask], quick: bool, runs: Path, force: bool) -> list[TrainTask]:
    """The tasks whose run is not trained yet (all of them with ``force``), without duplicates, the supervised
    methods (the longest: they fine-tune CLIP) first so that they start at once."""
    unique = list(dict.fromkeys(tasks))
    todo = [t for t in unique if force or not is_trained(run_of(t.method, env, t.seed, quick, runs, t.overrides)[1])]
    return sorted(todo, key=lambda t: not METHODS.get(t.method).supervised)


@functools.lru_cache(maxsize=2)
def _worker_env(spec: tuple[tuple[str, Any], ...]) -> ShapesEnv:
    # One environment per worker process (the pool's processes live for one study), rebuilt from the caller's
    # prepare_shapes arguments: the world and CLIP are found on disk, nothing is built again.
    return prepare_shapes(**dict(spec), log=lambda message: None)


def _train(spec: tuple[tuple[str, Any], ...], task: TrainTask, quick: bool, runs: str, force: bool, threads: int):
    torch.set_num_threads(threads)
    env = _worker_env(spec)
    t0 = time.perf_counter()
    train_or_load(task.method, env, task.seed, quick, Path(runs), force, task.overrides, progress=False)
    return time.perf_counter() - t0


def train_in_workers(
    env: ShapesEnv,
    tasks: Sequence[TrainTask],
    quick: bool,
    runs: Path,
    force: bool,
    jobs: int,
    log: Callable[[str], None] = print,
) -> list[TrainTask]:
    """Trains the tasks' missing runs (all with ``force``), ``jobs`` at a time, each worker with
    ``torch.get_num_threads() // jobs`` threads; returns the tasks it trained.

    Raises:
        ValueError: ``env`` does not say how it was prepared (``ShapesEnv.spec``), so workers cannot rebuild it.
        Whatever a worker raised, once the running ones have finished.
    """
    todo = pending_tasks(env, tasks, quick, runs, force)
    if not todo:
        return []
    if not env.spec:
        raise ValueError("this Shapes environment was not made by prepare_shapes; train with jobs=1")
    threads = max(1, torch.get_num_threads() // jobs)
    spec = tuple(sorted(env.spec.items()))
    log(f"training {len(todo)} runs, {jobs} at a time ({threads} thread(s) each)")
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(_train, spec, t, quick, str(runs), force, threads): t for t in todo}
        for future in as_completed(futures):
            task = futures[future]
            log(f"[{task.method}] seed {task.seed}: trained in {future.result():.0f} s in a worker")
    return todo
