"""Exact identity scores from the checker's readings: parts right, swapped, blended.

A subject's identity is the share of its parts drawn with its own values. With two subjects A and B that
differ in every part, each part read on a subject is one of three things: its own value, the other's
(a swap: identity blending, the failure FastComposer and Subject-Diffusion address; or leakage, when the
other concept was not even asked for: DisenDiff's) or neither (a blend or a drawing error). Readings are
matched to subjects by the assignment that maximises own values, so a drawing that merely swaps places is
not a swap. These are counts, not claims: a claim is the excess over a control with no reason to swap
(../../shared/spec/toyworld2.md, "Scoring against chance and controls").
"""

from __future__ import annotations

from itertools import permutations

from .check import Reading
from .render import PARTS, Creature

# What tells two concepts apart: the kind and every part (leakage counts a kind drawn as the other's too).
TRAITS = ("kind", *PARTS)


def value(reading: Reading, trait: str) -> str | None:
    return reading.kind if trait == "kind" else reading.parts.get(trait)


def part_outcomes(reading: Reading | None, own: Creature, other: Creature | None = None,
                  parts: tuple[str, ...] = PARTS) -> dict[str, float]:
    """Shares of `parts` (kind allowed) read as own value, as `other`'s value, as neither, or unread (None or missing)."""
    counts = {"own": 0, "other": 0, "neither": 0, "unread": 0}
    for p in parts:
        read = None if reading is None else value(reading, p)
        if read is None:
            counts["unread"] += 1
        elif read == getattr(own, p):
            counts["own"] += 1
        elif other is not None and read == getattr(other, p):
            counts["other"] += 1
        else:
            counts["neither"] += 1
    return {k: v / len(parts) for k, v in counts.items()}


def identity(reading: Reading | None, own: Creature, parts: tuple[str, ...] = PARTS) -> float:
    """Share of parts drawn with the subject's own values (a missing subject scores 0)."""
    return part_outcomes(reading, own, None, parts)["own"]


def match(readings: list[Reading], subjects: list[Creature], parts: tuple[str, ...] = PARTS) -> list[Reading | None]:
    """For each subject, the reading assigned to it (None when fewer readings than subjects): the
    assignment with the most own values, ties broken by left-to-right order."""
    slots = readings + [None] * max(0, len(subjects) - len(readings))
    best = max(permutations(range(len(slots)), len(subjects)),
               key=lambda order: sum(identity(slots[i], s, parts) for i, s in zip(order, subjects)))
    return [slots[i] for i in best]


def pair_outcomes(readings: list[Reading], a: Creature, b: Creature, parts: tuple[str, ...] = PARTS) -> dict:
    """Two subjects asked for: per subject own / other / neither / unread shares, averaged over both,
    and how many subjects were found."""
    ra, rb = match(readings, [a, b], parts)
    oa, ob = part_outcomes(ra, a, b, parts), part_outcomes(rb, b, a, parts)
    return {k: (oa[k] + ob[k]) / 2 for k in oa} | {"found": sum(r is not None for r in (ra, rb))}


def leakage(readings: list[Reading], prompted: list[Creature], other: Creature,
            traits: tuple[str, ...] = TRAITS) -> float | None:
    """How much of a concept that was not asked for is drawn: over every subject found (the asked one, or
    an extra one), the largest share of `other`'s distinguishing traits read with its values. A trait
    distinguishes it where no prompted concept has its value; with none, leakage is undefined (None),
    never a guess. No subject found: 0 (nothing of it is drawn)."""
    distinct = tuple(t for t in traits if all(getattr(p, t) != getattr(other, t) for p in prompted))
    if not distinct:
        return None
    return max((sum(value(r, t) == getattr(other, t) for t in distinct) / len(distinct) for r in readings),
               default=0.0)


def read_shares(matched: list[Reading | None], subjects: list[tuple[Creature, Creature]]) -> dict:
    """Own and other's shares among the parts read on the subjects found, over all parts and per part
    (`parts`), and how many subjects were found. `matched[i]` is the reading of the subject whose
    (own, other) is `subjects[i]`. A subject not drawn, or a part hidden, says nothing about a swap, so
    only parts read count; a pair and its control go through this same count, so a subject missing more
    often in pairs cannot lower the pair's rate. A share with nothing read is None."""
    counts = {p: {"own": 0.0, "other": 0.0, "read": 0.0} for p in ("all", *PARTS)}
    for reading, (own, other) in zip(matched, subjects):
        if reading is None:
            continue
        for part in PARTS:
            o = part_outcomes(reading, own, other, (part,))
            for key in ("all", part):
                counts[key]["own"] += o["own"]
                counts[key]["other"] += o["other"]
                counts[key]["read"] += 1 - o["unread"]
    shares = {p: {k: (c[k] / c["read"] if c["read"] else None) for k in ("own", "other")} for p, c in counts.items()}
    return {**shares.pop("all"), "parts": shares, "found": sum(r is not None for r in matched)}


ABSENT = "absent"  # part_distribution's value for an image that drew no subject of the kind


def part_distribution(readings: list[Reading], kind: str, parts: tuple[str, ...] = PARTS,
                      absent: int = 0) -> dict[str, dict[str, float]]:
    """Per part, the share of each value among the subjects of `kind` read with that part: what "a <kind>"
    draws (Infusion's concept-agnostic overfitting: after learning a concept, does the class word alone still
    draw the kind's variety, or the concept?). `absent`: images that drew no subject of the kind, each counted
    as the value ABSENT in every part (a class word that stopped drawing its kind has moved all the way)."""
    out = {}
    for part in parts:
        values = [r.parts.get(part) for r in readings if r.kind == kind and r.parts.get(part) is not None]
        values += [ABSENT] * absent
        out[part] = {v: values.count(v) / len(values) for v in sorted(set(values))} if values else {}
    return out


def total_variation(p: dict[str, float], q: dict[str, float]) -> float | None:
    """Half the L1 distance between two distributions over values (0: the same, 1: disjoint); None when
    either is empty."""
    if not p or not q:
        return None
    return 0.5 * sum(abs(p.get(v, 0.0) - q.get(v, 0.0)) for v in set(p) | set(q))
