"""Multi-subject fidelity: detect, then compare (MuDI's idea, Jang et al. 2024).

Whole-image CLIP-I cannot tell a two-subject image with both subjects from one
where a subject is missing or both melt into one object: the image is still
"like" the source. So each subject is scored through the object that stands
for it:
1. detect the objects in the generation (ToyWorld's analytic checker here, an
   open-vocabulary detector such as OWLv2 for photos);
2. compare each detection's crop with each subject's reference crop in the
   evaluator's space (similarity matrix, detections × subjects);
3. match detections to subjects one to one, the assignment with the largest
   total similarity;
4. score each subject: 0 when no detection is left for it (missing), 0 when
   its detection is at least as similar to another subject's reference as to
   its own (confused: a blend of the two, or the wrong subject), else the
   similarity of its detection to its own reference.
The image's score is the mean over its subjects. This module knows numbers:
the detections and crops come from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np
from PIL import Image

MISSING, CONFUSED, MATCHED = "missing", "confused", "matched"
# the exhaustive assignment looks at the first few detections (largest, or most confident): the rest never win a match
EXTRA_DETECTIONS = 4
# no-detection rows score below any cosine, so a real detection is always preferred
_NONE = -10.0


@dataclass(frozen=True)
class SubjectScore:
    fidelity: float
    status: str  # matched | missing | confused
    detection: int | None  # row of the similarity matrix, None when missing


def match_subjects(similarity) -> list[SubjectScore]:
    """One score per subject (column) from a detections × subjects similarity matrix, detections
    ordered largest (ToyWorld's checker) or most confident (a detector) first."""
    s = np.asarray(similarity, dtype=np.float64)
    n_sub = s.shape[1] if s.ndim == 2 else 0
    if n_sub == 0:
        return []
    s = s[: n_sub + EXTRA_DETECTIONS] if s.size else np.zeros((0, n_sub))
    rows = np.vstack([s, np.full((n_sub, n_sub), _NONE)])
    best = max(permutations(range(len(rows)), n_sub), key=lambda p: sum(rows[r, j] for j, r in enumerate(p)))
    out = []
    for j, r in enumerate(best):
        if r >= len(s):
            out.append(SubjectScore(0.0, MISSING, None))
            continue
        others = np.delete(s[r], j)
        if others.size and others.max() >= s[r, j]:
            out.append(SubjectScore(0.0, CONFUSED, int(r)))
        else:
            out.append(SubjectScore(float(s[r, j]), MATCHED, int(r)))
    return out


def summarise_matches(scores: list[SubjectScore]) -> dict:
    n = len(scores)
    return {"fidelity": sum(x.fidelity for x in scores) / n,
            "missing": sum(x.status == MISSING for x in scores) / n,
            "confused": sum(x.status == CONFUSED for x in scores) / n}


def toyworld_objects(image: Image.Image) -> list[np.ndarray]:
    """The subjects ToyWorld's checker reads, as boolean masks at the image's size, largest first."""
    from ..toyworld.check import analyse
    from .leakage import toyworld_size

    masks = []
    for r in sorted(analyse(toyworld_size(image)).subjects, key=lambda r: -int(r.mask.sum())):
        m = Image.fromarray(r.mask.astype(np.uint8) * 255).resize(image.size, Image.NEAREST)
        masks.append(np.asarray(m) > 127)
    return [m for m in masks if m.any()]


def box_masks(size: tuple[int, int], boxes) -> list[np.ndarray]:
    """A detector's (x0, y0, x1, y1) boxes as masks (an open-vocabulary detector gives no outline)."""
    w, h = size
    out = []
    for x0, y0, x1, y1 in boxes:
        m = np.zeros((h, w), dtype=bool)
        m[max(0, int(y0)): min(h, int(np.ceil(y1))), max(0, int(x0)): min(w, int(np.ceil(x1)))] = True
        if m.any():
            out.append(m)
    return out
