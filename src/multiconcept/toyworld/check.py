"""An analytic checker for ToyWorld images: which shapes of which colours are
in a 64×64 image, measured from pixels alone (no learned model), so the base
model and every method can be scored without trusting another network.

Background = the nearest background colour to the median border pixel;
objects = connected components of pixels far from it; colour = majority vote
of the component's saturated pixels over the palette and its shades; class =
best IoU between the component's mask and renders of each class after both
are cropped to their box and resampled to a fixed grid (scale-normalised).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

from .render import BACKGROUNDS, CLASS_NOUNS, COLOURS, IMAGE_SIZE, shade, shape_mask
from .scenes import base_training_scene

FOREGROUND_DISTANCE = 48.0  # RGB distance from the background; gradients stay within ±10
MIN_AREA = 12  # pixels; generated speckles below this are not objects
GRID = 20  # side of the scale-normalised mask
MIN_SATURATION = 0.3  # pixels below this (grey, white highlights) do not vote on colour

_PROTOTYPES = np.array([c for rgb in COLOURS.values() for c in (rgb, shade(rgb))], dtype=np.float32)
_PROTOTYPE_NAMES = [name for name in COLOURS for _ in range(2)]


@dataclass
class Detection:
    noun: str
    colour: str
    colour_fractions: dict[str, float]  # share of voting pixels per colour
    box: tuple[int, int, int, int]
    area: int
    shape_scores: dict[str, float] = field(repr=False)  # IoU with each class template
    mask: np.ndarray = field(repr=False, default=None)


@dataclass
class Analysis:
    background: str
    objects: list[Detection]


def _components(fg: np.ndarray) -> np.ndarray:
    """4-connected labels (0 = none) by min-label propagation; fine at 64×64."""
    h, w = fg.shape
    big = h * w + 1
    labels = np.where(fg, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        p = np.pad(labels, 1, constant_values=big)
        nxt = np.minimum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        nxt = np.where(fg, nxt, big)
        if np.array_equal(nxt, labels):
            return np.where(fg, labels, 0)
        labels = nxt


def _normalise(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1].astype(np.float32)
    small = Image.fromarray(crop * 255).resize((GRID, GRID), Image.BILINEAR)
    return np.asarray(small) > 127


@lru_cache(maxsize=1)
def _templates() -> dict[str, np.ndarray]:
    """Each class rendered at every radius and sub-pixel offset the renderer uses."""
    out = {}
    for noun in CLASS_NOUNS:
        out[noun] = np.stack([_normalise(shape_mask(noun, 32 + dx, 32 + dy, r))
                              for r in range(6, 16) for dx in (0, 0.5) for dy in (0, 0.5)])
    return out


def _saturation(rgb: np.ndarray) -> np.ndarray:
    mx, mn = rgb.max(-1), rgb.min(-1)
    return (mx - mn) / np.maximum(mx, 1)


def classify_shape(mask: np.ndarray) -> dict[str, float]:
    norm = _normalise(mask)
    scores = {}
    for noun, t in _templates().items():
        inter = (t & norm).sum((1, 2))
        union = (t | norm).sum((1, 2))
        scores[noun] = float((inter / union).max())
    return scores


def classify_colour(pixels: np.ndarray) -> dict[str, float]:
    """Fraction of saturated pixels nearest each palette colour (or its shade)."""
    sat = pixels[_saturation(pixels) >= MIN_SATURATION]
    if len(sat) == 0:
        return {}
    nearest = ((sat[:, None, :] - _PROTOTYPES[None]) ** 2).sum(-1).argmin(1)
    names, counts = np.unique(np.array(_PROTOTYPE_NAMES)[nearest], return_counts=True)
    return {str(n): float(c) / len(sat) for n, c in sorted(zip(names, counts), key=lambda x: -x[1])}


def analyse(image) -> Analysis:
    """Background name and the detected objects, largest first."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if rgb.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"analyse expects a {IMAGE_SIZE}x{IMAGE_SIZE} RGB image, got shape {rgb.shape}")
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = min(BACKGROUNDS, key=lambda n: np.sum((np.array(BACKGROUNDS[n]) - bg_rgb) ** 2))
    fg = np.sqrt(((rgb - bg_rgb) ** 2).sum(-1)) > FOREGROUND_DISTANCE
    labels = _components(fg)
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    objects = []
    for i in ids[np.argsort(-areas)]:
        mask = labels == i
        area = int(mask.sum())
        if area < MIN_AREA:
            continue
        fractions = classify_colour(rgb[mask])
        scores = classify_shape(mask)
        ys, xs = np.nonzero(mask)
        objects.append(Detection(max(scores, key=scores.get), next(iter(fractions), "none"), fractions,
                                 (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                                 area, scores, mask))
    return Analysis(background, objects)


def check(image, expected_noun: str, expected_colour: str | None) -> dict:
    """Is there an object of the prompted class, of the prompted colour, and both at once?
    expected_colour=None (a prompt without one): any colour counts."""
    if expected_noun not in CLASS_NOUNS or (expected_colour is not None and expected_colour not in COLOURS):
        raise ValueError(f"expected a noun from {CLASS_NOUNS} and a colour from {sorted(COLOURS)}, "
                         f"got {expected_noun!r}, {expected_colour!r}")
    a = analyse(image)
    # The strict reading: the largest detected object is the prompted class (noise or speckle
    # yields many small detections, of which some class matches by chance).
    largest = max(a.objects, key=lambda d: d.area, default=None)
    return {"class_present": any(d.noun == expected_noun for d in a.objects),
            "largest_is_class": largest is not None and largest.noun == expected_noun,
            "colour_present": any(expected_colour in (None, d.colour) for d in a.objects),
            "match": any(d.noun == expected_noun and expected_colour in (None, d.colour) for d in a.objects),
            "background": a.background, "detections": [(d.colour, d.noun) for d in a.objects]}


def checker_accuracy(n_scenes: int = 300, seed: int = 1234) -> dict[str, float]:
    """Accuracy on real base-training renders: each true object is matched to the
    detection that covers most of its mask; a missed object counts as wrong."""
    rng = np.random.default_rng(seed)
    total = colour_ok = shape_ok = background_ok = 0
    for _ in range(n_scenes):
        scene = base_training_scene(rng)
        a = analyse(scene.image)
        background_ok += a.background == scene.background
        for o in scene.objects:
            total += 1
            overlaps = [(d.mask & o.mask).sum() for d in a.objects]
            if not overlaps or max(overlaps) == 0:
                continue
            d = a.objects[int(np.argmax(overlaps))]
            colour_ok += d.colour == o.colour
            shape_ok += d.noun == o.noun
    return {"colour": colour_ok / total, "shape": shape_ok / total,
            "background": background_ok / n_scenes, "objects": total}
