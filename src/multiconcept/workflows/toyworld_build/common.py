"""What every stage of the build shares: the log, file writes, the loop, pixels and render pools."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...bundle import atomic_write
from ...training import LoopSettings, Progress, make_accelerator, run


class Log:
    def __init__(self, path: Path, echo: bool):
        self.path, self.echo, self.t0 = path, echo, time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{(time.time() - self.t0) / 60:6.1f}m] {msg}"
        if self.echo:
            print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def write_json(path: Path, data) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))


def replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def warmup_cosine(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine down to 10% of the peak at progress 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the SD / CLIP-here convention."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def render_pool(n: int, rng_key: list[int], sampler, world, masks: bool = False):
    """n scenes of `world` (world.WORLD) as uint8 images plus JSON metadata (what captions need),
    and with masks=True the union of each scene's object masks."""
    rng = np.random.default_rng(rng_key)
    images = np.empty((n, 64, 64, 3), dtype=np.uint8)
    foreground = np.zeros((n, 64, 64), dtype=bool) if masks else None
    meta = []
    for i in range(n):
        s = sampler(rng)
        images[i] = s.image
        if masks:
            foreground[i] = world.foreground(s)
        meta.append(world.meta(s))
    return (images, meta, foreground) if masks else (images, meta)


# ---------------------------------------------------------------- 1. tokenizer


def grid(images: np.ndarray, cols: int = 8, scale: int = 2) -> Image.Image:
    rows = math.ceil(len(images) / cols)
    canvas = np.full((rows * 66, cols * 66, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * 66 + 1: r * 66 + 65, c * 66 + 1: c * 66 + 65] = img
    return Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)


class StageJob:
    """A build stage as a job of the training loop. `loss_of(step)` draws its own
    batch from generators seeded by (build seed, stage, step), as the shipped
    build did, so a rebuild reproduces it; `tensors` is what a checkpoint keeps
    (modules' weights, an EMA copy)."""

    def __init__(self, loss_of, tensors: dict, after_step=None):
        self.loss_of, self.tensors, self.after = loss_of, tensors, after_step

    def loss(self, step: int, micro: int, gen) -> tuple:
        loss = self.loss_of(step)
        return loss, {"loss": loss.item()}

    def state(self) -> dict:
        return {f"{name}.{k}": v for name, m in self.tensors.items() for k, v in _named(m).items()}

    def load_state(self, tensors: dict) -> None:
        with torch.no_grad():
            for name, m in self.tensors.items():
                for k, v in _named(m).items():
                    v.copy_(tensors[f"{name}.{k}"])

    def after_step(self, step: int, extra: dict) -> None:
        if self.after is not None:
            self.after(step, extra)


def _named(m) -> dict:
    return m.state_dict(keep_vars=True) if isinstance(m, torch.nn.Module) else m


def stage_loop(name: str, job: StageJob, optimizer, *, steps: int, max_minutes: float | None, peak_lr: float,
               warmup: int, checkpoint: Path, digest: str, checkpoint_minutes: float, log: Log,
               extra: dict | None = None) -> tuple[dict, dict]:
    """One stage through the training loop: warm-up then cosine learning rate,
    a checkpoint every `checkpoint_minutes`, a log line every 100 steps.
    Returns the stage's training summary and its extra state."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    settings = LoopSettings(steps=steps, max_grad_norm=1.0, checkpoint_every=0, checkpoint_minutes=checkpoint_minutes,
                            max_minutes=max_minutes, name=name)
    if checkpoint.is_file():
        log(f"{name}: resuming from {checkpoint}")
    window: deque = deque(maxlen=100)
    t0 = [time.time(), None]

    def report(p: Progress) -> None:
        window.append(p.logs["loss"])
        t0[1] = t0[1] if t0[1] is not None else p.step - 1
        if p.step % 100 == 0:
            per_step = (time.time() - t0[0]) / max(1, p.step - t0[1])
            left = (p.total - p.step) * per_step
            if max_minutes:
                left = min(left, max_minutes * 60 - p.seconds)
            log(f"{name} step {p.step}/{p.total} loss {np.mean(window):.4f} {per_step:.2f} s/step "
                f"lr {optimizer.param_groups[0]['lr']:.2e} ~{left / 60:.0f} min left")

    outcome = run(job, optimizer, params, settings, checkpoint=checkpoint, digest=digest, resume=True,
                  accelerator=make_accelerator("no", device="cpu"), extra=extra, on_step=report,
                  lr_at=lambda step, progress: warmup_cosine(step, progress, peak_lr, warmup))
    if outcome.reason == "time":
        log(f"{name}: time cap of {max_minutes:.0f} min reached at step {outcome.steps_done} of {steps}")
    return {"steps": outcome.steps_done, "planned_steps": steps, "stopped_by_time_cap": outcome.reason == "time",
            "train_minutes": round(outcome.seconds / 60, 1), "final_loss_100": outcome.recent_loss}, outcome.extra
