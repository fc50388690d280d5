"""Leakage: for a single-concept prompt, how much the OTHER concept shows up.

Two measures (ours, beyond the papers; docs/evidence.md); lower is better:
- embedding leakage: the image alignment (CLIP-I, DINO) of the generation to
  the other concept's reference crop. workflows/scoring.py computes it with the same
  code as image alignment; it is only meaningful next to the own-concept
  alignment, since similar-looking concepts score high on both.
- ToyWorld leakage, exact: a ToyWorld concept is a creature, a kind and five
  parts with known ground truth, and ToyWorld's analytic checker reads every
  subject's kind and parts from pixels alone. A generation leaks as far as a
  subject in it carries the other concept's values — the prompted subject
  wearing the other's hat (attribute mixing, the failure DisenDiff targets),
  or a second subject drawn in its likeness. Traits the concepts share say
  nothing and are left out; when nothing is left the measure is undefined
  (None), never a guess.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..toyworld.render import IMAGE_SIZE, Creature

# A ToyWorld concept's ground truth, as sources carry it: the creature itself (kind and parts).
Signature = Creature


def toyworld_size(img: Image.Image) -> np.ndarray:
    """The checker reads 64×64 RGB: small generations are upsampled without new
    colours (nearest), large ones averaged down (box)."""
    img = img.convert("RGB")
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        smaller = img.size[0] < IMAGE_SIZE or img.size[1] < IMAGE_SIZE
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST if smaller else Image.BOX)
    return np.asarray(img)


def toyworld_measures(img: Image.Image, prompted: list[Signature], others: list[Signature]) -> dict:
    """Exact presence, identity and leakage for one generation.

    present: every prompted concept is found as a subject of its kind (None when none is prompted);
    identity: the prompted concepts' share of parts drawn right, each on the subject matched to it;
    leak: over the concepts not prompted, the largest share of one's distinguishing traits (kind and parts
    no prompted concept has) read on any subject; None when no such concept has one;
    subjects: what the checker read, left to right.
    """
    from ..toyworld.check import analyse
    from ..toyworld.score import identity, leakage, match

    found = analyse(toyworld_size(img)).subjects
    mine = match(found, prompted) if prompted else []
    leaks = [v for o in others if (v := leakage(found, prompted, o)) is not None]
    return {"present": all(r is not None and r.kind == p.kind for r, p in zip(mine, prompted)) if prompted else None,
            "identity": float(np.mean([identity(r, p) for r, p in zip(mine, prompted)])) if prompted else None,
            "leak": max(leaks) if leaks else None,
            "subjects": [{"kind": r.kind, **r.parts} for r in found]}
