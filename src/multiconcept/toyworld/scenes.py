"""Which creature scenes are drawn: the base's, the world's, the tuning-free data, the concepts' sources.

The base's layouts are fixed (one subject in the centre; two on the left and right; two on the left
and right overlapping), because on this recipe free layouts kept the base from learning shapes
(docs/toyworld.md, How the recipe was found). Free placement (any place, a range of sizes) goes into
the tuning-free training data and the world pool only. Two-subject scenes are of one kind in
`SAME_KIND_SHARE` of cases: "a robot and a robot" is the case FastComposer and Subject-Diffusion are
about. Captions say where subjects stand in about half the scenes, so a method's placement cannot come
from the words alone (../../shared/spec/toyworld2.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .render import (
    BACKGROUNDS,
    BODY_COLOURS,
    HATS,
    HEAD_COLOURS,
    IMAGE_SIZE,
    KINDS,
    MARKING_COLOURS,
    MARKINGS,
    PART_VALUES,
    Creature,
    Placed,
    Scene,
    Spec,
    article,
    render,
)

BASE_LAYOUTS = {"center": 0.4, "pair": 0.35, "overlap": 0.25}  # share of the base's scenes
SAME_KIND_SHARE = 0.4  # of two-subject scenes
POSITION_SAID = 0.5  # share of captions that say where subjects stand
COLOUR_SAID = 0.75  # share of subjects whose body colour a caption says (class prompts have none)
BACKGROUND_SAID = 0.75
# Centres (x) of the fixed layouts; y is the image centre. Overlapping subjects share 8 of their 24 px.
LAYOUT_X = {"center": (32,), "pair": (16, 48), "overlap": (24, 40)}
JITTER = 1.5  # px around a layout's centre
SCALES = (0.92, 1.08)  # the base's subjects: a little size variation, never small
FREE_SCALES = (0.6, 1.0)  # free placement: the tuning-free data's range


@dataclass(frozen=True)
class PersonalConcept:
    name: str
    creature: Creature


def _c(kind, body, head, hat, marking, mcol) -> Creature:
    return Creature(kind, body, head, hat, marking, mcol)


# Personal concepts: combinations the base never sees, 3 per kind in each set, the 3 of a kind differing in
# every part (so a swap between two subjects of one kind is unambiguous). The pilot set is for tuning the
# world; the evidence set, disjoint, for the claims (../../shared/spec/toyworld2.md: tune on pilot units,
# measure on others). Drawn once by a seeded design (each 3-valued part a permutation within a kind), with at
# least 8 pairs of two kinds differing in every part in each set (DisenDiff's sources).
PERSONAL_CONCEPTS: dict[str, PersonalConcept] = {p.name: p for p in [
    PersonalConcept("robot_a", _c("robot", "blue", "orange", "block", "spot", "black")),
    PersonalConcept("robot_b", _c("robot", "red", "purple", "cone", "band", "gray")),
    PersonalConcept("robot_c", _c("robot", "green", "pink", "horns", "stripe", "white")),
    PersonalConcept("bird_a", _c("bird", "blue", "orange", "block", "stripe", "white")),
    PersonalConcept("bird_b", _c("bird", "yellow", "cyan", "cone", "band", "gray")),
    PersonalConcept("bird_c", _c("bird", "green", "pink", "horns", "spot", "black")),
    PersonalConcept("ghost_a", _c("ghost", "green", "pink", "horns", "spot", "black")),
    PersonalConcept("ghost_b", _c("ghost", "red", "cyan", "cone", "stripe", "gray")),
    PersonalConcept("ghost_c", _c("ghost", "yellow", "purple", "block", "band", "white")),
    # evidence
    PersonalConcept("robot_d", _c("robot", "blue", "purple", "horns", "stripe", "white")),
    PersonalConcept("robot_e", _c("robot", "yellow", "orange", "cone", "band", "black")),
    PersonalConcept("robot_f", _c("robot", "red", "cyan", "block", "spot", "gray")),
    PersonalConcept("bird_d", _c("bird", "yellow", "orange", "block", "stripe", "gray")),
    PersonalConcept("bird_e", _c("bird", "blue", "purple", "horns", "spot", "white")),
    PersonalConcept("bird_f", _c("bird", "green", "pink", "cone", "band", "black")),
    PersonalConcept("ghost_d", _c("ghost", "yellow", "cyan", "cone", "band", "black")),
    PersonalConcept("ghost_e", _c("ghost", "red", "purple", "horns", "spot", "white")),
    PersonalConcept("ghost_f", _c("ghost", "green", "pink", "block", "stripe", "gray")),
]}
PILOT_CONCEPTS = tuple(list(PERSONAL_CONCEPTS)[:9])
EVIDENCE_CONCEPTS = tuple(list(PERSONAL_CONCEPTS)[9:])
_PERSONAL = {p.creature for p in PERSONAL_CONCEPTS.values()}


def concept(name: str) -> PersonalConcept:
    if name not in PERSONAL_CONCEPTS:
        raise ValueError(f"unknown concept {name!r}; choose from {sorted(PERSONAL_CONCEPTS)}")
    return PERSONAL_CONCEPTS[name]


def differ_in_every_part(a: Creature, b: Creature) -> bool:
    return all(getattr(a, p) != getattr(b, p) for p in PART_VALUES)


def two_kind_pairs(n: int, names: tuple[str, ...] = EVIDENCE_CONCEPTS) -> list[tuple[str, str]]:
    """Up to n pairs of concepts of two different kinds (DisenDiff's two-concept sources): each next pair of
    the least-used concepts, among those preferring pairs that differ in every part (a leaked part is never
    ambiguous there). The first k pairs are the same for any n >= k, so a table can grow by units."""
    creature = {k: concept(k).creature for k in names}
    candidates = [(a, b) for a, b in itertools.combinations(names, 2) if creature[a].kind != creature[b].kind]
    candidates.sort(key=lambda c: not differ_in_every_part(creature[c[0]], creature[c[1]]))
    pairs, uses = [], dict.fromkeys(names, 0)
    while len(pairs) < min(n, len(candidates)):
        a, b = min((c for c in candidates if c not in pairs), key=lambda c: (uses[c[0]] + uses[c[1]], candidates.index(c)))
        pairs.append((a, b))
        uses[a] += 1
        uses[b] += 1
    return pairs


def random_creature(rng: np.random.Generator, kind: str | None = None, personal: bool = False) -> Creature:
    """Every part drawn uniformly; personal=False never returns a personal concept."""
    while True:
        c = Creature(kind or str(rng.choice(KINDS)), str(rng.choice(list(BODY_COLOURS))),
                     str(rng.choice(list(HEAD_COLOURS))), str(rng.choice(HATS)), str(rng.choice(MARKINGS)),
                     str(rng.choice(list(MARKING_COLOURS))))
        if personal or c not in _PERSONAL:
            return c


def _pick(rng: np.random.Generator, shares: dict[str, float]) -> str:
    keys = list(shares)
    return str(rng.choice(keys, p=np.asarray([shares[k] for k in keys]) / sum(shares.values())))


def layout_specs(creatures: list[Creature], layout: str, rng: np.random.Generator,
                 concepts: list[str | None] | None = None) -> list[Spec]:
    """Frames for one fixed layout. Two subjects come left, right; with "overlap" either may be in front
    (drawn last)."""
    xs = LAYOUT_X[layout]
    if len(xs) != len(creatures):
        raise ValueError(f"layout {layout!r} holds {len(xs)} subjects, not {len(creatures)}")
    concepts = concepts or [None] * len(creatures)
    names = ["center"] if layout == "center" else ["left", "right"]
    specs = [Spec(c, x + rng.uniform(-JITTER, JITTER), IMAGE_SIZE / 2 + rng.uniform(-JITTER, JITTER),
                  float(rng.uniform(*SCALES)), pos, k) for c, x, pos, k in zip(creatures, xs, names, concepts)]
    return specs[::-1] if layout == "overlap" and rng.random() < 0.5 else specs


def free_specs(creatures: list[Creature], rng: np.random.Generator, concepts: list[str | None] | None = None,
               tries: int = 50) -> list[Spec]:
    """Anywhere, any size in FREE_SCALES, with at most a third of a subject's width hidden."""
    concepts = concepts or [None] * len(creatures)
    for _ in range(tries):
        specs = []
        for c, name in zip(creatures, concepts):
            s = float(rng.uniform(*FREE_SCALES))
            x = rng.uniform(12 * s + 1, IMAGE_SIZE - 12 * s - 1)
            y = rng.uniform(22 * s + 1, IMAGE_SIZE - 21 * s - 1)
            specs.append(Spec(c, float(x), float(y), s, "free", name))
        if all(abs(a.cx - b.cx) >= 16 * min(a.scale, b.scale) or abs(a.cy - b.cy) >= 30 * min(a.scale, b.scale)
               for i, a in enumerate(specs) for b in specs[i + 1:]):
            return specs
    raise RuntimeError("no free layout found")  # not reached for two subjects at these sizes


def caption(scene: dict, rng: np.random.Generator | None = None, colour_p: float = COLOUR_SAID,
            position_p: float = POSITION_SAID, background_p: float = BACKGROUND_SAID, tokens=None) -> str:
    """The base's caption of a scene (its `to_dict()`): each subject by kind (and, with probability
    colour_p, body colour), positions said for all subjects or none, the background sometimes.
    rng=None: the most detailed caption the vocabulary allows. tokens: per subject, words put
    before the kind ('<s1>')."""
    return caption_in_order(scene, rng, colour_p, position_p, background_p, tokens)[0]


def caption_in_order(scene: dict, rng: np.random.Generator | None = None, colour_p: float = COLOUR_SAID,
                     position_p: float = POSITION_SAID, background_p: float = BACKGROUND_SAID,
                     tokens=None) -> tuple[str, list[int]]:
    """`caption`, and the indices of the subjects in the order it names them."""
    def keep(p):
        return rng is None or rng.random() < p
    subjects = scene["subjects"]
    order = sorted(range(len(subjects)), key=lambda i: subjects[i]["cx"])  # named left to right
    say_position = scene["layout"] != "free" and keep(position_p)
    if not say_position and rng is not None and len(order) > 1 and rng.random() < 0.5:
        order = order[::-1]  # without positions, the order says nothing either
    phrases = []
    for i in order:
        s = subjects[i]
        words = f"{s['body_colour']} {s['kind']}" if keep(colour_p) else s["kind"]
        if tokens is not None:
            words = f"{tokens[i]} {words}"
        phrase = f"{article(words)} {words}"
        if say_position:
            phrase += {"center": " in the center", "left": " on the left", "right": " on the right"}[s["position"]]
        phrases.append(phrase)
    text = " and ".join(phrases)
    bg = scene["background"]
    return (f"{text} on {article(bg)} {bg} background" if keep(background_p) else text), order


def full_caption(scene: dict) -> str:
    """Every part of every subject in words, left to right: the CLIPs' captions (the base never reads them)."""
    subjects = sorted(scene["subjects"], key=lambda s: s["cx"])
    text = " and ".join(f"{article(s['body_colour'])} {Creature.from_dict(s).full_description()}" for s in subjects)
    return f"{text} on {article(scene['background'])} {scene['background']} background"


def base_training_scene(rng: np.random.Generator) -> Scene:
    """A scene for the base model: a fixed layout, never a personal concept."""
    layout = _pick(rng, BASE_LAYOUTS)
    n = 1 if layout == "center" else 2
    first = random_creature(rng)
    creatures = [first] if n == 1 else [first, random_creature(
        rng, kind=first.kind if rng.random() < SAME_KIND_SHARE else None)]
    scene = render(layout_specs(creatures, layout, rng), str(rng.choice(list(BACKGROUNDS))), layout)
    scene.caption = caption(scene.to_dict(), rng)
    return scene


def world_scene(rng: np.random.Generator, free_share: float = 0.3) -> Scene:
    """Any creature, personal concepts included (a quarter of subjects), fixed or free layouts: the
    VAE's and the evaluators' data, which never see the base's prompts."""
    layout = "free" if rng.random() < free_share else _pick(rng, BASE_LAYOUTS)
    n = 1 if layout == "center" else 2 if layout != "free" else int(rng.integers(1, 3))
    creatures, names = [], []
    for _ in range(n):
        if rng.random() < 0.25:
            p = PERSONAL_CONCEPTS[str(rng.choice(list(PERSONAL_CONCEPTS)))]
            creatures.append(p.creature)
            names.append(p.name)
        else:
            creatures.append(random_creature(rng, personal=True))
            names.append(None)
    specs = free_specs(creatures, rng, names) if layout == "free" else layout_specs(creatures, layout, rng, names)
    scene = render(specs, str(rng.choice(list(BACKGROUNDS))), layout)
    scene.caption = full_caption(scene.to_dict())
    return scene


# ---------------------------------------------------------------- the methods' data

def two_concept_scene(concept_a: str, concept_b: str, seed: int) -> Scene:
    """One image holding two personal concepts side by side (DisenDiff's and Break-A-Scene's input);
    subjects[0] is concept_a. caption_parts' template has {a}/{b} for the kind (class prompt) or
    '<token> kind' (concept prompt)."""
    a, b = concept(concept_a), concept(concept_b)
    if concept_a == concept_b:
        raise ValueError("two_concept_scene needs two different concepts")
    rng = np.random.default_rng(seed)
    specs = layout_specs([a.creature, b.creature], "pair", rng, [a.name, b.name])
    if rng.random() < 0.5:  # which concept stands on the left
        specs = [Spec(s.creature, other.cx, s.cy, s.scale, other.position, s.concept) for s, other in zip(specs, specs[::-1])]
    background = str(rng.choice(list(BACKGROUNDS)))
    scene = render(specs, background, "pair")
    where = {s.concept: s.position for s in scene.subjects}
    scene.caption_parts = {"template": f"a {{a}} on the {where[a.name]} and a {{b}} on the {where[b.name]} "
                                       f"on {article(background)} {background} background",
                           "a": a.creature.kind, "b": b.creature.kind}
    scene.caption = scene.caption_parts["template"].format(a=a.creature.kind, b=b.creature.kind)
    return scene


def concept_reference_set(name: str, n: int, seed: int, background: str | None = None) -> list[Scene]:
    """n images of one personal concept, centred, on varied backgrounds, or all on `background` (one context:
    every other background is one the concept was never seen in)."""
    c = concept(name)
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        bg = background or str(rng.choice(list(BACKGROUNDS)))
        scene = render(layout_specs([c.creature], "center", rng, [c.name]), bg, "center")
        scene.caption_parts = {"template": f"a {{a}} in the center on {article(bg)} {bg} background",
                               "a": c.creature.kind}
        scene.caption = scene.caption_parts["template"].format(a=c.creature.kind)
        scenes.append(scene)
    return scenes


def subject_scene(rng: np.random.Generator, free_share: float = 0.5, colour_p: float = 0.0) -> tuple[Scene, list[int]]:
    """A tuning-free training scene (FastComposer, Subject-Diffusion) and the order its caption names the
    subjects: 1 or 2 subjects (of one kind in SAME_KIND_SHARE of pairs), free placement in `free_share` of
    scenes, the base's layouts otherwise. The caption says kinds and, in the base's layouts half the time,
    places, never a part: only the subject images can say whose robot it is. colour_p > 0 says body
    colours too (a captioned dataset's way; the same scenes for any colour_p)."""
    free = rng.random() < free_share
    layout = "free" if free else _pick(rng, BASE_LAYOUTS)
    n = int(rng.integers(1, 3)) if free else 1 if layout == "center" else 2
    first = random_creature(rng)
    creatures = [first] if n == 1 else [first, random_creature(
        rng, kind=first.kind if rng.random() < SAME_KIND_SHARE else None)]
    specs = free_specs(creatures, rng) if free else layout_specs(creatures, layout, rng)
    scene = render(specs, str(rng.choice(list(BACKGROUNDS))), layout)
    scene.caption, order = caption_in_order(scene.to_dict(), rng, colour_p=colour_p)
    return scene, order


def subject_dataset(n: int, seed: int, colour_p: float = 0.0) -> list[tuple[Scene, list[Placed]]]:
    """n `subject_scene`s, each with its subjects in the order its caption names them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene, order = subject_scene(rng, colour_p=colour_p)
        out.append((scene, [scene.subjects[i] for i in order]))
    return out
