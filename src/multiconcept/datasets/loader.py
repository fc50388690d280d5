"""One process's micro-batches from a shard stream: which samples each holds, and the workers that make them.

The training loop numbers a step's micro-batches over every process: on rank r of P, accumulating A per
step, they are micro = m·P + r for m < A (training/loop.py). Global micro-batch (step − anchor step)·A·P +
micro holds the B samples that start at the anchor's sample + that number × B. So P processes at A = 1 and
one process at A = P see the same samples in the same micro-batches (which is what lets their trained
weights agree), and a run resumed from a checkpoint's data position (the anchor) goes on from exactly
there, even with another number of processes.

Workers: this process's k-th micro-batch is made by DataLoader worker k mod W and the DataLoader hands them
back in that order, so the number of workers changes the speed, never the batches.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import UserError
from .stream import Load, ShardStream

Prepare = Callable[[list, int, int], dict]  # (loaded samples, step, micro) -> the micro-batch the job trains on


@dataclass(frozen=True)
class Schedule:
    batch_size: int
    grad_accum: int
    processes: int = 1
    rank: int = 0
    anchor_step: int = 0
    anchor_sample: int = 0  # sample of the run (counted over epochs) where anchor_step's first micro-batch starts

    def first_sample(self, step: int, micro: int) -> int:
        per_step = self.grad_accum * self.processes
        return self.anchor_sample + ((step - self.anchor_step) * per_step + micro) * self.batch_size

    def micro_batches(self, from_step: int) -> Iterator[tuple[int, int]]:
        """(step, micro) of this process, in the loop's order."""
        for step in itertools.count(from_step):
            for m in range(self.grad_accum):
                yield step, m * self.processes + self.rank


class MicroBatches(IterableDataset):
    """This process's micro-batches from `from_step` on, each {"step", "micro", "samples" (their keys and
    positions; values dropped), "batch": prepare(...)}; a UserError ends it as {"error": message}, so a
    worker's one-line error reaches the command line as one line."""

    def __init__(self, stream: ShardStream, schedule: Schedule, from_step: int, load: Load, prepare: Prepare):
        self.stream, self.schedule, self.from_step, self.load, self.prepare = stream, schedule, from_step, load, prepare

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = itertools.islice(self.schedule.micro_batches(self.from_step), worker, None, workers)
        for step, micro in mine:
            first = self.schedule.first_sample(step, micro)
            try:
                samples = [self.stream.read(i, self.load) for i in range(first, first + self.schedule.batch_size)]
                batch = self.prepare([s.value for s in samples], step, micro)
            except UserError as e:
                yield {"error": str(e)}
                return
            yield {"step": step, "micro": micro, "samples": [replace(s, value=None) for s in samples], "batch": batch}


def _as_is(item):
    return item


class MicroBatchLoader:
    """`get(step, micro)` in the loop's order; with workers, the DataLoader makes the next ones meanwhile."""

    def __init__(self, stream: ShardStream, schedule: Schedule, load: Load, prepare: Prepare, workers: int = 0):
        self.stream, self.schedule, self.load, self.prepare, self.workers = stream, schedule, load, prepare, workers
        self._items: Iterator[dict] | None = None

    def _start(self, step: int) -> None:
        self.close()
        data = MicroBatches(self.stream, self.schedule, step, self.load, self.prepare)
        # its own generator: making the iterator draws a seed, which must not move torch's global one
        loader = DataLoader(data, batch_size=None, num_workers=self.workers, collate_fn=_as_is,
                            prefetch_factor=2 if self.workers else None, generator=torch.Generator())
        self._items = iter(loader)

    def get(self, step: int, micro: int) -> dict:
        for _ in range(2):
            if self._items is None:
                self._start(step)
            for item in self._items:
                if "error" in item:
                    raise UserError(item["error"])
                if (item["step"], item["micro"]) == (step, micro):
                    return item
                if item["step"] > step:
                    break
            self.close()  # asked out of order (the loop never does): begin again at that step
        raise ValueError(f"micro-batch {micro} of step {step} is not one of this process's")

    def close(self) -> None:
        self._items = None  # the DataLoader's iterator stops its workers when it goes
