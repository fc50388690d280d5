"""The one training loop: fine-tuning a method, training an encoder and
building ToyWorld all run here.

A caller gives it a *job* (the loss of one micro-batch, and the tensors a
checkpoint must keep), an optimiser and settings; the loop owns everything
else: accelerate (mixed precision, devices, `accelerate launch`), gradient
accumulation and clipping, the learning-rate schedule, checkpoints and the
resume rule, the time budget, the per-step log, the progress display, a
progress callback and cancelling between steps.

Every random choice of step `s`, micro-batch `m` comes from a generator seeded
by (seed, s, m), so a run killed and resumed follows exactly the path of an
uninterrupted one. Micro-batches are numbered over every process (m·P + r on
rank r of P) and the loop averages gradients over the processes
(processes.py), so P processes train what one does accumulating P.

A job is any object with
- ``loss(step, micro, generator) -> (loss tensor, {name: float})``;
- ``state() -> {name: tensor}`` and ``load_state({name: tensor})``: what a
  checkpoint keeps besides the optimiser (trained tensors, an EMA copy, ...);
- optionally ``after_step(step, extra)``: work between steps (EMA updates,
  monitors); ``extra`` is a JSON-able dict the checkpoint keeps; a dict it
  returns joins the step's log;
- optionally ``attention_maps() -> {label: h w tensor}``: the cross-attention
  its last step computed, handed to the progress callback (see `Progress`).
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from .checkpoint import load_checkpoint, remove_stale_temps, save_checkpoint, start_over
from .processes import average_gradients, broadcast_parameters, loop_syncs_gradients


class TrainingDiverged(UserError):
    pass


def step_seed(seed: int, step: int, micro: int = 0) -> int:
    return (seed * 1_000_003 + step * 1_009 + micro) % (2**63)


@dataclass
class LoopSettings:
    steps: int
    seed: int = 0
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0: no clipping
    mixed_precision: str = "no"
    checkpoint_every: int = 100  # optimiser steps between checkpoints (0: by time only)
    checkpoint_minutes: float = 0.0  # also save when this much wall time has passed (0: off)
    max_minutes: float | None = None  # training-time budget, summed over resumed runs
    log_file: str = ""  # one JSON line per step, flushed as written
    progress_bar: bool = False
    name: str = "train"


@dataclass
class Progress:
    """What the loop tells its callback after every optimiser step."""

    step: int  # steps done
    total: int
    logs: dict[str, float]
    seconds: float  # training time so far, over every resumed run
    # the job's cross-attention maps of this step ({label: h w}, values >= 0), computed only when
    # called; None when the job computes none (only methods with attention losses do)
    attention: Callable[[], dict[str, torch.Tensor]] | None = None


@dataclass
class Outcome:
    steps_done: int
    planned_steps: int
    reason: str  # done | time | cancelled | stopped (stop_after)
    seconds: float
    recent_loss: float | None  # mean 'loss' of the last 100 steps of this run
    extra: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.reason == "done"


def make_accelerator(mixed_precision: str = "no", device: str = "auto", find_unused_parameters: bool = False):
    """The one place an Accelerator is made (devices, mixed precision, DDP under `accelerate launch`)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=handlers)


def run(job, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], settings: LoopSettings, *,
        checkpoint: Path, digest: str, resume: bool = False, accelerator=None,
        lr_at: Callable[[int, float], float] | None = None, on_step: Callable[[Progress], None] | None = None,
        cancel: Callable[[], bool] | None = None, stop_after: int | None = None,
        extra: dict | None = None) -> Outcome:
    """Train until `settings.steps`, the time budget, `cancel()` or `stop_after`.

    `lr_at(step, progress)` sets the learning rate before each step, `progress`
    being max(steps done / steps, time spent / budget). The checkpoint is
    saved every `checkpoint_every` steps or `checkpoint_minutes`, and when the
    loop ends for any reason, so a caller writes its outputs and then
    discards it (checkpoint.discard_checkpoint); until then a kill loses
    nothing. Returns how far it got and why it stopped."""
    acc = accelerator or make_accelerator(settings.mixed_precision)
    checkpoint = Path(checkpoint)
    remove_stale_temps(checkpoint)
    start, seconds_before, extra = 0, 0.0, dict(extra or {})
    if resume and checkpoint.is_file():
        tensors, info = load_checkpoint(checkpoint, optimizer, digest)
        try:
            job.load_state(tensors)
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"checkpoint {checkpoint} does not fit this run ({type(e).__name__}): "
                            f"{start_over(checkpoint.parent)}") from e
        start, seconds_before = info["step"], info["seconds"]
        extra.update(info["extra"])
    if loop_syncs_gradients(acc):
        broadcast_parameters(params)
    budget = settings.max_minutes * 60 if settings.max_minutes else None
    t0 = last_save = time.time()

    def spent() -> float:
        return seconds_before + time.time() - t0

    def save(step: int) -> None:
        if acc.is_main_process:
            save_checkpoint(checkpoint, job.state(), optimizer, step=step, digest=digest, seconds=spent(), extra=extra)

    recent: deque[float] = deque(maxlen=100)
    bar = _progress_bar(settings.name, settings.steps, start) if settings.progress_bar and acc.is_main_process else None
    log = open(settings.log_file, "a", encoding="utf-8") if settings.log_file and acc.is_main_process else None
    step, reason = start, "done"
    try:
        while step < settings.steps:
            if stop_after is not None and step >= stop_after:
                reason = "stopped"
                break
            if cancel is not None and cancel():
                reason = "cancelled"
                break
            if budget is not None and spent() >= budget:
                reason = "time"
                break
            if lr_at is not None:
                lr = lr_at(step, max(step / settings.steps, spent() / budget if budget else 0.0))
                for group in optimizer.param_groups:
                    group["lr"] = lr
            logs = _one_step(job, optimizer, params, settings, acc, step, checkpoint)
            step += 1
            if hasattr(job, "after_step"):
                logs.update(job.after_step(step, extra) or {})
            if "loss" in logs:
                recent.append(logs["loss"])
            if log:
                log.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in logs.items()}}) + "\n")
                log.flush()  # a killed run keeps every step it logged
            if bar:
                bar[0].update(bar[1], advance=1, loss=logs.get("loss", math.nan))
            if on_step is not None:
                on_step(Progress(step, settings.steps, logs, spent(), getattr(job, "attention_maps", None)))
            by_steps = settings.checkpoint_every and step % settings.checkpoint_every == 0
            by_time = settings.checkpoint_minutes and time.time() - last_save >= 60 * settings.checkpoint_minutes
            if (by_steps or by_time) and step < settings.steps:
                save(step)
                last_save = time.time()
        save(step)
    finally:
        if log:
            log.close()
        if bar:
            bar[0].stop()
    return Outcome(step, settings.steps, reason, spent(), sum(recent) / len(recent) if recent else None, extra)


def _one_step(job, optimizer, params, settings: LoopSettings, acc, step: int, checkpoint: Path) -> dict[str, float]:
    optimizer.zero_grad(set_to_none=True)
    logs: dict[str, float] = {}
    for m in range(settings.grad_accum):
        micro = m * acc.num_processes + acc.process_index
        gen = torch.Generator().manual_seed(step_seed(settings.seed, step, micro) + 1)
        with acc.autocast():
            loss, parts = job.loss(step, micro, gen)
        if not torch.isfinite(loss):
            where = f"; the last good checkpoint is {checkpoint}" if checkpoint.is_file() else ""
            raise TrainingDiverged(f"loss became {loss.item()} at step {step}{where}: lower the learning rate or use fp32")
        acc.backward(loss / settings.grad_accum)
        for k, v in parts.items():
            logs[k] = logs.get(k, 0.0) + v / settings.grad_accum
    if loop_syncs_gradients(acc):
        average_gradients(params, acc.num_processes)
    if settings.max_grad_norm and settings.max_grad_norm > 0:
        acc.clip_grad_norm_(params, settings.max_grad_norm)
    optimizer.step()
    return logs


def _progress_bar(name: str, total: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    p = Bar(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
            TimeRemainingColumn())
    task = p.add_task(name, total=total, completed=start, loss=math.nan)
    p.start()
    return p, task
