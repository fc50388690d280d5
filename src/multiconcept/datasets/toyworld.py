"""ToyWorld as a builder source, and stand-in stages that answer from the renderer's ground truth.

`write_toyworld_source` writes img2dataset-style tars (png, txt, json) of `toyworld.subject_dataset`
scenes; each json carries the scene's ground truth (caption, and per subject its kind, box and exact
visible mask as run lengths). The stand-ins (`--captioner toyworld` etc.) read it back, so the filters run on real masks
and the pipeline can be tested and timed where no trained captioner, detector or segmenter exists.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..bundle import atomic_write
from ..toyworld.render import BACKGROUNDS, BODY_COLOURS, KINDS
from .records import Entity, Item

# what a ToyWorld caption is made of: the vocabulary tiny captioners and the noun stage are tested with
CAPTION_WORDS = (*BODY_COLOURS, *BACKGROUNDS)
NOUNS = KINDS


def runs(mask: np.ndarray) -> list[int]:
    """Row-major run lengths, alternating background/foreground, starting with background."""
    flat = np.concatenate([[False], mask.ravel(), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    lengths = np.diff(np.concatenate([[0], edges, [mask.size]]))
    return [int(v) for v in lengths]


def from_runs(counts: list[int], shape) -> np.ndarray:
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(shape)


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_toyworld_source(folder: str | Path, n: int, seed: int = 0, per_shard: int = 1000,
                          appearance: bool = True) -> list[Path]:
    """n scenes in ceil(n / per_shard) tars named 00000.tar, 00001.tar, ...; scenes of shard i come from
    seed + i, so a source of any size is written shard by shard in flat memory. appearance: captions say
    each subject's body colour (else kinds only; the same images either way)."""
    from ..toyworld.scenes import subject_dataset

    folder = Path(folder)
    paths = []
    for s, start in enumerate(range(0, n, per_shard)):
        records = subject_dataset(min(per_shard, n - start), seed + s, colour_p=1.0 if appearance else 0.0)

        def write(tmp, records=records, s=s):
            with tarfile.open(tmp, "w") as tf:
                for i, (scene, subjects) in enumerate(records):
                    key = f"{s:05d}{i:05d}"
                    buf = io.BytesIO()
                    Image.fromarray(scene.image).save(buf, format="PNG")
                    truth = {"caption": scene.caption, "objects": [
                        {"noun": x.creature.kind, "box": list(x.box), "mask": runs(x.mask)} for x in subjects]}
                    _member(tf, f"{key}.png", buf.getvalue())
                    _member(tf, f"{key}.txt", scene.caption.encode())
                    _member(tf, f"{key}.json", json.dumps({"toyworld": truth}).encode())

        paths.append(atomic_write(folder / f"{s:05d}.tar", write))
    return paths


# ---------------------------------------------------------------- stand-in stages

def _truth(it: Item) -> dict:
    if "toyworld" not in it.meta:
        raise ValueError("no ToyWorld ground truth in this sample's json: the toyworld stages read sources "
                         "written by write_toyworld_source")
    return it.meta["toyworld"]


def ground_truth_captions(items: list[Item]) -> list[str]:
    return [_truth(it)["caption"] for it in items]


def ground_truth_nouns(items: list[Item]) -> list[list[str]]:
    return [list(dict.fromkeys(o["noun"] for o in _truth(it)["objects"])) for it in items]


def ground_truth_boxes(items: list[Item]) -> list[list[Entity]]:
    """Every object's exact box; score 1 (the renderer is certain)."""
    return [[Entity(o["noun"], tuple(float(v) for v in o["box"]), 1.0) for o in _truth(it)["objects"]] for it in items]


def ground_truth_masks(items: list[Item]) -> list[None]:
    for it in items:
        w, h = it.size
        by_box = {tuple(float(v) for v in o["box"]): o for o in _truth(it)["objects"]}
        for e in it.entities:
            e.mask = from_runs(by_box[tuple(e.box)]["mask"], (h, w))
            e.mask_score = 1.0
    return [None] * len(items)
