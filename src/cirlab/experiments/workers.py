"""Training a study's runs in parallel worker processes, each with its share of the CPU threads.

The Shapes models are small: on 2 cores one training process with 2 threads gets far less than twice the work of one
thread done (small matrix products), so training two runs at once, a thread each, finishes a study's training sooner.
Runs are content-addressed (``cirlab.experiments.runs``): the workers write them, and the study then loads them as
it would load runs from an earlier call. Only the training happens in workers; the caller evaluates each run once
it is trained, on the cores the workers leave free.
"""

from __future__ import annotations

import functools
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as futures_wait
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


def _train(
    spec: tuple[tuple[str, Any], ...], task: TrainTask, quick: bool, runs: str, force: bool, threads: int
) -> float:
    """Trains one task in a worker process on ``threads`` threads; returns the seconds it took."""
    torch.set_num_threads(threads)
    env = _worker_env(spec)
    t0 = time.perf_counter()
    train_or_load(task.method, env, task.seed, quick, Path(runs), force, task.overrides, progress=False)
    return time.perf_counter() - t0


class TrainingPool:
    """The missing runs of a study, trained ``jobs`` at a time in worker processes while the caller evaluates.

    Each worker gets ``torch.get_num_threads() // jobs`` threads. :meth:`wait` returns once a task's run is trained
    and a core is free, so the caller evaluates the finished runs on the cores the workers leave idle (the longest
    run, started first, is still training) instead of after all of them; meanwhile the caller's own thread count is
    the threads no worker holds. Use it as a context manager: leaving it waits for every worker and restores the
    caller's threads.

    Raises:
        ValueError: ``env`` does not say how it was prepared (``ShapesEnv.spec``), so workers cannot rebuild it.
    """

    def __init__(
        self,
        env: ShapesEnv,
        tasks: Sequence[TrainTask],
        quick: bool,
        runs: Path,
        force: bool,
        jobs: int,
        log: Callable[[str], None] = print,
    ) -> None:
        self.todo = pending_tasks(env, tasks, quick, runs, force)
        self.log = log
        self._threads = torch.get_num_threads()
        self._per_worker = max(1, self._threads // jobs)
        self._pool: ProcessPoolExecutor | None = None
        self._futures: dict[TrainTask, Future[float]] = {}
        self._logged: set[TrainTask] = set()
        self._jobs = jobs
        if not self.todo:
            return
        if not env.spec:
            raise ValueError("this Shapes environment was not made by prepare_shapes; train with jobs=1")
        spec = tuple(sorted(env.spec.items()))
        log(f"training {len(self.todo)} runs, {jobs} at a time ({self._per_worker} thread(s) each)")
        context = multiprocessing.get_context("spawn")  # no forked torch thread pools
        self._pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context)
        self._futures = {
            t: self._pool.submit(_train, spec, t, quick, str(runs), force, self._per_worker) for t in self.todo
        }
        self._share_threads()

    def __contains__(self, task: TrainTask) -> bool:
        return task in self._futures

    def _share_threads(self) -> None:
        busy = sum(not f.done() for f in self._futures.values())
        torch.set_num_threads(max(1, self._threads - min(busy, self._jobs) * self._per_worker))

    def _log_finished(self) -> None:
        for task, future in self._futures.items():
            if future.done() and task not in self._logged and future.exception() is None:
                self._logged.add(task)
                self.log(f"[{task.method}] seed {task.seed}: trained in {future.result():.0f} s in a worker")

    def wait(self, task: TrainTask | None = None) -> None:
        """Blocks until ``task``'s run is trained (re-raising a worker's error), if it is one of the pool's, and
        fewer runs train than there are workers; then sets the caller's threads to the ones no worker holds."""
        if task in self._futures:
            self._futures[task].result()
        while sum(not f.done() for f in self._futures.values()) >= self._jobs:
            futures_wait([f for f in self._futures.values() if not f.done()], return_when=FIRST_COMPLETED)
        self._log_finished()
        self._share_threads()

    def __enter__(self) -> TrainingPool:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
                if exc[0] is None:
                    for future in self._futures.values():
                        future.result()
                    self._log_finished()
        finally:
            torch.set_num_threads(self._threads)
