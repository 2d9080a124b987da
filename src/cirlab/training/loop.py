"""The one training loop for every stage of every method (STYLE.md rule 8).

Methods supply a loss and their trainable parameters; data providers supply batches as a pure function of the
step (so resuming replays the same data); the loop owns the optimizer, schedule, gradient accumulation, bf16
autocast, EMA, step-based validation with best-checkpoint selection, checkpoints with exact resume (parameters,
optimizer, scheduler, RNG state), a CSV metrics log and a progress bar.
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

from cirlab.io import atomic_path, atomic_write_json
from cirlab.modules.ema import EMA

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
        weight_decay: AdamW weight decay.
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
    weight_decay: float = 0.01
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
    """Append-only CSV of metrics rows; on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and path.is_file():
            with path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self._flush()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._flush()

    def _flush(self) -> None:
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

    Returns:
        A ``TrainResult`` with the best validation metrics and the history.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    named = _named_trainables(module, params)
    if not named:
        raise ValueError(f"{description}: nothing to train")
    device = next(iter(named.values())).device
    decay, no_decay = [], []
    for n, p in named.items():
        (no_decay if p.ndim < 2 or n.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    ema = EMA(list(named.values()), cfg.ema_decay) if cfg.ema_decay > 0 else None

    start, best_value, best_step, best_metrics = 0, -math.inf, -1, {}
    state_path = out_dir / STATE_FILE
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state["params"][n])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"])
        start, best_value, best_step, best_metrics = (
            state["step"],
            state["best_value"],
            state["best_step"],
            state["best_metrics"],
        )
    else:
        torch.manual_seed(cfg.seed)
    log = _Log(out_dir / LOG_FILE, resume_step=start if start else None)

    def evaluate(step: int) -> dict[str, float]:
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
        if save_fn is None:
            return
        if ema is not None:
            with ema.swapped_in():
                save_fn(out_dir / "best")
        else:
            save_fn(out_dir / "best")
        atomic_write_json(out_dir / "best" / "selection.json", {"step": step, "metric": select_metric, **metrics})

    def checkpoint(step: int) -> None:
        state = {
            "step": step,
            "params": {n: p.detach().clone() for n, p in named.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "rng": torch.get_rng_state(),
            "best_value": best_value,
            "best_step": best_step,
            "best_metrics": best_metrics,
        }
        with atomic_path(state_path) as tmp:
            torch.save(state, tmp)

    progress = _progress(cfg.progress, description, cfg.steps, start)
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
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{description}: loss is {loss.item()} at step {step}")
                (loss / cfg.grad_accum).backward()
                for k, v in out.items():
                    logged[k] = logged.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
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
    return TrainResult(step, best_step, best_metrics, log.rows, time.perf_counter() - t0)


class _progress:
    """A rich progress bar (or nothing) showing the running loss."""

    def __init__(self, enabled: bool, description: str, total: int, start: int) -> None:
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.bar.add_task(description, total=total, completed=start, loss=float("nan"))
            self.bar.start()

    def advance(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, loss=loss)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
