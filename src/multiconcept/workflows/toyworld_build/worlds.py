"""What each stage of the build asks of the world it builds: scenes, their captions, a quick score.

"shapes" is the shipped ToyWorld (coloured, patterned shapes); "creatures" the world of subjects made of
parts (toyworld/creatures). Each stage calls the world's methods and nothing else of it, so one recipe
builds either.
"""

from __future__ import annotations

import numpy as np

from ...toyworld import creatures
from ...toyworld.check import check
from ...toyworld.creatures.check import analyse as analyse_creatures
from ...toyworld.render import (
    BACKGROUNDS,
    CLASS_NOUNS,
    COLOURS,
    PERSONAL_CONCEPTS,
    Appearance,
    SceneObject,
    describe,
)
from ...toyworld.scenes import base_training_scene, world_scene


def objects_from_dicts(objs: list[dict]) -> list[SceneObject]:
    return [SceneObject(o["noun"], Appearance(o["colour"], o["pattern"], o["second_colour"]),
                        o["size"], o["position"], tuple(o["box"]), None, o["concept"]) for o in objs]


class Shapes:
    name = "shapes"

    def base_scene(self, rng, cfg):
        return base_training_scene(rng, layout=cfg.base_layout)

    def world_scene(self, rng):
        return world_scene(rng)

    def meta(self, scene) -> dict:
        return {"background": scene.background, "objects": [o.to_dict() for o in scene.objects]}

    def foreground(self, scene) -> np.ndarray:
        return np.logical_or.reduce([o.mask for o in scene.objects])

    def is_single(self, meta: dict) -> bool:
        return len(meta["objects"]) == 1

    def base_caption(self, meta: dict, rng, cfg) -> str:
        """rng=None: the full caption (the curriculum's)."""
        return describe(objects_from_dicts(meta["objects"]), meta["background"], rng, colour_p=cfg.caption_colour_p)

    def clip_caption(self, meta: dict, rng) -> str:
        """Full captions half the time (retrieval is measured on those), short ones otherwise."""
        return describe(objects_from_dicts(meta["objects"]), meta["background"], None if rng.random() < 0.5 else rng)

    def full_caption(self, meta: dict) -> str:
        return describe(objects_from_dicts(meta["objects"]), meta["background"])

    def corpus(self, rng) -> list[str]:
        out = []
        for _ in range(3000):
            s = world_scene(rng)
            out += [s.caption, describe(s.objects, s.background)]
        return out + [f"a {c.description()}" for c in PERSONAL_CONCEPTS.values()]

    nouns = CLASS_NOUNS
    probe = "a photo of a small red striped star on the beach"

    quick_n = len(CLASS_NOUNS) * len(COLOURS)  # every class x colour once: the ship stage's raw / EMA choice

    def quick_prompts(self, n: int, seed: int) -> list[tuple[str, dict]]:
        """(prompt, expected), cycling through every class x colour."""
        rng = np.random.default_rng(seed)
        combos = [(noun, colour) for noun in CLASS_NOUNS for colour in COLOURS]
        order = rng.permutation(len(combos))
        out = []
        for i in range(n):
            noun, colour = combos[order[i % len(combos)]]
            bg = str(rng.choice(list(BACKGROUNDS)))
            out.append((f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {noun} on a {bg} background",
                        {"noun": noun, "colour": colour, "background": bg}))
        return out

    def quick_check(self, image, expected: dict) -> dict:
        r = check(image, expected["noun"], expected["colour"])
        return {"class_present": r["class_present"], "largest_is_class": r["largest_is_class"],
                "colour_present": r["colour_present"], "match": r["match"],
                "background": r["background"] == expected["background"]}


class Creatures:
    name = "creatures"

    def base_scene(self, rng, cfg):
        return creatures.base_training_scene(rng)

    def world_scene(self, rng):
        return creatures.world_scene(rng)

    def meta(self, scene) -> dict:
        return scene.to_dict()

    def foreground(self, scene) -> np.ndarray:
        return np.logical_or.reduce([s.mask for s in scene.subjects])

    def is_single(self, meta: dict) -> bool:
        return len(meta["subjects"]) == 1

    def base_caption(self, meta: dict, rng, cfg) -> str:
        return creatures.caption(meta, rng, colour_p=cfg.caption_colour_p)

    def clip_caption(self, meta: dict, rng) -> str:
        """Every part in words three times in four; the base's short caption otherwise, so the CLIP text
        tower (the base's, in this world) also knows the captions the base is trained on."""
        return creatures.full_caption(meta) if rng.random() < 0.75 else creatures.caption(meta, rng)

    def full_caption(self, meta: dict) -> str:
        return creatures.full_caption(meta)

    def corpus(self, rng) -> list[str]:
        out = []
        for _ in range(3000):
            m = creatures.world_scene(rng).to_dict()
            out += [creatures.full_caption(m), creatures.caption(m, rng)]
        return out

    nouns = creatures.KINDS
    probe = "a photo of a red robot with a cyan head, a cone hat and a white band on the beach"
    quick_n = 2 * len(creatures.KINDS) * len(creatures.BODY_COLOURS)

    def quick_prompts(self, n: int, seed: int) -> list[tuple[str, dict]]:
        """One subject, centred, kind x body colour cycled: the most detailed caption the base's words allow."""
        rng = np.random.default_rng(seed)
        combos = [(k, c) for k in creatures.KINDS for c in creatures.BODY_COLOURS]
        order = rng.permutation(len(combos))
        out = []
        for i in range(n):
            kind, colour = combos[order[i % len(combos)]]
            bg = str(rng.choice(list(creatures.BACKGROUNDS)))
            out.append((f"a {colour} {kind} in the center on {creatures.article(bg)} {bg} background",
                        {"kind": kind, "colour": colour, "background": bg}))
        return out

    def part_accuracy(self, images: np.ndarray, metas: list[dict]) -> dict:
        """Per part (and kind), the share the checker reads right on `images` (reconstructions or
        generations of the scenes in `metas`), over visible parts of subjects found near their place."""
        right: dict = {}
        for image, meta in zip(images, metas):
            found = analyse_creatures(image).subjects
            for s in meta["subjects"]:
                near = [r for r in found if abs(r.cx - s["cx"]) <= 4 * s["scale"] and abs(r.cy - s["cy"]) <= 4 * s["scale"]]
                for part in ("kind", *creatures.PARTS):
                    if part != "kind" and not s["visible"][part]:
                        continue
                    got = (near[0].kind if part == "kind" else near[0].parts[part]) if near else None
                    right.setdefault(part, []).append(got == s[part])
        return {part: float(np.mean(v)) for part, v in right.items()}

    def quick_check(self, image, expected: dict) -> dict:
        a = analyse_creatures(image)
        first = a.subjects[0] if len(a.subjects) == 1 else None
        return {"class_present": any(s.kind == expected["kind"] for s in a.subjects),
                "largest_is_class": first is not None and first.kind == expected["kind"],
                "colour_present": any(s.parts["body_colour"] == expected["colour"] for s in a.subjects),
                "match": first is not None and first.kind == expected["kind"]
                and first.parts["body_colour"] == expected["colour"],
                "background": a.background == expected["background"],
                "all_parts_read": first is not None and all(v is not None for v in first.parts.values())}


WORLDS = {"shapes": Shapes(), "creatures": Creatures()}
