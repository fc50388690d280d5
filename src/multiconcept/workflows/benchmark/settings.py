"""The benchmark's settings, seed lists and the digests that tell a finished cell from a stale one."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ...errors import UserError, require
from ..generate import SampleSettings

RESULTS_VERSION = 1

@dataclass(frozen=True)
class BenchmarkSettings:
    methods: tuple[str, ...]
    protocol: str = "two-concept"
    base: str | None = None
    steps: int | None = None  # training steps; None = each method's default
    params: tuple[tuple[str, str], ...] = ()  # --param KEY=VALUE for every method
    train_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2, 3)  # image seeds, the same for every prompt
    sample_steps: int = 50
    guidance: float = 6.0
    scheduler: str = "ddim"
    batch_size: int = 4
    clip: str | None = None
    dino: str | None = None
    scale: str = "raw"
    text_prefix: str = ""
    threads: int = 1  # torch threads per job: fixed, so numbers do not depend on the executor
    device: str = "cpu"

    @property
    def sampling(self) -> SampleSettings:
        return SampleSettings(steps=self.sample_steps, guidance=self.guidance, scheduler=self.scheduler,
                              batch_size=self.batch_size)


# a range is expanded into a list: '0-9999999999' would fill the memory before anything else runs;
# 10,000 images per prompt is far past any protocol (the default draws 4)
MAX_SEEDS = 10_000


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2', '0-7' or a mix: '0-3,10'."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if "-" in part:
                a, b = part.split("-", 1)
                require(int(a) <= int(b), f"--seeds range {part!r} runs backwards: write low-high")
                require(int(b) - int(a) < MAX_SEEDS - len(seeds),
                        f"--seeds {text!r} names more than {MAX_SEEDS} seeds: give fewer (e.g. 0-7)")
                seeds.extend(range(int(a), int(b) + 1))
            elif part:
                seeds.append(int(part))
    except ValueError as e:
        raise UserError(f"--seeds {text!r} is not a list of non-negative integers: write e.g. 0,1,2,3 or 0-7") from e
    require(bool(seeds), f"--seeds {text!r} names no seed: write e.g. 0,1,2,3 or 0-7")
    require(len(set(seeds)) == len(seeds), f"--seeds {text!r} repeats a seed: give each seed once")
    return tuple(seeds)


def seed_runs(seeds: Sequence[int], batch: int) -> list[tuple[int, ...]]:
    """Batches of consecutive seeds (generate draws seed, seed+1, ...); the
    first seed alone, since its batch also records the attention heatmaps."""
    runs: list[list[int]] = [[seeds[0]]]
    current: list[int] = []
    for s in seeds[1:]:
        if current and (s != current[-1] + 1 or len(current) >= batch):
            runs.append(current)
            current = []
        current.append(s)
    if current:
        runs.append(current)
    return [tuple(r) for r in runs]


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]
