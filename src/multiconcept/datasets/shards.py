"""What the builder writes, and the reader that training uses.

OUT/
  shards/NAME.tar      WebDataset samples: KEY.jpg|png (the source's bytes), KEY.txt (caption),
                       KEY.json {"caption", "source_caption", "width", "height", "entities":
                                 [{"label", "box": [x0, y0, x1, y1], "score", "mask_score", "mask"}]},
                       KEY.mask_I.png per entity (white = the entity) unless masks are COCO RLE
                       (then "mask" is {"size": [h, w], "counts": str} inside the json)
  parts/NAME.parquet   that shard's index rows;  parts/NAME.json  its tally and rejects (written last:
                       its presence marks the shard finished, so a re-run skips it)
  index.parquet        one row per entity over all shards (shard, key, entity, label, box, score, ...)
  shards.json          each finished shard's name, sample count and bytes: what a streaming reader needs to
                       find sample i and to check the shards without opening them (datasets.stream)
  stats.json           per filter: images or entities in / dropped / kept; per stage: images/s
  rejects.jsonl        one line per image that could not be read or failed a stage, with the reason
Every file is written to a temporary name and renamed, so a killed run leaves no half shard.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from PIL import Image

from ..bundle import atomic_write
from .records import Entity, Item, decode_image, mask_from_png, mask_from_rle, mask_png, mask_rle
from .tars import tar_samples

MASK_FORMATS = ("png", "rle")
INDEX_COLUMNS = ("shard", "key", "entity", "label", "x0", "y0", "x1", "y1", "score", "mask_score", "mask_area",
                 "width", "height", "caption")


def _index_schema():
    import pyarrow as pa

    return pa.schema([("shard", pa.string()), ("key", pa.string()), ("entity", pa.int32()), ("label", pa.string()),
                      ("x0", pa.float32()), ("y0", pa.float32()), ("x1", pa.float32()), ("y1", pa.float32()),
                      ("score", pa.float32()), ("mask_score", pa.float32()), ("mask_area", pa.int64()),
                      ("width", pa.int32()), ("height", pa.int32()), ("caption", pa.string())])


class ShardWriter:
    """Appends kept items to OUT/shards/NAME.tar as they come (a temp file until `close`)."""

    def __init__(self, out: Path, name: str, mask_format: str = "png"):
        self.out, self.name, self.mask_format = Path(out), name, mask_format
        (self.out / "shards").mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tar.tmp", dir=self.out / "shards")
        os.close(fd)
        self.tar = tarfile.open(self.tmp, "w")
        self.rows: dict[str, list] = {c: [] for c in INDEX_COLUMNS}
        self.samples = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, it: Item) -> None:
        w, h = it.size
        ents = []
        for i, e in enumerate(it.entities):
            d = {"label": e.label, "box": list(e.box), "score": e.score, "mask_score": e.mask_score}
            if self.mask_format == "rle":
                d["mask"] = mask_rle(e.mask)
            else:
                d["mask"] = f"{it.key}.mask_{i}.png"
            ents.append(d)
            for c, v in zip(INDEX_COLUMNS, (self.name, it.key, i, e.label, *e.box, e.score, e.mask_score,
                                            int(e.mask.sum()), w, h, it.caption)):
                self.rows[c].append(v)
        self._add(f"{it.key}.{it.ext}", it.data)
        self._add(f"{it.key}.txt", it.caption.encode())
        self.samples += 1
        meta = {"caption": it.caption, "source_caption": it.source_caption, "width": w, "height": h, "entities": ents}
        self._add(f"{it.key}.json", json.dumps(meta).encode())
        if self.mask_format == "png":
            for i, e in enumerate(it.entities):
                self._add(f"{it.key}.mask_{i}.png", mask_png(e.mask))

    def close(self, tally: dict, rejects: list[dict]) -> None:
        """Shard, then index part, then the part's json (the 'finished' mark), each atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.tar.close()
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.out / "shards" / f"{self.name}.tar")
        table = pa.table(self.rows, schema=_index_schema())
        atomic_write(self.out / "parts" / f"{self.name}.parquet", lambda tmp: pq.write_table(table, tmp))
        atomic_write(self.out / "parts" / f"{self.name}.json",
                     lambda tmp: Path(tmp).write_text(json.dumps({"tally": tally, "rejects": rejects,
                                                                  "samples": self.samples})))

    def abort(self) -> None:
        self.tar.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def finished(out: Path, name: str) -> bool:
    return (Path(out) / "parts" / f"{name}.json").is_file()


def merge_index(out: Path, names: list[str]) -> Path:
    """index.parquet from the shards' parts, one part in memory at a time."""
    import pyarrow.parquet as pq

    def write(tmp):
        with pq.ParquetWriter(tmp, _index_schema()) as w:
            for n in names:
                w.write_table(pq.read_table(Path(out) / "parts" / f"{n}.parquet"))

    return atomic_write(Path(out) / "index.parquet", write)


SHARD_TABLE = "shards.json"
SHARD_TABLE_FORMAT = "multiconcept-shards/1"


def write_shard_table(out: Path, names: list[str]) -> Path:
    """shards.json from the finished shards (parts written before sample counts were kept: counted from the tar)."""
    out = Path(out)
    rows = []
    for n in names:
        tar = out / "shards" / f"{n}.tar"
        samples = json.loads((out / "parts" / f"{n}.json").read_text()).get("samples")
        if samples is None:
            with open(tar, "rb") as f:
                samples = sum(1 for _ in tar_samples(f))
        rows.append({"name": n, "samples": samples, "bytes": tar.stat().st_size})
    table = {"format": SHARD_TABLE_FORMAT, "samples": sum(r["samples"] for r in rows), "shards": rows}
    return atomic_write(out / SHARD_TABLE, lambda tmp: Path(tmp).write_text(json.dumps(table, indent=0)))


# ---------------------------------------------------------------- reading

@dataclass
class SubjectSample:
    key: str
    shard: str
    caption: str
    data: bytes = field(repr=False)
    entities: list[Entity] = field(default_factory=list)

    def image(self) -> Image.Image:
        return decode_image(self.data)


def read_shard(path: str | Path) -> Iterator[SubjectSample]:
    """Samples of one shard this builder wrote, streamed, masks decoded to bool arrays."""
    path = Path(path)
    with open(path, "rb") as f:
        for key, parts in tar_samples(f):
            yield parse_sample(path.stem, key, parts)


def parse_sample(shard: str, key: str, parts: dict[str, bytes]) -> SubjectSample:
    """A sample's members as the builder writes them; a missing member or a corrupt JSON or mask raises
    (KeyError, ValueError, OSError, StopIteration: a damaged sample)."""
    meta = json.loads(parts["json"])
    data = next(v for k, v in parts.items() if k in ("jpg", "jpeg", "png", "webp", "bmp"))
    ents = []
    for e in meta["entities"]:
        m = e["mask"]
        mask = mask_from_rle(m) if isinstance(m, dict) else mask_from_png(parts[m.split(".", 1)[1]])
        ents.append(Entity(e["label"], tuple(e["box"]), e["score"], mask, e.get("mask_score")))
    return SubjectSample(key, shard, meta["caption"], data, ents)


def read_shards(out: str | Path) -> Iterator[SubjectSample]:
    """Every sample of a built dataset, shard by shard (finished shards only)."""
    out = Path(out)
    for p in sorted((out / "shards").glob("*.tar")):
        if finished(out, p.stem):
            yield from read_shard(p)
