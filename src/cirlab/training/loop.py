"""The one training loop for every stage of every method (STYLE.md rule 8).

Methods supply a loss and their trainable parameters; data providers supply batches as a pure function of the
step (so resuming replays the same data); the loop owns the optimizer, schedule, gradient accumulation, bf16
autocast, EMA, step-based validation with best-checkpoint selection, checkpoints with exact resume (parameters,
optimizer, scheduler, RNG state), a CSV metrics log and a progress bar.

Several processes (``torchrun``): every process calls ``train`` with a ``batch_fn`` that returns its share of the
global batch (``make_batch_fn(..., world=...)``). The loop averages gradients over processes itself, with one flat
``torch.distributed`` all-reduce per optimizer step, rather than wrapping the module in ``DistributedDataParallel``:
methods compute losses through their own functions (not ``module.forward``, which DDP hooks), train a subset of
their parameters, and accumulate gradients over micro-batches, and one all-reduce after the last micro-batch is
what DDP with ``no_sync`` would do. Logged values are averaged over processes; validation runs on rank 0 and its
metrics are broadcast; only rank 0 writes the checkpoint, the log and ``best/``; every process reads the checkpoint
to resume, so ``out_dir`` must be on a filesystem they share.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cirlab.distributed import (
    World,
    all_gather_objects,
    all_reduce_mean,
    average_gradients,
    barrier,
    broadcast_object,
    broadcast_parameters,
    current_world,
    same_on_every_rank,
)
from cirlab.io import atomic_path, atomic_write_json, remove_stale_temporaries
from cirlab.modules.ema import EMA
from cirlab.progress import progress_bar

STATE_FILE = "trainer_state.pt"
LOG_FILE = "metrics.csv"


@dataclass
class TrainConfig:
    """Settings of one training stage.

    Attributes:
        steps: optimizer steps.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate.
        optimizer: ``adamw`` (decoupled weight decay) or ``adam`` (``weight_decay`` as an L2 term, 0 for none).
        betas: Adam's moment decays.
        eps: Adam's epsilon.
        weight_decay: weight decay.
        decay_all: decay biases and norm weights too (as an optimiser built over all parameters does: SEARLE,
            LinCIR); False leaves them undecayed (open_clip's and Pic2Word's habit).
        warmup: fraction of ``steps`` with linear warm-up.
        schedule: ``cosine`` (to zero) or ``constant`` after warm-up.
        max_grad_norm: gradient clipping (0 disables).
        eval_every: validate every N steps (0: only at the end); the best checkpoint is chosen on validation.
        checkpoint_every: write a resumable checkpoint every N steps (0: at each validation).
        ema_decay: EMA of the trained weights used for validation and saving (0 disables).
        bf16: bf16 autocast for the forward pass.
        seed: seeds data order and the torch RNG.
        log_every: log the training loss every N steps.
        progress: show a progress bar.
    """

    steps: int = 1000
    batch_size: int = 128
    grad_accum: int = 1
    lr: float = 1e-3
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    decay_all: bool = False
    warmup: float = 0.05
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    eval_every: int = 0
    checkpoint_every: int = 0
    ema_decay: float = 0.0
    bf16: bool = False
    seed: int = 0
    log_every: int = 10
    progress: bool = True


@dataclass
class TrainResult:
    """What a training run produced."""

    steps: int
    best_step: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at (0-based) ``step``: linear warm-up then cosine or constant."""
    warm = round(cfg.warmup * cfg.steps)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule != "cosine":
        raise ValueError(f"unknown schedule {cfg.schedule!r} (cosine, constant)")
    progress = (step - warm) / max(1, cfg.steps - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _Log:
    """Append-only CSV of metrics rows; on resume, rows past the checkpoint are dropped.

    Only the writing process (rank 0) touches the file; the others keep the rows in memory.
    """

    def __init__(self, path: Path, resume_step: int | None, write: bool = True) -> None:
        self.path = path
        self.write = write
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and path.is_file():
            with path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self._flush()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._flush()

    def _flush(self) -> None:
        if not self.write:
            return
        keys: list[str] = ["step"]
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)


def _named_trainables(module: nn.Module, params: list[nn.Parameter]) -> dict[str, nn.Parameter]:
    ids = {id(p) for p in params}
    named = {n: p for n, p in module.named_parameters(remove_duplicate=True) if id(p) in ids}
    if len(named) != len(ids):
        raise ValueError("every trainable parameter must belong to the module being trained")
    return named


def param_groups(named: dict[str, nn.Parameter], cfg: TrainConfig, lr_scales: dict[int, float]) -> list[dict[str, Any]]:
    """Optimizer groups: no weight decay on biases and norms (unless ``cfg.decay_all``), and one group per (decay,
    learning-rate scale) pair.

    Groups are ordered by first appearance so that a resumed run rebuilds the same optimizer layout.
    """
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for n, p in named.items():
        scale = float(lr_scales.get(id(p), 1.0))
        if scale <= 0:
            raise ValueError(f"learning-rate scale of {n} must be positive, got {scale}")
        decays = cfg.decay_all or not (p.ndim < 2 or n.endswith(".bias"))
        groups.setdefault((decays, scale), []).append(p)
    return [
        {"params": ps, "weight_decay": cfg.weight_decay if decays else 0.0, "lr": cfg.lr * scale}
        for (decays, scale), ps in groups.items()
    ]


OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The stage's optimizer (``cfg.optimizer``) over parameter ``groups``, with ``cfg``'s betas and eps."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r} ({', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[cfg.optimizer](groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def train(
    module: nn.Module,
    params: list[nn.Parameter],
    batch_fn: Callable[[int, int], Any],
    loss_fn: Callable[[Any], dict[str, torch.Tensor]],
    cfg: TrainConfig,
    out_dir: str | Path,
    eval_fn: Callable[[], dict[str, float]] | None = None,
    select_metric: str | None = None,
    save_fn: Callable[[Path], None] | None = None,
    resume: bool = True,
    description: str = "train",
    stop_after: int | None = None,
    lr_scales: dict[int, float] | None = None,
    world: World | None = None,
) -> TrainResult:
    """Trains ``params`` of ``module`` by minimising ``loss_fn(batch_fn(step, micro))["loss"]``.

    Args:
        module: owns ``params`` (checkpoints store them by name).
        params: the parameters to train; all others are left untouched.
        batch_fn: ``(step, micro) -> batch``, a pure function of its arguments so that resume replays the data.
        loss_fn: ``batch -> {"loss": scalar, ...}``; extra scalars are logged.
        cfg: loop settings.
        out_dir: run directory: ``trainer_state.pt`` (resumable state), ``metrics.csv``, ``best/`` via ``save_fn``.
        eval_fn: validation metrics (never test); run every ``cfg.eval_every`` steps and at the end.
        select_metric: key of ``eval_fn``'s result to maximise for the best checkpoint (default: last step).
        save_fn: writes the method checkpoint into a directory (called for ``best/``).
        resume: continue from ``trainer_state.pt`` when present.
        description: progress-bar label.
        stop_after: stop (as if killed) after this many steps, leaving a resumable checkpoint (for tests).
        lr_scales: multiplier of ``cfg.lr`` per parameter (by ``id``); each distinct value gets its own optimizer
            parameter groups, and the warm-up/cosine schedule scales every group alike.
        world: the processes training together (default: the initialised ``torch.distributed`` group, else one
            process); every process must call ``train``, with a ``batch_fn`` that returns its share of the batch.

    Returns:
        A ``TrainResult`` with the best validation metrics and the history.
    """
    out_dir = Path(out_dir)
    world = world or current_world()
    out_dir.mkdir(parents=True, exist_ok=True)
    named = _named_trainables(module, params)
    if not named:
        raise ValueError(f"{description}: nothing to train")
    device = next(iter(named.values())).device
    # Every process starts from rank 0's weights (and its EMA from them), whatever each initialised.
    broadcast_parameters(list(named.values()), world)
    optimizer = make_optimizer(param_groups(named, cfg, lr_scales or {}), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    ema = EMA(list(named.values()), cfg.ema_decay) if cfg.ema_decay > 0 else None

    start, best_value, best_step, best_metrics = 0, -math.inf, -1, {}
    state_path = out_dir / STATE_FILE
    if world.is_main:
        # A run killed while writing leaves temporaries beside these files; they are never read, only removed.
        remove_stale_temporaries(state_path)
        remove_stale_temporaries(out_dir / LOG_FILE)
    if resume and state_path.is_file():
        state = load_state(state_path, named, device)
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state["params"][n])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        ranks_rng = state.get("rng_ranks") or [state["rng"]]
        if world.rank < len(ranks_rng):
            torch.set_rng_state(ranks_rng[world.rank])
        else:
            torch.manual_seed(cfg.seed + world.rank)
        start, best_value, best_step, best_metrics = (
            state["step"],
            state["best_value"],
            state["best_step"],
            state["best_metrics"],
        )
    else:
        # Each process draws its own random numbers (dropout, noise); rank 0's stream is the single-process one.
        torch.manual_seed(cfg.seed + world.rank)
    if world.distributed:
        same_on_every_rank(start, world, f"the step {description} resumes from ({state_path} must be shared)")
    log = _Log(out_dir / LOG_FILE, resume_step=start if start else None, write=world.is_main)

    def evaluate(step: int) -> dict[str, float]:
        # Rank 0 validates (every process holds the same weights) and tells the others, who must agree on the
        # best checkpoint.
        metrics = run_validation() if world.is_main else {}
        return broadcast_object(metrics, world)

    def run_validation() -> dict[str, float]:
        # Validation must not consume the training RNG, or resumed runs would diverge.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            module.eval()
            if ema is not None:
                with ema.swapped_in():
                    metrics = eval_fn() if eval_fn else {}
            else:
                metrics = eval_fn() if eval_fn else {}
            module.train()
        return metrics

    def save_best(step: int, metrics: dict[str, float]) -> None:
        if save_fn is None or not world.is_main:
            return
        if ema is not None:
            with ema.swapped_in():
                save_fn(out_dir / "best")
        else:
            save_fn(out_dir / "best")
        atomic_write_json(out_dir / "best" / "selection.json", {"step": step, "metric": select_metric, **metrics})

    def checkpoint(step: int) -> None:
        rngs = all_gather_objects(torch.get_rng_state(), world)
        if not world.is_main:
            return
        state = {
            "step": step,
            "params": {n: p.detach().clone() for n, p in named.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "rng": rngs[0],
            "rng_ranks": rngs,
            "best_value": best_value,
            "best_step": best_step,
            "best_metrics": best_metrics,
        }
        with atomic_path(state_path) as tmp:
            torch.save(state, tmp)

    progress = _progress(cfg.progress and world.is_main, description, cfg.steps, start)
    t0 = time.perf_counter()
    module.train()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    step = start
    try:
        for step in range(start + 1, cfg.steps + 1):
            optimizer.zero_grad(set_to_none=True)
            logged: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batch = batch_fn(step - 1, micro)
                with autocast:
                    out = loss_fn(batch)
                loss = out["loss"]
                if not world.distributed and not torch.isfinite(loss):
                    raise FloatingPointError(f"{description}: loss is {loss.item()} at step {step}")
                (loss / cfg.grad_accum).backward()
                for k, v in out.items():
                    logged[k] = logged.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            if world.distributed:
                # The mean over processes of their shares' losses is the loss of the global batch; a non-finite
                # one stops every process at once instead of leaving the others waiting in the all-reduce.
                logged = all_reduce_mean(logged, world)
                if not math.isfinite(logged["loss"]):
                    raise FloatingPointError(f"{description}: loss is {logged['loss']} at step {step}")
                average_gradients(list(named.values()), world)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(named.values()), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update()
            progress.advance(logged["loss"])
            is_eval = step == cfg.steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
            row: dict[str, Any] = {}
            if step % max(1, cfg.log_every) == 0 or is_eval:
                row = {"step": step, **{f"train/{k}": round(v, 6) for k, v in logged.items()}}
                row["lr"] = scheduler.get_last_lr()[0]
            if is_eval:
                metrics = evaluate(step)
                row.update({f"val/{k}": v for k, v in metrics.items()})
                value = metrics.get(select_metric, math.nan) if select_metric else float(step)
                if select_metric and select_metric not in metrics:
                    raise KeyError(f"select metric {select_metric!r} not in validation metrics {sorted(metrics)}")
                if value > best_value:
                    best_value, best_step, best_metrics = value, step, metrics
                    save_best(step, metrics)
            if row:
                log.add(row)
            if is_eval or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0):
                checkpoint(step)
            if stop_after is not None and step >= stop_after and step < cfg.steps:
                checkpoint(step)
                break
    finally:
        progress.close()
    barrier(world)  # rank 0's files (best/, the checkpoint) are complete before any process reads them
    return TrainResult(step, best_step, best_metrics, log.rows, time.perf_counter() - t0)


def load_state(path: Path, named: dict[str, nn.Parameter], device: torch.device) -> dict[str, Any]:
    """Reads a resumable checkpoint and checks it holds the parameters being trained, with their shapes.

    Raises:
        ValueError: naming the file when it cannot be read or belongs to another model or stage.
    """
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:
        raise ValueError(f"{path}: cannot read this training checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("params"), dict):
        raise ValueError(f"{path}: not a cirlab training checkpoint")
    saved = state["params"]
    missing = sorted(set(named) - set(saved))
    unexpected = sorted(set(saved) - set(named))
    wrong = sorted(n for n in set(named) & set(saved) if tuple(saved[n].shape) != tuple(named[n].shape))
    if missing or unexpected or wrong:
        parts = [
            f"{label} {names[:3]}{' ...' if len(names) > 3 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("different shapes", wrong))
            if names
        ]
        raise ValueError(
            f"{path}: this checkpoint was written for other parameters ({'; '.join(parts)}), e.g. by another "
            "method or stage; use another output directory or delete it to start over"
        )
    return state


class _progress:
    """A rich progress bar (or nothing) showing the running loss."""

    def __init__(self, enabled: bool, description: str, total: int, start: int) -> None:
        self.bar = None
        if enabled:
            from rich.progress import TextColumn

            self.bar = progress_bar(TextColumn("loss {task.fields[loss]}"))
            # "-" until a step has run: a stage resumed at its end (or served from a finished run) has no loss to
            # show, and "nan" there read like a diverged run.
            self.task = self.bar.add_task(description, total=total, completed=start, loss="-")
            self.bar.start()

    def advance(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
