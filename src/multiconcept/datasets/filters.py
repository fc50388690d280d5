"""The published Subject-Diffusion filters, each a setting whose default is the published value.

Subject-Diffusion (arXiv 2307.11410) and its public `data_process.py` keep an image when its longer side is
at least 600 px, at most 10% of it is near-white, its caption has 3-8 nouns and the detector finds 2-8
boxes; a box when its area is 8-70% of the image, its aspect ratio within 0.3-3, its score above 0.3, its
label one word of the caption and its mask fills at least 60% of it; of two boxes overlapping by more
than 80% of the smaller one, the weaker goes; at most 2 subjects stay per image (the strongest).
`None` switches a filter off. Profiles: `published`, `toyworld` (64 px renders with 1-2 subjects; the
thresholds lie below ToyWorld's measured extremes over 2,000 of its tuning-free scenes: the smallest
subject's box is 7.9% of the image, the thinnest visible mask fills 44% of its box) and `off` (every
filter off: what a plumbing test wants).

Every filter tallies [in, dropped] on the item (images for image filters, entities for entity filters),
so stats.json is a sum over items and is the same however the items were batched or distributed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np

from ..errors import UserError, require
from .records import Entity, Item

NEAR_WHITE = 250  # a pixel is near-white when every channel is at least this (the paper gives the 10% share only)


def _s(default, help_: str):
    return field(default=default, metadata={"help": help_})


@dataclass(frozen=True)
class FilterSettings:
    min_long_side: int | None = _s(600, "drop images whose longer side is shorter (px)")
    max_white_share: float | None = _s(0.10, "drop images with a larger share of near-white pixels "
                                             f"(all channels >= {NEAR_WHITE})")
    min_nouns: int | None = _s(3, "drop images whose caption has fewer nouns")
    max_nouns: int | None = _s(8, "drop images whose caption has more nouns")
    min_detections: int | None = _s(2, "drop images with fewer boxes after NMS")
    max_detections: int | None = _s(8, "drop images with more boxes after NMS")
    min_box_area: float | None = _s(0.08, "drop boxes whose area is this share of the image or less")
    max_box_area: float | None = _s(0.7, "drop boxes whose area is this share of the image or more")
    min_aspect: float | None = _s(0.3, "drop boxes whose width/height is this or less")
    max_aspect: float | None = _s(3.0, "drop boxes whose width/height is this or more")
    min_score: float | None = _s(0.3, "drop boxes whose detector score is this or less")
    label_in_caption: bool = _s(True, "drop boxes whose label is not one word that occurs in the caption")
    min_mask_fill: float | None = _s(0.6, "drop entities whose mask covers less of their box")
    max_overlap: float | None = _s(0.8, "of two boxes whose intersection exceeds this share of the smaller, drop the weaker")
    max_subjects: int | None = _s(2, "keep at most this many entities per image (highest scores)")

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "label_in_caption":
                require(isinstance(v, bool), f"filter label_in_caption must be true or false, got {v!r}")
            elif v is not None:
                require(isinstance(v, (int, float)) and v >= 0, f"filter {f.name} must be a number >= 0 or 'off', got {v!r}")
        for lo, hi in (("min_nouns", "max_nouns"), ("min_detections", "max_detections"),
                       ("min_box_area", "max_box_area"), ("min_aspect", "max_aspect")):
            a, b = getattr(self, lo), getattr(self, hi)
            require(a is None or b is None or a <= b, f"filter {lo}={a} is above {hi}={b}: lower {lo} or raise {hi}")

    @staticmethod
    def profile(name: str) -> "FilterSettings":
        require(name in PROFILES, f"--filters {name!r}: choose one of {', '.join(PROFILES)}")
        return PROFILES[name]

    def with_overrides(self, pairs: dict[str, str]) -> "FilterSettings":
        """KEY=VALUE strings from the command line; 'off' or 'none' switches a filter off."""
        known = {f.name: f for f in fields(self)}
        changes = {}
        for k, v in pairs.items():
            if k not in known:
                raise UserError(f"--filter {k}: no such filter; choose from {', '.join(known)}")
            low = v.strip().lower()
            if k == "label_in_caption":
                require(low in ("true", "false", "off"), f"--filter label_in_caption={v}: use true or false")
                changes[k] = low == "true"
            elif low in ("off", "none"):
                changes[k] = None
            else:
                try:
                    is_int = k.startswith(("min_nouns", "max_nouns", "min_det", "max_det", "max_sub", "min_long"))
                    changes[k] = int(low) if is_int else float(low)
                except ValueError as e:
                    raise UserError(f"--filter {k}={v}: give a number or 'off'") from e
        return replace(self, **changes)


PROFILES = {
    "published": FilterSettings(),
    "toyworld": FilterSettings(min_long_side=64, min_nouns=1, max_nouns=3, min_detections=1, max_detections=3,
                               min_box_area=0.02, min_mask_fill=0.3, max_subjects=3),
    "off": FilterSettings(**{f.name: (False if f.name == "label_in_caption" else None) for f in fields(FilterSettings)}),
}


# ---------------------------------------------------------------- applying them

def _image_filter(item: Item, name: str, on: bool, keep: bool) -> bool:
    if not on or not item.alive:
        return item.alive
    t = item.tally.setdefault(name, [0, 0])
    t[0] += 1
    if not keep:
        t[1] += 1
        item.dropped_by = name
    return item.alive


def _entity_filter(item: Item, name: str, on: bool, keep) -> None:
    if not on or not item.alive:
        return
    kept = [e for e in item.entities if keep(e)]
    t = item.tally.setdefault(name, [0, 0])
    t[0] += len(item.entities)
    t[1] += len(item.entities) - len(kept)
    item.entities = kept


def white_share(image) -> float:
    a = np.asarray(image)
    return float((a >= NEAR_WHITE).all(axis=-1).mean())


def after_decode(item: Item, s: FilterSettings) -> None:
    w, h = item.size
    _image_filter(item, "min_long_side", s.min_long_side is not None, max(w, h) >= (s.min_long_side or 0))
    if s.max_white_share is not None and item.alive:
        _image_filter(item, "max_white_share", True, white_share(item.image()) <= s.max_white_share)


def after_nouns(item: Item, s: FilterSettings) -> None:
    n = len(item.nouns)
    _image_filter(item, "min_nouns", s.min_nouns is not None, n >= (s.min_nouns or 0))
    _image_filter(item, "max_nouns", s.max_nouns is not None, n <= (s.max_nouns or 0))


def caption_words(caption: str) -> set[str]:
    return {w.strip(".,;:!?\"'()").lower() for w in caption.split()}


def after_boxes(item: Item, s: FilterSettings) -> None:
    n = len(item.entities)
    _image_filter(item, "min_detections", s.min_detections is not None, n >= (s.min_detections or 0))
    _image_filter(item, "max_detections", s.max_detections is not None, n <= (s.max_detections or 0))
    w, h = item.size
    area = lambda e: e.box_area / (w * h)  # noqa: E731
    aspect = lambda e: (e.box[2] - e.box[0]) / max(e.box[3] - e.box[1], 1e-6)  # noqa: E731
    words = caption_words(item.caption or "")
    _entity_filter(item, "min_box_area", s.min_box_area is not None, lambda e: area(e) > s.min_box_area)
    _entity_filter(item, "max_box_area", s.max_box_area is not None, lambda e: area(e) < s.max_box_area)
    _entity_filter(item, "min_aspect", s.min_aspect is not None, lambda e: aspect(e) > s.min_aspect)
    _entity_filter(item, "max_aspect", s.max_aspect is not None, lambda e: aspect(e) < s.max_aspect)
    _entity_filter(item, "min_score", s.min_score is not None, lambda e: e.score > s.min_score)
    _entity_filter(item, "label_in_caption", s.label_in_caption,
                   lambda e: len(e.label.split()) == 1 and e.label.lower() in words)


def mask_fill(e: Entity) -> float:
    x0, y0, x1, y1 = (int(round(v)) for v in e.box)
    inside = e.mask[max(y0, 0):y1, max(x0, 0):x1].sum()
    return float(inside) / max(e.box_area, 1.0)


def overlap(a: Entity, b: Entity) -> float:
    """Intersection over the smaller box's area."""
    ix = max(0.0, min(a.box[2], b.box[2]) - max(a.box[0], b.box[0]))
    iy = max(0.0, min(a.box[3], b.box[3]) - max(a.box[1], b.box[1]))
    return ix * iy / max(min(a.box_area, b.box_area), 1e-6)


def after_masks(item: Item, s: FilterSettings) -> None:
    _entity_filter(item, "min_mask_fill", s.min_mask_fill is not None,
                   lambda e: e.mask is not None and mask_fill(e) >= s.min_mask_fill)
    if s.max_overlap is not None and item.alive:
        kept: list[Entity] = []
        for e in sorted(item.entities, key=lambda e: -e.score):
            if all(overlap(e, k) <= s.max_overlap for k in kept):
                kept.append(e)
        _entity_filter(item, "max_overlap", True, lambda e: any(e is k for k in kept))
    if s.max_subjects is not None and item.alive:
        top = sorted(item.entities, key=lambda e: -e.score)[: s.max_subjects]
        _entity_filter(item, "max_subjects", True, lambda e: any(e is k for k in top))
    # an image is a training record only if a subject survived
    _image_filter(item, "no_subjects", True, bool(item.entities))
