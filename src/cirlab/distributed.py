"""Several processes through ``torch.distributed``: who this process is, and the few collectives cirlab needs.

Processes are started by a launcher (``torchrun``, ``accelerate launch``, a SLURM script) that sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` joins the process group
(gloo for CPU tensors, NCCL for CUDA tensors). Nothing here keeps state: :class:`World` is a value passed to the
functions that need it, and :func:`current_world` reads what the launcher and ``torch.distributed`` already hold.
Every collective below is a no-op in a single process, so code written for several processes runs unchanged in one.
torch is imported inside the functions: the feature cache and the CLI import this module and must stay light.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def _dist() -> Any:
    import torch.distributed

    return torch.distributed


class DistributedError(RuntimeError):
    """A collective step failed on some process; the message names the rank and what went wrong there."""


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one job.

    Attributes:
        rank: this process's index, 0 .. size - 1; rank 0 writes checkpoints, logs and reports.
        size: number of processes.
    """

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"invalid process rank {self.rank} of world size {self.size}")

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when there is more than one process."""
        return self.size > 1

    def local_slice(self, n: int, what: str = "batch") -> slice:
        """This rank's equal share of ``n`` items (a global batch): the ``rank``-th of ``size`` consecutive slices.

        Raises:
            ValueError: ``n`` is not divisible by the world size (naming both), since contrastive losses gather
                equal-sized shares from every rank.
        """
        if n % self.size:
            raise ValueError(f"a {what} of {n} cannot be split evenly over {self.size} processes; use a multiple")
        share = n // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def block(self, n: int) -> slice:
        """This rank's contiguous block of ``n`` work items; blocks differ in length by at most one."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


def current_world() -> World:
    """The world of the initialised default process group, else a single process."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_world_size() -> int:
    """``WORLD_SIZE`` as set by a launcher such as ``torchrun`` (1 when not launched that way)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE={value!r} is not an integer") from None


def init_from_env(backend: str | None = None) -> World:
    """Joins the process group a launcher prepared (``WORLD_SIZE`` > 1); a single process is returned unchanged.

    Args:
        backend: ``torch.distributed`` backend; default gloo for CPU tensors and, where CUDA is available, NCCL
            for CUDA tensors (``cpu:gloo,cuda:nccl``), with this process bound to GPU ``LOCAL_RANK``.

    Returns:
        This process's ``World``.
    """
    import torch

    if launched_world_size() <= 1:
        return current_world()
    dist = _dist()
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        if backend is None:
            backend = "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend=backend)
    return current_world()


@contextmanager
def process_group(backend: str | None = None) -> Iterator[World]:
    """Joins the launcher's process group (:func:`init_from_env`) for the block and leaves it after.

    A block that ends normally leaves through a barrier; one that raises leaves at once (see :func:`shutdown`).

    Yields:
        This process's ``World`` (a single process when not launched by ``torchrun`` or the like).
    """
    world = init_from_env(backend)
    try:
        yield world
    except BaseException:
        shutdown(wait_for_peers=False)
        raise
    shutdown()


def shutdown(wait_for_peers: bool = True) -> None:
    """Leaves the process group (when one was joined) so that the launcher sees a clean exit.

    Args:
        wait_for_peers: meet every rank at a barrier first. Without it, a rank that finishes early closes the
            sockets a peer is still using for its last collective, and gloo aborts that peer (SIGABRT, seen in
            about one launch in four here). Pass False when leaving on an error: the peers may never arrive, and
            exiting at once lets the launcher stop them.
    """
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def _device_for_collectives() -> torch.device:
    import torch

    # NCCL-only groups need CUDA tensors; with gloo (or the mixed default) CPU tensors always work.
    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_objects(obj: T, world: World) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    _dist().all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, world: World, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not world.distributed:
        return obj
    box = [obj if world.rank == src else None]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def barrier(world: World) -> None:
    """Waits until every rank gets here."""
    if world.distributed:
        _dist().barrier()


def run_everywhere(fn: Callable[[], T], world: World, what: str) -> T:
    """Runs ``fn`` on every rank, then makes every rank fail when any rank failed.

    A rank that raised would otherwise leave the others waiting in their next collective until it times out; here
    the failure (rank and message) is exchanged first, and the failing rank re-raises its own exception.

    Raises:
        DistributedError: on the ranks that succeeded, naming the rank that failed and its error.
    """
    error: BaseException | None = None
    result: Any = None
    try:
        result = fn()
    except Exception as err:
        error = err
    reports = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}", world)
    if error is not None:
        raise error
    for rank, report in enumerate(reports):
        if report is not None:
            raise DistributedError(f"{what} failed on process {rank} of {world.size}: {report}")
    return result


def all_reduce_mean(values: dict[str, float], world: World) -> dict[str, float]:
    """The mean over ranks of each value (every rank must pass the same keys)."""
    if not world.distributed or not values:
        return values
    import torch

    dist = _dist()
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_device_for_collectives())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / world.size for k, v in zip(keys, t.tolist(), strict=True)}


def average_gradients(params: Sequence[torch.nn.Parameter], world: World) -> None:
    """Replaces each parameter's gradient by its mean over ranks, in one flat all-reduce.

    A parameter without a gradient on every rank keeps none (so the optimizer skips it as in one process); one that
    has a gradient on some ranks only is averaged with zeros from the others.
    """
    if not world.distributed or not params:
        return
    import torch

    dist = _dist()
    device = params[0].device
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    )  # (total elements,)
    both = torch.cat([flat, present])
    dist.all_reduce(both, op=dist.ReduceOp.SUM)
    both /= world.size
    offset = 0
    for p, seen in zip(params, both[len(flat) :].tolist(), strict=True):
        n = p.numel()
        if seen > 0:
            p.grad = both[offset : offset + n].view_as(p).to(p.dtype).clone()
        offset += n


def broadcast_parameters(params: Sequence[torch.nn.Parameter], world: World, src: int = 0) -> None:
    """Copies rank ``src``'s parameter values onto every rank (so all ranks start from the same weights)."""
    if not world.distributed:
        return
    import torch

    with torch.no_grad():
        for p in params:
            buf = p.detach().clone()
            _dist().broadcast(buf, src=src)
            p.copy_(buf)


def same_on_every_rank(value: Any, world: World, what: str) -> None:
    """Raises ``DistributedError`` when ``value`` (picklable) differs between ranks, naming ``what``."""
    values = all_gather_objects(value, world)
    if any(v != values[0] for v in values[1:]):
        raise DistributedError(f"{what} differs between processes: {values}")
