"""The builder on a Ray cluster: Ray Data reads the source and runs the pipeline in a pool of actors.

Ray Data turns the list of units into rows, one per batch of `batch_size` source items (`flat_map`, run on
the cluster, so the source is read where the workers are); `map_batches` hands each row to a
`PipelineWorker` actor, a callable class that loads every model once, in its constructor, and keeps it for
all the batches it is given (`concurrency` actors, each with `num_gpus` / `num_cpus`). Rows come back in
source order (`preserve_order`), so the driver writes each shard exactly as the local path does, from
batches cut the same way: the same input gives the same shards.

Cold start: this module imports no torch (the pipeline is imported in the actors), so the reading tasks'
processes start light, one per actor; each row is a block of its own, so the first batch streams out as
soon as it is done rather than with the rest of its unit. What is left before the first batch is mostly Ray's
own start and the actors' imports and model loading (`benchmarks/bench_dataset.py --parts ray` times both).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import TYPE_CHECKING, Iterator

from ..errors import UserError
from .records import Item, pack, unpack
from .sources import Unit, read_unit

if TYPE_CHECKING:
    from .pipeline import StageSpec

READ_CPUS = 0.1


def unit_batches(unit: Unit, batch_size: int) -> Iterator[list[Item]]:
    """A unit's items in batches; a unit with no items yields one empty batch, so that it is still written."""
    batch: list[Item] = []
    sent = False
    for it in read_unit(unit):
        batch.append(it)
        if len(batch) == batch_size:
            yield batch
            batch, sent = [], True
    if batch or not sent:
        yield batch


def _read_rows(row: dict, batch_size: int) -> Iterator[dict]:
    unit = Unit.from_json(row["unit"])
    for batch in unit_batches(unit, batch_size):
        yield {"unit": unit.name, "payload": pack(batch)}


class PipelineWorker:
    """One per actor: the models load here once."""

    def __init__(self, spec: dict, threads: int | None):
        import torch

        from .pipeline import Pipeline, StageSpec  # here, not at the top: the reading processes need no torch

        if threads:
            torch.set_num_threads(threads)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        self.pipe = Pipeline(StageSpec.from_dict(spec))

    def __call__(self, rows: dict) -> dict:
        payloads = [pack(self.pipe.process(unpack(bytes(p)))) for p in rows["payload"]]
        return {"unit": list(rows["unit"]), "payload": payloads}


def start_ray(address: str | None, cpus: float) -> bool:
    """Connect to the cluster at `address`, or start a local Ray with at least `cpus` CPUs; False if Ray was
    already running in this process (then the caller leaves it running)."""
    import ray

    if ray.is_initialized():
        return False
    try:
        kw = {"address": address} if address else {"num_cpus": max(os.cpu_count() or 1, math.ceil(cpus))}
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, **kw)
    except Exception as e:  # noqa: BLE001 - any failure to reach a cluster is the user's address
        raise UserError(f"could not start or reach Ray ({address or 'local'}): {str(e).splitlines()[0]}: "
                        "check the address, or give --ray without one for a local Ray") from e
    return True


def ray_batches(units: list[Unit], spec: StageSpec, batch_size: int, *, address: str | None, workers: int,
                num_gpus: float, num_cpus: float, threads: int | None) -> Iterator[list[Item]]:
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise UserError("--ray needs Ray Data: pip install 'multiconcept[dataset]' (or drop --ray)") from e
    started = start_ray(address, workers * num_cpus + READ_CPUS * workers)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        # a block per row (one batch of images): a batch reaches the actors, and the driver, as soon as it is
        # read or processed, not once its whole unit is (which held the first batch back by a unit's time)
        ctx.target_max_block_size = 1
        ds = ray.data.from_items([{"unit": u.to_json()} for u in units], override_num_blocks=max(1, len(units)))
        # reading is light: a small CPU share, so the actors' whole CPUs never starve it, and one reader per
        # actor: each reader is a process to start, as the actors start
        ds = ds.flat_map(functools.partial(_read_rows, batch_size=batch_size), num_cpus=READ_CPUS,
                         compute=ray.data.TaskPoolStrategy(size=workers))
        ds = ds.map_batches(PipelineWorker, fn_constructor_kwargs={"spec": spec.to_dict(), "threads": threads},
                            batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=num_gpus, num_cpus=num_cpus,
                            batch_format="numpy")
        for row in ds.iter_rows():
            yield unpack(bytes(row["payload"]))
    finally:
        if started:
            ray.shutdown()
