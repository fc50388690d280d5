"""Pilots: does the creatures world pose the fine-tuning methods' problems? (issue: a ToyWorld that poses them)

    .venv/bin/python benchmarks/creatures_pilots.py --base BASE_FOLDER --out runs/pilots [--pilot identity|leakage|all]
        [--units 8] [--train-seeds 1] [--images 16] [--sample-steps 30]
    .venv/bin/python benchmarks/creatures_pilots.py --base tiny --out /tmp/p --quick     # every code path, minutes

identity  Textual Inversion vs Custom Diffusion on each pilot concept (4 centred references): per-part identity
          of "a <c1> KIND" generations, read by the checker. The world poses the problem when TI's identity is
          measurably below CD's (a paired 95% interval over concepts above zero for CD - TI).
leakage   Custom Diffusion learned from ONE image holding two concepts (two kinds, differing in every part) vs
          the same concept learned from the same image with the other concept left out (the control): in
          "a <c1> KIND" generations, the share of parts drawn with the OTHER concept's values. The world poses
          DisenDiff's problem when the excess (two-concept - control) is measurably above zero and above the
          checker's own rate on renders of the same layout.

Units are concepts (identity) or pairs (leakage), training seeds averaged within a unit; every cell is cached
in OUT, so a killed run resumes. Concepts are the pilot set (toyworld.creatures.PILOT_CONCEPTS), disjoint from
the evidence's.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

# On ToyWorld every method trains the same way (benchmarks/disendiff_toyworld.py): captions in the world's
# words, no augmentation (the base draws subjects at fixed places), batch 2, whole-image loss.
COMMON = {"augment": "false", "templates": "a {}", "batch_size": "2", "grad_accum": "1", "loss_region": "all"}
SETTINGS = {"textual-inversion": {"templates": "a {}", "lr": "1e-3", "steps": "500", "batch_size": "2",
                                  "grad_accum": "1"},
            "custom-diffusion": {**COMMON, "lr": "1e-4", "steps": "250"}}
QUICK = {"steps": "3"}


def learn_cell(out: Path, method: str, tokens: list[tuple[str, str]], sources, base: str, seed: int,
               quick: bool) -> Path:
    from multiconcept.api import Concept, learn

    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {**SETTINGS[method], **(QUICK if quick else {}), "seed": str(seed)}
    from multiconcept.api import parse_settings

    learn(method, [Concept(t, kind) for t, kind in tokens], sources, out, base=base,
          settings=parse_settings(method, settings))
    return out


def readings(bundle: Path, prompt: str, base: str, n: int, sample_steps: int, seed: int = 1000):
    from multiconcept.api import SampleSettings, generate
    from multiconcept.toyworld import creatures as cw

    images = generate(prompt, [bundle], n=n, seed=seed, base=base, sampling=SampleSettings(steps=sample_steps, guidance=4.0))
    return [cw.analyse(np.asarray(img.convert("RGB").resize((64, 64)))).subjects for img in images], images


def single(found):
    return found[0] if len(found) == 1 else None


def identity_pilot(args, out: Path) -> dict:
    from multiconcept.api import Source
    from multiconcept.toyworld import creatures as cw

    rows = {}
    for name in cw.PILOT_CONCEPTS[: args.units]:
        c = cw.concept(name).creature
        refs = cw.concept_reference_set(name, 4, seed=11)
        sources = [Source(r.pil(), masks={"<c1>": _mask(r.subjects[0].mask)}) for r in refs]
        unit = {}
        for method in SETTINGS:
            scores, unnamed = [], []
            for seed in range(args.train_seeds):
                bundle = learn_cell(out / "cells" / name / f"{method}-{seed}.safetensors", method, [("<c1>", c.kind)],
                                    sources, args.base, seed, args.quick)
                found, _ = readings(bundle, f"a <c1> {c.kind} on a gray background", args.base, args.images,
                                    args.sample_steps)
                scores += [cw.identity(single(f), c) for f in found]
                unnamed += [cw.identity(single(f), c, cw.UNNAMED_PARTS) for f in found]
            unit[method] = {"identity": float(np.mean(scores)), "identity_unnamed": float(np.mean(unnamed))}
        rows[name] = unit
        print(name, json.dumps(unit), flush=True)
    return rows


def _mask(mask: np.ndarray):
    from PIL import Image

    return Image.fromarray(mask.astype(np.uint8) * 255)


def leakage_pairs(units: int) -> list[tuple[str, str]]:
    from multiconcept.toyworld import creatures as cw

    pairs = [(a, b) for a, b in itertools.permutations(cw.PILOT_CONCEPTS, 2)
             if cw.concept(a).creature.kind != cw.concept(b).creature.kind
             and cw.differ_in_every_part(cw.concept(a).creature, cw.concept(b).creature)]
    return pairs[:units]


def leakage_pilot(args, out: Path) -> dict:
    from multiconcept.api import Source
    from multiconcept.toyworld import creatures as cw

    rows = {}
    for a, b in leakage_pairs(args.units):
        ca, cb = cw.concept(a).creature, cw.concept(b).creature
        scene = cw.two_concept_scene(a, b, seed=21)
        alone = cw.render([cw.Spec(s.creature, s.cx, s.cy, s.scale, s.position, s.concept) for s in scene.subjects[:1]],
                          scene.background, "center")
        both = [Source(scene.pil(), masks={"<c1>": _mask(scene.subjects[0].mask), "<c2>": _mask(scene.subjects[1].mask)})]
        control = [Source(alone.pil(), masks={"<c1>": _mask(alone.subjects[0].mask)})]
        unit = {}
        for label, tokens, sources in (("two-concept", [("<c1>", ca.kind), ("<c2>", cb.kind)], both),
                                       ("control", [("<c1>", ca.kind)], control)):
            other = []
            for seed in range(args.train_seeds):
                bundle = learn_cell(out / "cells" / f"{a}+{b}" / f"{label}-{seed}.safetensors", "custom-diffusion",
                                    tokens, sources, args.base, seed, args.quick)
                found, _ = readings(bundle, f"a <c1> {ca.kind} on a gray background", args.base, args.images,
                                    args.sample_steps)
                other += [cw.part_outcomes(single(f), ca, cb)["other"] for f in found]
            unit[label] = float(np.mean(other))
        renders = cw.analyse(alone.image).subjects
        unit["checker_on_render"] = cw.part_outcomes(single(renders), ca, cb)["other"]
        rows[f"{a}+{b}"] = unit
        print(a, b, json.dumps(unit), flush=True)
    return rows


def summarise(results: dict) -> None:
    from multiconcept.metrics.stats import mean_sem, paired_difference

    if "identity" in results:
        rows = results["identity"].values()
        for key in ("identity", "identity_unnamed"):
            ti = [r["textual-inversion"][key] for r in rows]
            cd = [r["custom-diffusion"][key] for r in rows]
            d = paired_difference(cd, ti)
            print(f"{key}: TI {mean_sem(ti).text()}  CD {mean_sem(cd).text()}  CD - TI {d.mean:+.3f} "
                  f"[{d.low:+.3f}, {d.high:+.3f}] (n = {d.n})")
    if "leakage" in results:
        rows = list(results["leakage"].values())
        two, ctl = [r["two-concept"] for r in rows], [r["control"] for r in rows]
        d = paired_difference(two, ctl)
        print(f"leakage (other's parts in a one-concept prompt): two-concept {mean_sem(two).text()}  control "
              f"{mean_sem(ctl).text()}  excess {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] (n = {d.n}); checker on "
              f"renders {np.mean([r['checker_on_render'] for r in rows]):.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base", required=True, help="the creatures base: its built folder (OUT/base), or 'tiny'")
    ap.add_argument("--pilot", choices=("identity", "leakage", "all"), default="all")
    ap.add_argument("--units", type=int, default=8)
    ap.add_argument("--train-seeds", type=int, default=1)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="3 training steps, 2 units, 2 images: code paths only")
    args = ap.parse_args()
    if args.quick:
        args.units, args.images, args.sample_steps = 2, 2, 2
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.pilot in ("identity", "all"):
        results["identity"] = identity_pilot(args, args.out)
    if args.pilot in ("leakage", "all"):
        results["leakage"] = leakage_pilot(args, args.out)
    results_path.write_text(json.dumps(results, indent=1))
    summarise(results)


if __name__ == "__main__":
    main()
