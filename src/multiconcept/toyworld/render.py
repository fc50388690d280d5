"""ToyWorld scenes: 64×64 renders of coloured shapes with exact ground truth.

A scene is a background plus 1–3 objects; an object is a class noun (the
shape) with an appearance (colour, pattern). Every render carries its
caption, and per object its box and the boolean mask of exactly the pixels
drawn for it. Everything is numpy + PIL and deterministic per seed.

Personal concepts (`PERSONAL_CONCEPTS`) are appearances the base model never
sees: held-out pattern families (checkered, dotted, two-tone) and one
held-out combination of base attributes. `base_training_scene` excludes
them; the VAE and the evaluator are trained on `world_scene`, which includes
them, because neither sees the base model's prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
CLASS_NOUNS = ("circle", "square", "triangle", "star", "heart", "ring", "cross")
# Eight hues with pairwise RGB distance >= ~95, so a blurry generation still
# lands nearest the right one, and whose 55% shade (stripes) stays far from
# every background colour.
COLOURS = {
    "red": (220, 30, 40), "orange": (250, 130, 0), "yellow": (245, 225, 20),
    "green": (30, 170, 50), "cyan": (0, 200, 210), "blue": (30, 70, 230),
    "purple": (140, 40, 210), "pink": (255, 120, 200),
}
SHADE = 0.55  # stripes, checks and dots are the object colour darkened, so hue is kept
# Low-saturation backgrounds, so "non-background" and "coloured" coincide.
BACKGROUNDS = {"white": (235, 235, 235), "gray": (128, 128, 128),
               "black": (25, 25, 25), "beige": (220, 205, 170)}
TEXTURES = ("plain", "gradient")
GRADIENT_AMPLITUDE = 10  # ± per channel; small enough that the checker's background threshold holds
BASE_PATTERNS = ("plain", "striped")
HELD_OUT_PATTERNS = ("checkered", "dotted", "two-tone")
SIZES = {"small": (7, 8), "large": (12, 14)}  # half-extent range in pixels
# (x, y) centres, spread so two small objects fit at adjacent positions.
POSITIONS = {"left": (14, 32), "right": (50, 32), "top": (32, 14),
             "bottom": (32, 50), "center": (32, 32)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
JITTER = 3  # px of random offset around a position's centre
MIN_GAP = 2  # px between object boxes, so objects are separate components


@dataclass(frozen=True)
class Appearance:
    colour: str
    pattern: str = "plain"
    second_colour: str | None = None  # the right half of a two-tone object

    def __post_init__(self):
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; choose from {sorted(COLOURS)}")
        if self.pattern not in BASE_PATTERNS + HELD_OUT_PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}")
        if (self.pattern == "two-tone") != (self.second_colour is not None):
            raise ValueError("second_colour is required for, and only for, pattern 'two-tone'")

    def words(self) -> str:
        """Adjectives in caption order: 'red', 'red striped', 'yellow and blue two-tone'."""
        if self.pattern == "two-tone":
            return f"{self.colour} and {self.second_colour} two-tone"
        return self.colour if self.pattern == "plain" else f"{self.colour} {self.pattern}"


@dataclass(frozen=True)
class PersonalConcept:
    name: str
    noun: str
    appearance: Appearance

    def description(self) -> str:
        return f"{self.appearance.words()} {self.noun}"


PERSONAL_CONCEPTS: dict[str, PersonalConcept] = {c.name: c for c in [
    PersonalConcept("checkered_star", "star", Appearance("orange", "checkered")),
    PersonalConcept("dotted_heart", "heart", Appearance("purple", "dotted")),
    PersonalConcept("twotone_circle", "circle", Appearance("yellow", "two-tone", "blue")),
    PersonalConcept("checkered_square", "square", Appearance("green", "checkered")),
    PersonalConcept("twotone_triangle", "triangle", Appearance("pink", "two-tone", "cyan")),
    PersonalConcept("dotted_cross", "cross", Appearance("red", "dotted")),
    PersonalConcept("twotone_ring", "ring", Appearance("cyan", "two-tone", "red")),
    # Not a new pattern family: a combination of base attributes the base never sees.
    PersonalConcept("striped_yellow_heart", "heart", Appearance("yellow", "striped")),
]}


def is_personal(noun: str, appearance: Appearance) -> bool:
    """True if this object looks like a personal concept or uses a held-out pattern."""
    return appearance.pattern in HELD_OUT_PATTERNS or any(
        c.noun == noun and c.appearance == appearance for c in PERSONAL_CONCEPTS.values())


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass
class SceneObject:
    noun: str
    appearance: Appearance
    size: str  # "small" | "large"
    position: str  # a key of POSITIONS
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive
    mask: np.ndarray = field(repr=False)  # bool (H, W), exactly the pixels drawn for it
    concept: str | None = None  # name in PERSONAL_CONCEPTS, if it is one

    @property
    def colour(self) -> str:
        return self.appearance.colour

    def phrase(self, size: bool = True, pattern: bool = True, position: bool = True, colour: bool = True) -> str:
        """'a small red striped star on the left' with optional parts left out
        (without colour: 'a small striped star', 'a two-tone circle', 'a star')."""
        words = [self.size] if size else []
        if colour:
            words.append(self.appearance.words() if pattern else self.appearance.colour)
        elif pattern and self.appearance.pattern != "plain":
            words.append(self.appearance.pattern)
        words.append(self.noun)
        text = f"{article(words[0])} {' '.join(words)}"
        return f"{text} {POSITION_PHRASES[self.position]}" if position else text

    def to_dict(self) -> dict:
        """JSON-ready ground truth; the mask is summarised by its area."""
        a = self.appearance
        return {"noun": self.noun, "colour": a.colour, "pattern": a.pattern,
                "second_colour": a.second_colour, "size": self.size, "position": self.position,
                "box": list(self.box), "mask_area": int(self.mask.sum()), "concept": self.concept}


@dataclass
class Scene:
    image: np.ndarray = field(repr=False)  # uint8 (H, W, 3)
    background: str
    texture: str
    objects: list[SceneObject]
    caption: str
    # For concept scenes: class nouns and a layout template whose {a}/{b} stand
    # for "noun" (class prompt) or "<token> noun" (concept prompt).
    caption_parts: dict[str, str] = field(default_factory=dict)

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)

    def to_dict(self) -> dict:
        return {"background": self.background, "texture": self.texture, "caption": self.caption,
                "caption_parts": dict(self.caption_parts),
                "objects": [o.to_dict() for o in self.objects]}


@dataclass(frozen=True)
class ObjectSpec:
    """What to draw; where exactly (jitter, radius) is drawn from the rng."""
    noun: str
    appearance: Appearance
    size: str = "large"
    position: str = "center"
    concept: str | None = None


# ---------------------------------------------------------------- drawing

def shape_mask(noun: str, cx: float, cy: float, r: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean mask of one shape whose extent is about [c - r, c + r] on both axes."""
    canvas = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(canvas)
    if noun in ("circle", "ring"):
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if noun == "ring":  # 0.55: thick enough to survive 4x VAE downsampling
            q = 0.55 * r
            d.ellipse((cx - q, cy - q, cx + q, cy + q), fill=0)
    elif noun == "square":
        q = 0.85 * r  # equal visual mass with the circle
        d.rectangle((cx - q, cy - q, cx + q, cy + q), fill=255)
    elif noun == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=255)
    elif noun == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)  # fat inner radius reads at 64 px
        d.polygon([(cx + rr * np.cos(t), cy + 0.1 * r + rr * np.sin(t))
                   for rr, t in zip(radii, angles)], fill=255)
    elif noun == "heart":
        q = 0.5 * r
        for sx in (-1, 1):
            x = cx + sx * 0.48 * r
            d.ellipse((x - q, cy - 0.35 * r - q, x + q, cy - 0.35 * r + q), fill=255)
        d.polygon([(cx - 0.97 * r, cy - 0.2 * r), (cx + 0.97 * r, cy - 0.2 * r), (cx, cy + r)], fill=255)
    elif noun == "cross":
        w = 0.35 * r
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
    else:
        raise ValueError(f"unknown class noun {noun!r}; choose from {CLASS_NOUNS}")
    return np.asarray(canvas) > 127


def shade(rgb: Sequence[int]) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float32) * SHADE


def _paint(image: np.ndarray, mask: np.ndarray, appearance: Appearance, cx: float) -> None:
    ys, xs = np.nonzero(mask)
    x0, y0 = xs.min(), ys.min()  # patterns are anchored to the object, not the canvas
    base = np.asarray(COLOURS[appearance.colour], dtype=np.float32)
    colours = np.broadcast_to(base, (len(xs), 3)).copy()
    p = appearance.pattern
    if p == "two-tone":  # a vertical split at the object's centre
        colours[xs >= cx] = COLOURS[appearance.second_colour]
    else:
        dark = {"plain": np.zeros(len(xs), dtype=bool),
                "striped": ((ys - y0) // 3) % 2 == 1,
                "checkered": ((xs - x0) // 4 + (ys - y0) // 4) % 2 == 1,
                "dotted": ((xs - x0) % 6 - 3) ** 2 + ((ys - y0) % 6 - 3) ** 2 <= 2}[p]
        colours[dark] = shade(base)
    image[ys, xs] = colours


def _background(name: str, texture: str) -> np.ndarray:
    rgb = np.asarray(BACKGROUNDS[name], dtype=np.float32)
    image = np.broadcast_to(rgb, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    if texture == "gradient":  # vertical light falloff, uncaptioned nuisance variation
        ramp = np.linspace(GRADIENT_AMPLITUDE, -GRADIENT_AMPLITUDE, IMAGE_SIZE, dtype=np.float32)
        image += ramp[:, None, None]
    elif texture != "plain":
        raise ValueError(f"unknown texture {texture!r}; choose from {TEXTURES}")
    return image


class LayoutError(ValueError):
    """The requested objects cannot be placed without overlapping."""


def _place(specs: Sequence[ObjectSpec], rng: np.random.Generator, tries: int = 40):
    """Centres and radii for each spec with pairwise box gaps >= MIN_GAP, or None."""
    for _ in range(tries):
        placed = []
        for s in specs:
            lo, hi = SIZES[s.size]
            r = float(rng.integers(lo, hi + 1))
            px, py = POSITIONS[s.position]
            cx = float(np.clip(px + rng.integers(-JITTER, JITTER + 1), r + 1, IMAGE_SIZE - r - 2))
            cy = float(np.clip(py + rng.integers(-JITTER, JITTER + 1), r + 1, IMAGE_SIZE - r - 2))
            placed.append((cx, cy, r))
        if all(max(abs(a[0] - b[0]) - a[2] - b[2], abs(a[1] - b[1]) - a[2] - b[2]) >= MIN_GAP + 1
               for i, a in enumerate(placed) for b in placed[i + 1:]):
            return placed
    return None


def render_scene(specs: Sequence[ObjectSpec], background: str = "gray", texture: str = "plain",
                 rng: np.random.Generator | None = None, caption: str | None = None) -> Scene:
    """Draw `specs` in order; raises ValueError if their layout cannot fit."""
    rng = rng if rng is not None else np.random.default_rng(0)
    placed = _place(specs, rng)
    if placed is None:
        raise LayoutError(f"objects at {[s.position for s in specs]} with sizes "
                         f"{[s.size for s in specs]} overlap; use other positions or 'small'")
    image = _background(background, texture)
    objects = []
    for spec, (cx, cy, r) in zip(specs, placed):
        mask = shape_mask(spec.noun, cx, cy, r)
        _paint(image, mask, spec.appearance, cx)
        for earlier in objects:  # later objects occlude; masks stay exact
            earlier.mask &= ~mask
        objects.append(SceneObject(spec.noun, spec.appearance, spec.size, spec.position,
                                   (0, 0, 0, 0), mask, spec.concept))
    for o in objects:
        ys, xs = np.nonzero(o.mask)
        o.box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    scene = Scene(image, background, texture, objects, "")
    scene.caption = caption if caption is not None else describe(objects, background)
    return scene


# ---------------------------------------------------------------- captions

def describe(objects: Sequence[SceneObject], background: str,
             rng: np.random.Generator | None = None, colour_p: float = 1.0, appearance: bool = True) -> str:
    """Plain-English caption. With an rng, size/position/background are sometimes
    left out (and stripes rarely), so short prompts like 'a blue circle' are in
    distribution; the noun is always said. The colour too, unless colour_p < 1:
    then each object's colour is said with that probability, so that a prompt
    without one ('a star', the class prompt of personalisation methods) is in
    distribution for the base as well. appearance=False leaves every object's
    colour and pattern out ('a large star on the left and a large ring on the
    right on a gray background'): the caption of a tuning-free training scene,
    whose subjects' looks come from their reference images."""
    def keep(p: float) -> bool:
        return rng is None or rng.random() < p
    many = len(objects) > 1
    phrases = [o.phrase(size=keep(0.5), pattern=appearance and keep(0.9), position=keep(0.7 if many else 0.3),
                        colour=appearance and (colour_p >= 1 or keep(colour_p)))
               for o in objects]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{text} on {article(background)} {background} background" if keep(0.75) else text
