"""The tuning-free evidence tables' scores (FastComposer, Subject-Diffusion; docs/evidence.md, "The creatures
world: protocol"): two subjects of one kind, per part, each against its control.

For each kind's three evidence concepts X, Y, Z (differing in every part) the caller composes every ordered pair
and each concept alone; a unit is an unordered pair (X, Y) with Z the third:
  swap   share of a subject's read parts drawn with the other subject's value in X+Y, against control (a): the
         same subject beside Z, named in the same place (X+Z for X, Z+Y for Y), its readings matched to X and Y
         as the pair's are, counting the absent subject's values;
  blend  share drawn with neither's value, against control (b): each subject alone;
  own    share drawn with its own value, in the pair against alone.
Claims are paired differences over units with 95% t intervals; swap is also claimed on the parts the model
carries (own >= 0.8 in control (a), fixed from the control alone).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable

import numpy as np

BACKGROUNDS = ("gray", "white", "black", "beige")


def kinds() -> dict[str, list[str]]:
    """The evidence concepts by kind, three each."""
    from multiconcept import toyworld as cw

    out: dict[str, list[str]] = {}
    for c in cw.EVIDENCE_CONCEPTS:
        out.setdefault(cw.concept(c).creature.kind, []).append(c)
    return out


def ordered_pairs(group: list[str]) -> list[tuple[str, str]]:
    """Every ordered pair of a kind's concepts: a subject's control keeps its place in the prompt."""
    return list(itertools.permutations(group, 2))


def arm_readings(folder: Path, name: str, subjects: str, images: int, draw: Callable) -> tuple[list, list[str]]:
    """An arm's readings and each image's asked background: `images` spread over the four backgrounds, the
    prompt "<subjects> on a <bg> background", drawn by `draw(prompt, n, seed)` (the same seeds for every model)
    or read from `folder` when an earlier run wrote them."""
    from PIL import Image

    from multiconcept import toyworld as cw

    per_bg = max(1, images // len(BACKGROUNDS))
    pictures, asked = [], []
    for b, bg in enumerate(BACKGROUNDS):
        paths = [folder / f"{name}_{bg}_{i:02d}.png" for i in range(per_bg)]
        if not all(p.exists() for p in paths):
            folder.mkdir(parents=True, exist_ok=True)
            for img, path in zip(draw(f"{subjects} on {cw.article(bg)} {bg} background", per_bg, 3000 + 100 * b), paths):
                img.save(path)
        pictures += [Image.open(p).convert("RGB") for p in paths]
        asked += [bg] * per_bg
    return [cw.analyse(np.asarray(img.resize((64, 64)))) for img in pictures], asked


def score_units(pairs: dict, alone: Callable[[str, int], list], placed: Callable | None = None) -> dict:
    """Per unit (X+Y): each arm's per-part means, the background obeyed and, with `placed`, placement.
    `pairs[(a, b)]` = (analyses, asked backgrounds) of a composed with b; `alone(c, slot)` = the analyses of c
    composed alone where slot 0 (named first) or 1 (named second) would put it; `placed(matched)` = 1/0/None
    per image from the readings matched to the pair's two subjects."""
    from multiconcept import toyworld as cw

    units = {}
    for group in kinds().values():
        for x, y in itertools.combinations(group, 2):
            z = next(c for c in group if c not in (x, y))
            cx, cy = cw.concept(x).creature, cw.concept(y).creature
            both = [(cx, cy), (cy, cx)]
            pair, asked = pairs[(x, y)]
            ctl_x, ctl_y = pairs[(x, z)][0], pairs[(z, y)][0]
            rows = {"pair": [cw.read_shares(cw.match(a.subjects, [cx, cy]), both) for a in pair],
                    # the readings of X+Z and Z+Y matched to X and Y as the pair's are (the assignment with the
                    # most own values; matched alone, a control would score more swaps than identical images)
                    "same_layout": [cw.read_shares([cw.match(ax.subjects, [cx, cy])[0],
                                                    cw.match(ay.subjects, [cx, cy])[1]], both)
                                    for ax, ay in zip(ctl_x, ctl_y)],
                    "alone": [cw.read_shares([cw.match(ax.subjects, [cx])[0], cw.match(ay.subjects, [cy])[0]], both)
                              for ax, ay in zip(alone(x, 0), alone(y, 1))]}
            unit = {arm: means(shares) for arm, shares in rows.items()}
            unit["background_obeyed"] = float(np.mean([a.background == bg for a, bg in zip(pair, asked)]))
            if placed is not None:
                unit["placed"] = mean_of([placed(cw.match(a.subjects, [cx, cy])) for a in pair])
            units[f"{x}+{y}"] = unit
    return units


def means(shares: list[dict]) -> dict:
    """Per part and over all parts: own, other (swap) and neither (blend) means over images with that part read."""
    from multiconcept import toyworld as cw

    out = {}
    for part in ("all", *cw.PARTS):
        got = [s if part == "all" else s["parts"][part] for s in shares]
        neither = [None if g["own"] is None else 1 - g["own"] - g["other"] for g in got]
        out[part] = {"own": mean_of([g["own"] for g in got]), "other": mean_of([g["other"] for g in got]),
                     "neither": mean_of(neither)}
    out["found"] = mean_of([s["found"] for s in shares])
    return out


def mean_of(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def carried(units: dict, threshold: float = 0.8) -> list[str]:
    """The parts a model carries: own >= threshold in control (a), over the units (fixed from the control alone)."""
    from multiconcept import toyworld as cw

    return [p for p in cw.PARTS if (mean_of([u["same_layout"][p]["own"] for u in units.values()]) or 0) >= threshold]


def claims(units: dict) -> dict:
    """Swap over control (a), all parts and the carried ones; blend over control (b); own in pairs vs alone."""
    from multiconcept.metrics.stats import mean_sem, paired_difference

    rows = list(units.values())
    parts = carried(units)

    def over(arm, key, which):
        if which == "carried":
            return [None if any(u[arm][p][key] is None for p in parts) else float(np.mean([u[arm][p][key] for p in parts]))
                    for u in rows]
        return [u[arm]["all"][key] for u in rows]

    out = {"carried": parts, "n": len(rows)}
    for label, key, ctl, which in (("swap", "other", "same_layout", "all"), ("swap_carried", "other", "same_layout", "carried"),
                                   ("blend", "neither", "alone", "all"), ("own", "own", "alone", "all")):
        if which == "carried" and not parts:
            continue
        a, b = over("pair", key, which), over(ctl, key, which)
        d = paired_difference(a, b)
        out[label] = {"pair": mean_sem(a).text(), "control": mean_sem(b).text(), "excess": d.mean, "low": d.low,
                      "high": d.high, "half_width": (d.high - d.low) / 2, "values": a, "control_values": b}
    out["found"] = mean_of([u["pair"]["found"] for u in rows])
    out["background_obeyed"] = mean_of([u["background_obeyed"] for u in rows])
    if rows and "placed" in rows[0]:
        out["placed"] = mean_of([u["placed"] for u in rows])
    return out


def print_claims(key: str, c: dict, extra: str = "") -> None:
    line = f"{key}: carried {c['carried'] or 'none'}; found {c['found']:.2f} of 2; background {c['background_obeyed']:.2f}"
    if c.get("placed") is not None:
        line += f"; placed {c['placed']:.2f}"
    print(line + extra)
    for label in ("swap", "swap_carried", "blend", "own"):
        if label in c:
            s = c[label]
            print(f"  {label}: pair {s['pair']}, control {s['control']}, excess {s['excess']:+.3f} "
                  f"[{s['low']:+.3f}, {s['high']:+.3f}] (n {c['n']})")
