"""ToyWorld scenes as files the methods and the benchmarks read: a concept's reference folder and a
two-concept source (one image, a mask per concept, the ground truth as JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .scenes import concept, concept_reference_set, two_concept_scene


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Atomic PNG write; a bool array becomes a white-on-black mask."""
    path = Path(path)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def left_to_right(subjects: Sequence) -> list:
    """Subjects (rendered ones, or their scene.json dicts) in the order ToyWorld's captions name them:
    left to right. The base draws the first-named subject on the left, so a concept's token must follow
    that order, or the left concept's look is taught to the right one's token."""
    return sorted(subjects, key=lambda s: s["cx"] if isinstance(s, dict) else s.cx)


def write_concept_folder(name: str, folder: str | Path, n: int = 4, seed: int = 0,
                         background: str | None = None) -> list[tuple[Path, Path]]:
    """Reference images of one personal concept, centred on varied backgrounds (or all on `background`):
    NN.png + NN_mask.png (white = the subject's visible pixels) + scenes.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = concept_reference_set(name, n, seed, background)
    pairs = [(save_png(s.image, folder / f"{i:02d}.png"), save_png(s.subjects[0].mask, folder / f"{i:02d}_mask.png"))
             for i, s in enumerate(scenes)]
    (folder / "scenes.json").write_text(json.dumps([s.to_dict() for s in scenes], indent=1))
    return pairs


def write_reference(name: str, folder: str | Path, seed: int = 31) -> str:
    """One centred reference of a personal concept and its mask, NAME.png and NAME_mask.png in `folder`;
    returns 'IMG:MASK', the form `compose` takes a subject in."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scene = concept_reference_set(name, 1, seed)[0]
    image = save_png(scene.image, folder / f"{name}.png")
    mask = save_png(scene.subjects[0].mask, folder / f"{name}_mask.png")
    return f"{image}:{mask}"


def write_two_concept_folder(concept_a: str, concept_b: str, folder: str | Path, seed: int = 0):
    """One image holding two personal concepts of different kinds side by side (DisenDiff's input):
    image.png, <concept>_mask.png per concept and scene.json (every subject's kind, parts and place)."""
    a, b = concept(concept_a).creature, concept(concept_b).creature
    if a.kind == b.kind:
        raise ValueError(f"a two-concept source needs two kinds, and {concept_a} and {concept_b} are both "
                         f"{a.kind}s: pick concepts of different kinds")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scene = two_concept_scene(concept_a, concept_b, seed)
    save_png(scene.image, folder / "image.png")
    for s in scene.subjects:
        save_png(s.mask, folder / f"{s.concept}_mask.png")
    (folder / "scene.json").write_text(json.dumps(scene.to_dict(), indent=1))
    return scene
