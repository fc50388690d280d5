"""ToyWorld's samplers and files: the scenes the base model, the evaluator and the benchmarks are made from.

`render` says what the world holds and how a scene is drawn; this module says which scenes are drawn:
the base model's training scenes (personal concepts excluded), the world at large, two-concept sources,
reference sets of one personal concept, and subject datasets for the tuning-free encoders.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .render import (
    BACKGROUNDS,
    BASE_PATTERNS,
    CLASS_NOUNS,
    COLOURS,
    HELD_OUT_PATTERNS,
    PERSONAL_CONCEPTS,
    POSITION_PHRASES,
    POSITIONS,
    SIZES,
    Appearance,
    LayoutError,
    ObjectSpec,
    PersonalConcept,
    Scene,
    article,
    describe,
    is_personal,
    render_scene,
)

# ---------------------------------------------------------------- samplers

# How the base model's training scenes are laid out. "free": the world's five positions and both
# sizes. "fixed": one large object in the center, or two large ones on the left and right. On a
# single-object set the same recipe learned class -> shape in ~1,200 steps with large centred
# objects and had not by 1,600 with the five positions and two sizes (docs/toyworld.md, How the recipe was found).
BASE_LAYOUTS = ("free", "fixed")
FIXED_LAYOUT = {1: ("center",), 2: ("left", "right")}
# P(1, 2, 3 objects) per layout
LAYOUT_COUNTS = {"free": (0.35, 0.45, 0.2), "fixed": (0.5, 0.5, 0.0)}


def _layout(n: int, rng: np.random.Generator, layout: str = "free") -> list[tuple[str, str]]:
    """(size, position) for n objects; single objects favour the centre, and
    crowded scenes small objects, because three large ones never fit in 64 px."""
    if layout == "fixed":
        if n not in FIXED_LAYOUT:
            raise ValueError(f"the fixed layout has 1 or 2 objects, not {n}")
        return [("large", p) for p in FIXED_LAYOUT[n]]
    if layout != "free":
        raise ValueError(f"unknown layout {layout!r}; choose from {BASE_LAYOUTS}")
    if n == 1:
        pos = rng.choice(list(POSITIONS), p=[0.15, 0.15, 0.15, 0.15, 0.4])
        return [(str(rng.choice(list(SIZES))), str(pos))]
    p_small = 0.5 if n == 2 else 0.8
    positions = rng.choice(list(POSITIONS), n, replace=False)
    return [(str(rng.choice(list(SIZES), p=[p_small, 1 - p_small])), str(p)) for p in positions]


def concept_of(noun: str, appearance: Appearance) -> str | None:
    return next((c.name for c in PERSONAL_CONCEPTS.values()
                 if c.noun == noun and c.appearance == appearance), None)


def _random_appearance(noun: str, rng: np.random.Generator, held_out: bool) -> Appearance:
    patterns = BASE_PATTERNS + (HELD_OUT_PATTERNS if held_out else ())
    while True:
        pattern = str(rng.choice(patterns))
        colour, second = rng.choice(list(COLOURS), 2, replace=False)
        app = Appearance(str(colour), pattern, str(second) if pattern == "two-tone" else None)
        if held_out or not is_personal(noun, app):
            return app


def _random_scene(rng: np.random.Generator, held_out: bool, distinct_nouns: bool = False,
                  layout: str = "free") -> Scene:
    """held_out=True mixes in personal concepts (25% of objects) and held-out patterns."""
    if layout not in BASE_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {BASE_LAYOUTS}")
    n = int(rng.choice([1, 2, 3], p=LAYOUT_COUNTS[layout]))
    background = str(rng.choice(list(BACKGROUNDS)))
    texture = "gradient" if rng.random() < 0.25 else "plain"
    while True:
        specs, used = [], set()
        for size, position in _layout(n, rng, layout):
            free = [x for x in CLASS_NOUNS if not (distinct_nouns and x in used)]
            concepts = [c for c in PERSONAL_CONCEPTS.values() if c.noun in free]
            if held_out and rng.random() < 0.25:
                c = concepts[rng.integers(len(concepts))]
                spec = ObjectSpec(c.noun, c.appearance, size, position, c.name)
            else:
                noun = free[rng.integers(len(free))]
                app = _random_appearance(noun, rng, held_out)
                spec = ObjectSpec(noun, app, size, position, concept_of(noun, app))
            specs.append(spec)
            used.add(spec.noun)
        try:
            scene = render_scene(specs, background, texture, rng)
            break
        except LayoutError:
            continue
    scene.caption = describe(scene.objects, background, rng)
    return scene


def base_training_scene(rng: np.random.Generator, layout: str = "free") -> Scene:
    """A scene for the base model: base patterns only, never a personal concept.
    layout="fixed": half single objects in the center, half pairs on the left and right."""
    return _random_scene(rng, held_out=False, layout=layout)


def world_scene(rng: np.random.Generator) -> Scene:
    """Any appearance, personal concepts included: for the VAE and the evaluator."""
    return _random_scene(rng, held_out=True)


def _concept(name: str) -> PersonalConcept:
    if name not in PERSONAL_CONCEPTS:
        raise ValueError(f"unknown concept {name!r}; choose from {sorted(PERSONAL_CONCEPTS)}")
    return PERSONAL_CONCEPTS[name]


def left_to_right(objects: Sequence) -> list:
    """Objects (SceneObjects or their scene.json dicts) in the order ToyWorld's captions name them:
    left to right. The base draws the first-named object on the left, so a concept's token must
    follow that order, or the left concept's look is taught to the right one's token."""
    return sorted(objects, key=lambda o: (o["box"] if isinstance(o, dict) else o.box)[0])


def two_concept_scene(concept_a: str, concept_b: str, seed: int) -> Scene:
    """One image holding two personal concepts side by side (the DisenDiff /
    Break-A-Scene input). objects[0] is concept_a, objects[1] concept_b."""
    a, b = _concept(concept_a), _concept(concept_b)
    if concept_a == concept_b:
        raise ValueError("two_concept_scene needs two different concepts")
    rng = np.random.default_rng(seed)
    # side by side, as the base model's two-object scenes are (its "fixed" layout)
    pair = [("left", "right"), ("right", "left")][rng.integers(2)]
    background = str(rng.choice(list(BACKGROUNDS)))
    specs = [ObjectSpec(c.noun, c.appearance, "large", p, c.name) for c, p in zip((a, b), pair)]
    scene = render_scene(specs, background, "plain", rng)
    template = (f"a {{a}} {POSITION_PHRASES[pair[0]]} and a {{b}} {POSITION_PHRASES[pair[1]]} "
                f"on {article(background)} {background} background")
    scene.caption_parts = {"template": template, "a": a.noun, "b": b.noun}
    return scene


def concept_reference_set(concept: str, n: int, seed: int, layout: str = "fixed") -> list[Scene]:
    """n single-object images of one concept on varied backgrounds; layout="fixed" draws it
    large and centred, as the base's single objects are; "free" varies position and size."""
    if layout not in BASE_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {BASE_LAYOUTS}")
    c = _concept(concept)
    rng = np.random.default_rng(seed)
    positions = rng.permutation(list(POSITIONS))
    scenes = []
    for i in range(n):
        position = "center" if layout == "fixed" else str(positions[i % len(positions)])
        size = "large" if layout == "fixed" or rng.random() < 0.7 else "small"
        background = str(rng.choice(list(BACKGROUNDS)))
        texture = "gradient" if rng.random() < 0.25 else "plain"
        scene = render_scene([ObjectSpec(c.noun, c.appearance, size, position, c.name)],
                             background, texture, rng)
        scene.caption_parts = {"template": f"a {{a}} {POSITION_PHRASES[position]} on "
                                           f"{article(background)} {background} background",
                               "a": c.noun}
        scenes.append(scene)
    return scenes


@dataclass
class Subject:
    label: str  # the class noun, as written in the caption
    box: tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False)
    crop: np.ndarray = field(repr=False)  # box crop, pixels outside the mask set to white


@dataclass
class SubjectRecord:
    image: np.ndarray = field(repr=False)
    caption: str
    subjects: list[Subject]


def masked_crop(image: np.ndarray, mask: np.ndarray, box: Sequence[int], fill=(255, 255, 255)) -> np.ndarray:
    x0, y0, x1, y1 = box
    crop = image[y0:y1, x0:x1].copy()
    crop[~mask[y0:y1, x0:x1]] = fill
    return crop


def subject_dataset(n: int, seed: int, include_held_out: bool = False, layout: str = "free",
                    appearance: bool = True) -> list[SubjectRecord]:
    """Records for tuning-free (FastComposer-style) training. Nouns are distinct
    within a record so each label names one subject; the caption is full detail,
    or with appearance=False says no subject's colour or pattern (then only the
    subject crops can tell them, as "a man" does not tell whose face: the
    caption a tuning-free encoder must learn from, or it learns to ignore the crops).
    layout="fixed": the base's layouts (one centred object or a left/right pair)."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        scene = _random_scene(rng, include_held_out, distinct_nouns=True, layout=layout)
        caption = describe(scene.objects, scene.background, appearance=appearance)
        subjects = [Subject(o.noun, o.box, o.mask, masked_crop(scene.image, o.mask, o.box))
                    for o in scene.objects]
        records.append(SubjectRecord(scene.image, caption, subjects))
    return records


# ---------------------------------------------------------------- files

def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Atomic PNG write; a bool array becomes a white-on-black mask."""
    path = Path(path)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def write_concept_folder(concept: str, folder: str | Path, n: int = 4, seed: int = 0) -> list[tuple[Path, Path]]:
    """Reference images of one concept: NN.png + NN_mask.png (white = object) + scenes.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = concept_reference_set(concept, n, seed)
    pairs = [(save_png(s.image, folder / f"{i:02d}.png"), save_png(s.objects[0].mask, folder / f"{i:02d}_mask.png"))
             for i, s in enumerate(scenes)]
    (folder / "scenes.json").write_text(json.dumps([s.to_dict() for s in scenes], indent=1))
    return pairs


def write_two_concept_folder(concept_a: str, concept_b: str, folder: str | Path, seed: int = 0) -> Scene:
    """image.png + <concept>_mask.png for both concepts + scene.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scene = two_concept_scene(concept_a, concept_b, seed)
    save_png(scene.image, folder / "image.png")
    for o in scene.objects:
        save_png(o.mask, folder / f"{o.concept}_mask.png")
    (folder / "scene.json").write_text(json.dumps(scene.to_dict(), indent=1))
    return scene
