"""Tiny synthetic subject datasets, written by the builder's own writer: for tests and the streaming
benchmarks (a million records in minutes), never for training anything that matters.

Record i: a square of a random colour on a plain background, its mask, the caption "a COLOUR square on a
plain background"; seeded by (seed, i), so any record can be written again alone.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from .records import Entity, Item
from .shards import ShardWriter, merge_index, write_shard_table

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def synthetic_item(i: int, shard: str, size: int = 16, seed: int = 0) -> Item:
    rng = np.random.default_rng([seed, i])
    name = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    image = np.full((size, size, 3), int(rng.integers(90, 170)), np.uint8)
    side = int(rng.integers(size // 4, size // 2 + 1))
    x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
    image[y:y + side, x:x + side] = COLOURS[name]
    mask = np.zeros((size, size), bool)
    mask[y:y + side, x:x + side] = True
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    caption = f"a {name} square on a plain background"
    entity = Entity("square", (x, y, x + side, y + side), 0.9, mask, 0.95)
    return Item(key=f"{i:09d}", unit=shard, source="synthetic", data=buf.getvalue(), ext="png", caption=caption,
                entities=[entity], size=(size, size))


def write_synthetic_shard(out: Path, name: str, start: int, stop: int, size: int = 16, seed: int = 0) -> str:
    writer = ShardWriter(Path(out), name)
    for i in range(start, stop):
        writer.add(synthetic_item(i, name, size, seed))
    writer.close({}, [])
    return name


def write_synthetic_dataset(out: str | Path, samples: int, per_shard: int = 1000, size: int = 16, seed: int = 0,
                            processes: int = 1) -> Path:
    """OUT as `multiconcept dataset build` writes it (shards/, parts/, index.parquet, shards.json); its shards
    written by `processes` processes."""
    from concurrent.futures import ProcessPoolExecutor

    out = Path(out)
    jobs = [(out, f"{s // per_shard:06d}", s, min(s + per_shard, samples), size, seed) for s in range(0, samples, per_shard)]
    if processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            names = list(pool.map(write_synthetic_shard, *zip(*jobs)))
    else:
        names = [write_synthetic_shard(*job) for job in jobs]
    merge_index(out, names)
    write_shard_table(out, names)
    return out
