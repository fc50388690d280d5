"""train-encoder's data: where subject-annotated images come from, as `Record`s.

`--data toyworld` draws fresh ToyWorld scenes (`toyworld.subject_scene`) every
step; a folder `multiconcept dataset build` wrote (its URL, or WebDataset tars with the same keys) is
streamed (`StreamSubjects`); any other folder holds:

    DIR/subjects.jsonl    one JSON object per line (paths relative to DIR):
      {"image": "000001.png",
       "caption": "a robot on the left and a bird on the right on a gray background",
       "subjects": [{"label": "robot", "mask": "000001_0.png", "box": [x0, y0, x1, y1]},
                    {"label": "bird",  "mask": "000001_1.png"}]}

`label` is the subject's noun as written in the caption (its first unused
whole-word occurrence gets the image marker); `mask` is white-on-black at the
image's size; `box` (x1/y1 exclusive) is optional, default the mask's extent.
`write_subject_folder` writes this format.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..bundle import atomic_write
from ..data import load_image, load_mask
from ..datasets.loader import MicroBatchLoader, Prepare, Schedule
from ..datasets.shards import SHARD_TABLE, parse_sample
from ..datasets.stream import is_tar_spec, is_url, open_stream
from ..errors import UserError, is_dir, require
from ..prompts import find_word_spans

MANIFEST = "subjects.jsonl"
log = logging.getLogger("multiconcept")


@dataclass
class Annotation:
    label: str  # the subject's noun in the caption
    mask: np.ndarray  # bool H W
    box: tuple[int, int, int, int] | None = None


@dataclass
class Record:
    image: np.ndarray  # uint8 H W 3
    caption: str
    subjects: list[Annotation]


class ToyWorldSubjects:
    """Fresh ToyWorld scenes on every draw (`toyworld.subject_scene`): one or two subjects, of one kind in
    a good share of pairs, placed freely in half the scenes (the base's layouts otherwise, overlaps
    included); captions name kinds, and places in only part of the base-layout scenes, never a part:
    whose robot it is, only the subject images can say."""

    name = "toyworld (captions name kinds only)"

    def draw(self, n: int, seed: int) -> list[Record]:
        from ..toyworld import subject_dataset

        return [Record(scene.image, scene.caption, [Annotation(s.creature.kind, s.mask, tuple(s.box)) for s in subjects])
                for scene, subjects in subject_dataset(n, seed)]


class FolderSubjects:
    """The `subjects.jsonl` folder format (module docstring); images load when drawn."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.name = str(self.folder.resolve())
        path = self.folder / MANIFEST
        require(path.is_file(), f"{self.folder} has no {MANIFEST}: write one JSON record per line "
                                "(see `multiconcept train-encoder --help`), or pass --data toyworld")
        self.rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                self.rows.append(self._check(line, n, path))
        require(bool(self.rows), f"{path} holds no records: add one JSON object per line")

    def _check(self, line: str, n: int, path: Path) -> dict:
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not JSON ({e.msg}): write one JSON object per line") from e
        require(isinstance(row, dict) and isinstance(row.get("image"), str) and isinstance(row.get("caption"), str)
                and isinstance(row.get("subjects"), list),
                f"{where} needs \"image\", \"caption\" and a \"subjects\" list")
        require((self.folder / row["image"]).is_file(), f"{where}: image {row['image']} does not exist in {self.folder}")
        for s in row["subjects"]:
            require(isinstance(s, dict) and isinstance(s.get("label"), str) and isinstance(s.get("mask"), str),
                    f"{where}: each subject needs a \"label\" and a \"mask\"")
            require((self.folder / s["mask"]).is_file(), f"{where}: mask {s['mask']} does not exist in {self.folder}")
            require(bool(find_word_spans(row["caption"], s["label"])),
                    f"{where}: label {s['label']!r} is not a word of the caption {row['caption']!r}: use the caption's noun")
            box = s.get("box")
            require(box is None or (isinstance(box, list) and len(box) == 4), f"{where}: box must be [x0, y0, x1, y1]")
        return row

    def load(self, i: int) -> Record:
        row = self.rows[i]
        img = load_image(self.folder / row["image"])
        subjects = [Annotation(s["label"], np.asarray(load_mask(self.folder / s["mask"], img.size)) > 127,
                               tuple(s["box"]) if s.get("box") else None) for s in row["subjects"]]
        return Record(np.asarray(img), row["caption"], subjects)

    def draw(self, n: int, seed: int) -> list[Record]:
        rng = random.Random(seed)
        return [self.load(rng.randrange(len(self.rows))) for _ in range(n)]


def write_subject_folder(records, folder: str | Path) -> Path:
    """Records → the folder format."""
    from ..toyworld import save_png

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, r in enumerate(records):
        save_png(np.asarray(r.image), folder / f"{i:06d}.png")
        subs = []
        for j, s in enumerate(r.subjects):
            save_png(np.asarray(s.mask).astype(bool), folder / f"{i:06d}_{j}.png")
            subs.append({"label": s.label, "mask": f"{i:06d}_{j}.png", **({"box": list(s.box)} if s.box is not None else {})})
        lines.append(json.dumps({"image": f"{i:06d}.png", "caption": r.caption, "subjects": subs}))
    atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return folder


def subject_record(shard: str, key: str, parts: dict[str, bytes]) -> Record:
    """A streamed sample as a `Record`; raises on anything damaged (datasets.stream replaces the sample)."""
    s = parse_sample(shard, key, parts)
    image = np.asarray(s.image())
    subjects = [Annotation(e.label, e.mask, tuple(e.box)) for e in s.entities if e.mask is not None]
    if not subjects:
        raise ValueError("no subject with a mask")
    for a in subjects:
        if a.mask.shape != image.shape[:2]:
            raise ValueError(f"the mask of {a.label!r} is {a.mask.shape[1]}x{a.mask.shape[0]}, the image "
                             f"{image.shape[1]}x{image.shape[0]}")
    return Record(image, s.caption, subjects)


class StreamSubjects:
    """A built dataset (a folder or its URL) or WebDataset tars, streamed (datasets.stream): micro-batch
    (step, micro) holds the samples the loop's numbering gives it (datasets.loader), made by `workers`
    DataLoader processes. Its position (step, epoch, index) is part of the checkpoint, so a resumed run
    sees exactly the batches an uninterrupted one would have."""

    def __init__(self, spec: str, seed: int = 0):
        self.stream = open_stream(spec, seed)
        self.name = f"shards {spec if is_url(spec) or is_tar_spec(spec) else Path(spec).resolve()}"
        self.anchor, self.steps_done = (0, 0), 0  # (step, sample of the run where that step begins)
        self.skipped: list[str] = []  # damaged samples this process replaced since the last step
        self.loader: MicroBatchLoader | None = None
        self.sample_log = None

    def start(self, prepare: Prepare, batch_size: int, grad_accum: int, processes: int, rank: int, workers: int = 0,
              sample_log: Path | None = None) -> None:
        """Before the first step. `sample_log`: append {step, micro, epoch, index, keys} per micro-batch there."""
        self.prepare, self.workers, self.main = prepare, workers, rank == 0
        self.layout = (batch_size, grad_accum, processes, rank)
        self.sample_log = open(sample_log, "a", encoding="utf-8") if sample_log else None

    def micro_batch(self, step: int, micro: int) -> dict:
        if self.loader is None:  # built at the first step, after a checkpoint (if any) set the anchor
            schedule = Schedule(*self.layout, *self.anchor)
            self.loader = MicroBatchLoader(self.stream, schedule, subject_record, self.prepare, self.workers)
        item = self.loader.get(step, micro)
        for s in item["samples"]:
            if self.main:  # the others' are counted in the log, not spoken
                for what in s.skipped:
                    log.warning(f"skipped a damaged sample, {what}")
            self.skipped += s.skipped
        if self.sample_log:
            first = item["samples"][0]
            self.sample_log.write(json.dumps({"step": step, "micro": micro, "epoch": first.epoch, "index": first.index,
                                              "keys": [s.key for s in item["samples"]]}) + "\n")
            self.sample_log.flush()
        return item["batch"]

    def state(self) -> dict[str, torch.Tensor]:
        """The data position after the steps done: (step, epoch, index in the epoch's order)."""
        step, sample = self.anchor
        if self.loader is not None:
            step, sample = self.steps_done, self.loader.schedule.first_sample(self.steps_done, 0)
        return {"data_position": torch.tensor([step, *self.stream.position(sample)], dtype=torch.int64)}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        step, epoch, index = (int(v) for v in tensors["data_position"])
        self.anchor, self.steps_done = (step, epoch * self.stream.total + index), step

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
        if self.sample_log:
            self.sample_log.close()


def open_data(spec: str, seed: int = 0):
    """'toyworld'; a built dataset (folder or URL) or WebDataset tars, streamed; or a subjects.jsonl folder."""
    if spec == "toyworld":
        return ToyWorldSubjects()
    if is_url(spec) or is_tar_spec(spec):
        return StreamSubjects(spec, seed)
    folder = Path(spec)
    require(is_dir(folder), f"--data {spec} is neither 'toyworld', a folder, a URL nor .tar shards: pass one of them")
    if (folder / MANIFEST).is_file():
        return FolderSubjects(folder)
    if (folder / SHARD_TABLE).is_file() or (folder / "shards").is_dir():
        return StreamSubjects(spec, seed)
    raise UserError(f"--data {spec} is neither a built dataset ({SHARD_TABLE} + shards/, from `multiconcept dataset "
                    f"build`) nor a folder with {MANIFEST}: pass one of them, WebDataset tars, or 'toyworld'")
