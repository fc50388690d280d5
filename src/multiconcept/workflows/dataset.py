"""dataset build: images -> caption -> nouns -> boxes -> masks -> filters -> WebDataset shards + Parquet index.

    multiconcept dataset build laion/ --out sdd/ --nouns vocab:nouns.txt          # published models and filters
    multiconcept dataset build laion/ --out sdd/ --ray-address auto --ray-gpus 1 --ray-workers 8  # on a Ray cluster

One output shard per source unit (a tar, or `shard_size` images of a folder or list); a shard is written to
a temporary name while its batches stream through the pipeline and renamed when complete, so memory stays
flat and a killed run resumes at the first unfinished shard. OUT/build.json records the settings; a re-run
with other settings is refused rather than mixing two datasets in one folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..bundle import atomic_write
from ..datasets.on_ray import ray_batches, unit_batches
from ..datasets.pipeline import Pipeline, StageSpec, Tally
from ..datasets.records import Item
from ..datasets.shards import MASK_FORMATS, ShardWriter, finished, merge_index, write_shard_table
from ..datasets.sources import Unit, list_units
from ..errors import UserError, require

FORMAT_VERSION = 1


@dataclass(frozen=True)
class BuildSettings:
    stages: StageSpec = field(default_factory=StageSpec)
    batch_size: int = 8  # images per model call
    shard_size: int = 1000  # images per output shard from a folder or list (a tar keeps its own)
    mask_format: str = "png"  # png | rle (COCO RLE, needs pycocotools)
    threads: int | None = None  # torch CPU threads per process
    ray: bool = False
    ray_address: str | None = None  # None: a local Ray
    ray_workers: int = 2  # actors, each holding every model once
    ray_gpus: float = 0.0  # per actor
    ray_cpus: float = 1.0  # per actor

    def __post_init__(self):
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        require(self.mask_format in MASK_FORMATS, f"--mask-format {self.mask_format!r}: choose png or rle")
        require(self.ray_workers >= 1, f"--ray-workers must be at least 1, got {self.ray_workers}")
        require(self.ray_gpus >= 0 and self.ray_cpus > 0, "--ray-gpus must be >= 0 and --ray-cpus > 0")
        if self.mask_format == "rle":
            try:
                import pycocotools.mask  # noqa: F401
            except ImportError as e:
                raise UserError("--mask-format rle needs pycocotools: pip install pycocotools, or use png") from e

    def output_identity(self, source: str) -> dict:
        """What decides the shards' content: a re-run must match it to resume."""
        return {"format": FORMAT_VERSION, "source": source, "stages": self.stages.to_dict(),
                "shard_size": self.shard_size, "mask_format": self.mask_format}


def _check_out(out: Path, identity: dict) -> None:
    meta = out / "build.json"
    if meta.is_file():
        before = json.loads(meta.read_text())
        if before != identity:
            diff = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
            raise UserError(f"{out} holds a dataset built with other settings ({', '.join(diff)} differ): "
                            "pass a new --out, or the same settings to resume")
    else:
        require(not (out / "shards").exists(), f"{out} has shards but no build.json: pass an empty or new --out")
        atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(identity, indent=1)))


def _local_batches(units: list[Unit], spec: StageSpec, batch_size: int, threads: int | None) -> Iterator[list[Item]]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    pipe = Pipeline(spec)
    for unit in units:
        for batch in unit_batches(unit, batch_size):
            yield pipe.process(batch)


def build(source: str | Path, out: str | Path, settings: BuildSettings = BuildSettings(),
          progress: Callable[[str, Tally], None] | None = None) -> dict:
    """Build (or finish building) OUT from SOURCE; returns stats.json's content."""
    out = Path(out)
    units = list_units(source, settings.shard_size)
    source_id = str(source) if any(c in str(source) for c in "*?[") else str(Path(source).resolve())
    _check_out(out, settings.output_identity(source_id))
    todo = [u for u in units if not finished(out, u.name)]
    if todo:
        if settings.ray:
            batches = ray_batches(todo, settings.stages, settings.batch_size, address=settings.ray_address,
                                  workers=settings.ray_workers, num_gpus=settings.ray_gpus,
                                  num_cpus=settings.ray_cpus, threads=settings.threads)
        else:
            batches = _local_batches(todo, settings.stages, settings.batch_size, settings.threads)
        _write(out, todo, batches, settings.mask_format, progress)
    return _summarise(out, units)


def _write(out: Path, todo: list[Unit], batches: Iterator[list[Item]], mask_format: str, progress) -> None:
    """Batches arrive in unit order; each unit's shard closes when the next unit's first batch arrives."""
    names = [u.name for u in todo]
    pos, writer, tally, rejects, total = -1, None, Tally(), [], Tally()

    def close():
        if writer is not None:
            writer.close(tally.to_dict(), rejects)

    try:
        for batch in batches:
            name = batch[0].unit if batch else names[pos + 1]
            if writer is None or name != writer.name:
                close()
                pos = names.index(name, pos + 1)
                writer, tally, rejects = ShardWriter(out, name, mask_format), Tally(), []
            for it in batch:
                tally.add(it)
                total.add(it)
                if it.reject is not None:
                    rejects.append({"shard": it.unit, "key": it.key, "source": it.source, "reason": it.reject})
                elif it.alive:
                    writer.add(it)
            if progress is not None:
                progress(name, total)
        close()
        writer = None
    finally:
        if writer is not None:
            writer.abort()


def _summarise(out: Path, units: list[Unit]) -> dict:
    done = [u.name for u in units if finished(out, u.name)]
    total = Tally()
    rejects = []
    for n in done:
        part = json.loads((out / "parts" / f"{n}.json").read_text())
        total.merge(Tally(part["tally"]))
        rejects.extend(part["rejects"])
    merge_index(out, done)
    write_shard_table(out, done)
    atomic_write(out / "rejects.jsonl", lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rejects)))
    report = {"shards": len(done), "shards_missing": len(units) - len(done), **total.report()}
    atomic_write(out / "stats.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    return report
