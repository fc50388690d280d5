"""What each stage of the build asks of ToyWorld: scenes, their captions, a quick score.

The stages call these methods and nothing else of the world, so the recipe reads in one place what it
trains on.
"""

from __future__ import annotations

import numpy as np

from ... import toyworld as tw


class Creatures:
    """The creatures world as the build's stages see it."""

    def base_scene(self, rng, cfg):
        return tw.base_training_scene(rng)

    def world_scene(self, rng):
        return tw.world_scene(rng)

    def meta(self, scene) -> dict:
        return scene.to_dict()

    def foreground(self, scene) -> np.ndarray:
        return np.logical_or.reduce([s.mask for s in scene.subjects])

    def is_single(self, meta: dict) -> bool:
        return len(meta["subjects"]) == 1

    def base_caption(self, meta: dict, rng, cfg) -> str:
        return tw.caption(meta, rng, colour_p=cfg.caption_colour_p)

    def clip_caption(self, meta: dict, rng) -> str:
        """Every part in words three times in four; the base's short caption otherwise, so the CLIP text
        tower (the base's, in this world) also knows the captions the base is trained on."""
        return tw.full_caption(meta) if rng.random() < 0.75 else tw.caption(meta, rng)

    def full_caption(self, meta: dict) -> str:
        return tw.full_caption(meta)

    def corpus(self, rng) -> list[str]:
        out = []
        for _ in range(3000):
            m = tw.world_scene(rng).to_dict()
            out += [tw.full_caption(m), tw.caption(m, rng)]
        return out

    nouns = tw.KINDS
    probe = "a photo of a red robot with a cyan head, a cone hat and a white band on the beach"
    quick_n = 2 * len(tw.KINDS) * len(tw.BODY_COLOURS)

    def quick_prompts(self, n: int, seed: int) -> list[tuple[str, dict]]:
        """One subject, centred, kind x body colour cycled: the most detailed caption the base's words allow."""
        rng = np.random.default_rng(seed)
        combos = [(k, c) for k in tw.KINDS for c in tw.BODY_COLOURS]
        order = rng.permutation(len(combos))
        out = []
        for i in range(n):
            kind, colour = combos[order[i % len(combos)]]
            bg = str(rng.choice(list(tw.BACKGROUNDS)))
            out.append((f"a {colour} {kind} in the center on {tw.article(bg)} {bg} background",
                        {"kind": kind, "colour": colour, "background": bg}))
        return out

    def part_accuracy(self, images: np.ndarray, metas: list[dict]) -> dict:
        """Per part (and kind), the share the checker reads right on `images` (reconstructions or
        generations of the scenes in `metas`), over visible parts of subjects found near their place."""
        right: dict = {}
        for image, meta in zip(images, metas):
            found = tw.analyse(image).subjects
            for s in meta["subjects"]:
                near = [r for r in found if abs(r.cx - s["cx"]) <= 4 * s["scale"] and abs(r.cy - s["cy"]) <= 4 * s["scale"]]
                for part in ("kind", *tw.PARTS):
                    if part != "kind" and not s["visible"][part]:
                        continue
                    got = (near[0].kind if part == "kind" else near[0].parts[part]) if near else None
                    right.setdefault(part, []).append(got == s[part])
        return {part: float(np.mean(v)) for part, v in right.items()}

    def quick_check(self, image, expected: dict) -> dict:
        a = tw.analyse(image)
        first = a.subjects[0] if len(a.subjects) == 1 else None
        return {"class_present": any(s.kind == expected["kind"] for s in a.subjects),
                "largest_is_class": first is not None and first.kind == expected["kind"],
                "colour_present": any(s.parts["body_colour"] == expected["colour"] for s in a.subjects),
                "match": first is not None and first.kind == expected["kind"]
                and first.parts["body_colour"] == expected["colour"],
                "background": a.background == expected["background"],
                "all_parts_read": first is not None and all(v is not None for v in first.parts.values())}


WORLD = Creatures()
