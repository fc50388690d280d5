"""Leakage: for a single-concept prompt, how much the OTHER concept shows up.

Two measures (ours, beyond the papers; docs/evidence.md); lower is better:
- embedding leakage: the image alignment (CLIP-I, DINO) of the generation to
  the other concept's reference crop. workflows/scoring.py computes it with the same
  code as image alignment; it is only meaningful next to the own-concept
  alignment, since similar-looking concepts score high on both.
- ToyWorld leakage, exact: ToyWorld concepts are colour/pattern signatures
  with known ground truth, and ToyWorld's analytic checker finds objects and
  their colours from pixels alone. A generation leaks when an object in it
  carries the other concept's colours — as a separate object, or painted into
  the prompted one (attribute mixing, the failure DisenDiff targets).
  Colours the two concepts share say nothing and are left out; when nothing
  is left the measure is undefined (None), never a guess.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

# A colour "appears" on an object when at least this share of its saturated
# pixels is nearest to it: a two-tone concept's second half is ~50%, and a
# blurry generation keeps well above this for every colour it really draws.
MIN_COLOUR_SHARE = 0.25


@dataclass(frozen=True)
class Signature:
    """What identifies a ToyWorld concept in pixels: its class noun and colours."""

    noun: str
    colour: str
    pattern: str = "plain"
    second_colour: str | None = None

    @property
    def colours(self) -> frozenset[str]:
        return frozenset(c for c in (self.colour, self.second_colour) if c)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Signature":
        return cls(d["noun"], d["colour"], d.get("pattern", "plain"), d.get("second_colour"))


def toyworld_size(img: Image.Image) -> np.ndarray:
    """The checker reads 64×64 RGB: small generations are upsampled without new
    colours (nearest), large ones averaged down (box)."""
    from ..toyworld.render import IMAGE_SIZE

    img = img.convert("RGB")
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        smaller = img.size[0] < IMAGE_SIZE or img.size[1] < IMAGE_SIZE
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST if smaller else Image.BOX)
    return np.asarray(img)


def colours_present(analysis, colours: frozenset[str]) -> bool:
    return any(share >= MIN_COLOUR_SHARE and name in colours
               for d in analysis.objects for name, share in d.colour_fractions.items())


def toyworld_measures(img: Image.Image, prompted: list[Signature], others: list[Signature]) -> dict:
    """Exact presence / leakage for one generation.

    present: every prompted concept's colours appear (None when no concept is prompted);
    colour_leak: some object carries a colour of a non-prompted concept that no prompted concept has;
    object_leak: an object of a non-prompted concept's class whose main colour is such a colour.
    """
    from ..toyworld.check import analyse

    a = analyse(toyworld_size(img))
    own = frozenset().union(*(s.colours for s in prompted)) if prompted else frozenset()
    distinct = {s: s.colours - own for s in others}
    defined = {s: d for s, d in distinct.items() if d}
    out = {"present": all(colours_present(a, s.colours) for s in prompted) if prompted else None,
           "colour_leak": None, "object_leak": None,
           "detections": [(d.colour, d.noun) for d in a.objects]}
    if defined:
        out["colour_leak"] = any(colours_present(a, d) for d in defined.values())
        out["object_leak"] = any(det.noun == s.noun and det.colour in d
                                 for s, d in defined.items() for det in a.objects)
    return out
