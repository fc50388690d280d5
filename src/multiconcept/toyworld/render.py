"""ToyWorld creatures: 64×64 renders of subjects whose identity is a combination of parts.

A creature is a kind (the class noun: robot, bird, ghost — the body's silhouette) and five parts, each
with a few known values: body colour, head colour, hat, marking and marking colour. Prompts can name
the kind and the body colour; the other four parts have no words in the base's captions, so a
personal concept ("my robot") is a combination no prompt can say, as a real subject is
(../../shared/spec/toyworld2.md, "Identity beyond words").

Every part is at least ~8 px at the base's scale, so it survives the VAE's 4× downsampling (16×16
latents). The parts live in separate palettes (bodies and hats in the body colours, heads in the head
colours, markings achromatic), which is what lets `check` read each part back from pixels and find
each subject by its head, even when two subjects of one kind overlap.

Geometry is in frame units: a creature at scale 1 spans x ∈ [-12, 12], y ∈ [-22, 21] around its
centre (43 px tall, 24 px wide); the hat sits above the head, the head on the body.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
KINDS = ("robot", "bird", "ghost")
BODY_COLOURS = {"red": (220, 30, 40), "green": (30, 170, 50), "blue": (30, 70, 230), "yellow": (245, 225, 20)}
HEAD_COLOURS = {"orange": (250, 130, 0), "cyan": (0, 200, 210), "purple": (140, 40, 210), "pink": (255, 120, 200)}
HATS = ("cone", "block", "horns")
MARKINGS = ("band", "stripe", "spot")
MARKING_COLOURS = {"white": (245, 245, 245), "gray": (120, 120, 120), "black": (15, 15, 15)}
# Low-saturation backgrounds: every creature outline (body, head, hat) is saturated against them;
# only markings, always inside a body, are achromatic.
BACKGROUNDS = {"white": (235, 235, 235), "gray": (128, 128, 128),
               "black": (25, 25, 25), "beige": (220, 205, 170)}
# Which parts the base's captions may name (with the kind); the rest have no words there.
NAMED_PARTS = ("body_colour",)
PART_VALUES = {"body_colour": tuple(BODY_COLOURS), "head_colour": tuple(HEAD_COLOURS), "hat": HATS,
               "marking": MARKINGS, "marking_colour": tuple(MARKING_COLOURS)}
UNNAMED_PARTS = tuple(p for p in PART_VALUES if p not in NAMED_PARTS)
PARTS = tuple(PART_VALUES)

HEAD_CENTRE, HEAD_RADIUS = (0.0, -7.0), 6.0
FRAME_TOP, FRAME_BOTTOM, FRAME_HALF_WIDTH = -22.0, 21.0, 12.0


@dataclass(frozen=True)
class Creature:
    kind: str
    body_colour: str
    head_colour: str
    hat: str
    marking: str
    marking_colour: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; choose from {KINDS}")
        for part, values in PART_VALUES.items():
            if getattr(self, part) not in values:
                raise ValueError(f"unknown {part} {getattr(self, part)!r}; choose from {values}")

    def parts(self) -> dict[str, str]:
        return {p: getattr(self, p) for p in PARTS}

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, **self.parts()}

    def words(self, colour: bool = True) -> str:
        """What the base's vocabulary can say of it: 'red robot', or 'robot'."""
        return f"{self.body_colour} {self.kind}" if colour else self.kind

    def full_description(self) -> str:
        """Every part in words: the evaluator's captions only (the base never reads these)."""
        return (f"{self.body_colour} {self.kind} with {article(self.head_colour)} {self.head_colour} head, "
                f"{article(self.hat)} {self.hat} hat and {article(self.marking_colour)} {self.marking_colour} {self.marking}")

    @classmethod
    def from_dict(cls, d: dict) -> "Creature":
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------- geometry (frame units)

def _polygons(kind: str) -> list[tuple[str, list]]:
    """The body silhouette of a kind as (shape, points) in frame units, y down."""
    if kind == "robot":  # a box on two legs
        return [("rect", [(-11, 0), (11, 16)]), ("rect", [(-8.5, 15), (-3.5, 21)]), ("rect", [(3.5, 15), (8.5, 21)])]
    if kind == "bird":  # an egg-shaped body
        return [("ellipse", [(-12, -1), (12, 20)])]
    if kind == "ghost":  # a bell widening downwards, with a toothed hem
        hem = [(12, 17), (9, 21), (6, 17), (3, 21), (0, 17), (-3, 21), (-6, 17), (-9, 21), (-12, 17)]
        return [("polygon", [(-6, 0), (6, 0), *hem]), ("ellipse", [(-6, -3), (6, 3)])]
    raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")


def _hat(hat: str) -> list[tuple[str, list]]:
    if hat == "cone":
        return [("polygon", [(-7, -11), (7, -11), (0, -22)])]
    if hat == "block":  # a tall hat; wide enough (8) to stay a column after the VAE
        return [("rect", [(-4.5, -22), (4.5, -11)])]
    if hat == "horns":  # two peaks with a gap between them
        return [("polygon", [(-8, -9), (-2, -12), (-7.5, -22)]), ("polygon", [(8, -9), (2, -12), (7.5, -22)])]
    raise ValueError(f"unknown hat {hat!r}; choose from {HATS}")


def _marking(marking: str) -> list[tuple[str, list]]:
    if marking == "band":  # across the body
        return [("rect", [(-7.5, 5), (7.5, 11)])]
    if marking == "stripe":  # down the body
        return [("rect", [(-3, 1.5), (3, 15)])]
    if marking == "spot":
        return [("ellipse", [(-4.5, 3.5), (4.5, 12.5)])]
    raise ValueError(f"unknown marking {marking!r}; choose from {MARKINGS}")


def _head() -> list[tuple[str, list]]:
    (hx, hy), r = HEAD_CENTRE, HEAD_RADIUS
    return [("ellipse", [(hx - r, hy - r), (hx + r, hy + r)])]


def _draw(shapes, cx: float, cy: float, scale: float, size: int = IMAGE_SIZE) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(canvas)
    for kind, pts in shapes:
        xy = [(cx + x * scale, cy + y * scale) for x, y in pts]
        if kind == "rect":
            d.rectangle(xy, fill=255)
        elif kind == "ellipse":
            d.ellipse(xy, fill=255)
        else:
            d.polygon(xy, fill=255)
    return np.asarray(canvas) > 127


def part_masks(c: Creature, cx: float, cy: float, scale: float) -> dict[str, np.ndarray]:
    """Pixels of each region of one creature drawn alone: hat, head, body (marking included), marking."""
    body = _draw(_polygons(c.kind), cx, cy, scale)
    head = _draw(_head(), cx, cy, scale)
    hat = _draw(_hat(c.hat), cx, cy, scale) & ~head & ~body
    head &= ~body
    marking = _draw(_marking(c.marking), cx, cy, scale) & body
    return {"hat": hat, "head": head, "body": body, "marking": marking}


def template(kind: str | None = None, hat: str | None = None, marking: str | None = None,
             cx: float = 32, cy: float = 32, scale: float = 1.0) -> np.ndarray:
    """One region's mask at a frame: what the checker compares a reading with."""
    shapes = _polygons(kind) if kind else _hat(hat) if hat else _marking(marking)
    return _draw(shapes, cx, cy, scale)


# ---------------------------------------------------------------- scenes

@dataclass
class Placed:
    """A creature as drawn: its frame, and per region exactly the pixels visible in the image."""
    creature: Creature
    cx: float
    cy: float
    scale: float
    position: str  # "center", "left", "right" or "free"
    masks: dict[str, np.ndarray] = field(repr=False)  # hat, head, body, marking; visible pixels only
    full_masks: dict[str, np.ndarray] = field(repr=False)  # the same drawn alone (before occlusion)
    concept: str | None = None

    @property
    def mask(self) -> np.ndarray:
        return self.masks["hat"] | self.masks["head"] | self.masks["body"]

    @property
    def box(self) -> tuple[int, int, int, int]:
        ys, xs = np.nonzero(self.mask)
        return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)

    def visible_parts(self, min_share: float = 0.5) -> dict[str, bool]:
        """Which parts can be read: the region carrying each is at least `min_share` visible."""
        region = {"body_colour": "body", "head_colour": "head", "hat": "hat", "marking": "marking",
                  "marking_colour": "marking"}
        return {p: self.masks[r].sum() >= min_share * max(1, self.full_masks[r].sum()) for p, r in region.items()}

    def to_dict(self) -> dict:
        return {**self.creature.to_dict(), "cx": self.cx, "cy": self.cy,
                "scale": self.scale, "position": self.position, "box": list(self.box), "concept": self.concept,
                "visible": {k: bool(v) for k, v in self.visible_parts().items()}}


@dataclass
class Scene:
    image: np.ndarray = field(repr=False)  # uint8 (H, W, 3)
    background: str
    subjects: list[Placed]  # in drawing order: later ones occlude earlier ones
    layout: str  # "center", "pair", "overlap" or "free"
    caption: str = ""
    caption_parts: dict[str, str] = field(default_factory=dict)

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)

    def to_dict(self) -> dict:
        return {"background": self.background, "layout": self.layout, "caption": self.caption,
                "caption_parts": dict(self.caption_parts), "subjects": [s.to_dict() for s in self.subjects]}


@dataclass(frozen=True)
class Spec:
    """What to draw, where."""
    creature: Creature
    cx: float
    cy: float
    scale: float = 1.0
    position: str = "center"
    concept: str | None = None


def render(specs: Sequence[Spec], background: str = "gray", layout: str = "center") -> Scene:
    """Draw `specs` in order (later ones in front); each subject's masks keep its visible pixels."""
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; choose from {sorted(BACKGROUNDS)}")
    image = np.broadcast_to(np.asarray(BACKGROUNDS[background], np.uint8), (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    placed: list[Placed] = []
    for s in specs:
        c = s.creature
        full = part_masks(c, s.cx, s.cy, s.scale)
        image[full["hat"] | full["body"]] = BODY_COLOURS[c.body_colour]
        image[full["head"]] = HEAD_COLOURS[c.head_colour]
        image[full["marking"]] = MARKING_COLOURS[c.marking_colour]
        drawn = full["hat"] | full["head"] | full["body"]
        for earlier in placed:
            for m in earlier.masks.values():
                m &= ~drawn
        placed.append(Placed(c, s.cx, s.cy, s.scale, s.position, {k: v.copy() for k, v in full.items()}, full,
                             s.concept))
    return Scene(image, background, placed, layout)
