"""Pilots: does the creatures world pose the fine-tuning methods' problems? (issue: a ToyWorld that poses them)

    .venv/bin/python benchmarks/creatures_pilots.py --base OUT/base --encoder OUT/encoder --out runs/pilots
        [--pilot identity|leakage|fastcomposer|subject-diffusion|all] [--units 8] [--train-seeds 1] [--images 16]
        [--sample-steps 30] [--encoder-minutes 30]
    .venv/bin/python benchmarks/creatures_pilots.py --base tiny --out /tmp/p --quick     # every code path, minutes

identity  Textual Inversion vs Custom Diffusion on each pilot concept (4 centred references): per-part identity
          of "a <c1> KIND" generations, read by the checker. The world poses the problem when TI's identity is
          measurably below CD's (a paired 95% interval over concepts above zero for CD - TI).
leakage   Custom Diffusion learned from ONE image holding two concepts (two kinds, differing in every part) vs
          the same concept learned from the same image with the other concept left out (the control): in
          "a <c1> KIND" generations, the share of parts drawn with the OTHER concept's values. The world poses
          DisenDiff's problem when the excess (two-concept - control) is measurably above zero and above the
          checker's own rate on renders of the same layout.
fastcomposer, subject-diffusion
          Each tuning-free model trained WITHOUT its remedy (FastComposer without L_loc; Subject-Diffusion without
          attention control) on `--data toyworld`, image encoder the world's encoder CLIP. Two subjects
          of one kind ("a robot <img> and a robot <img>", Subject-Diffusion with left and right boxes): the share
          of parts drawn with the other subject's values among the parts read on the subjects found, against the
          control (each subject composed alone, the two images' readings scored as one pair). The world poses
          the problem when the excess is measurably above zero and above the checker's own swap rate on
          renders of the same two subjects side by side and overlapping. The same counts per part follow (a
          model that carries only some parts can swap those while the rest come out at chance). Every image is
          saved in OUT/images, and a later run reads it there instead of composing it again.

Units are concepts (identity) or pairs (leakage), training seeds averaged within a unit; every cell is cached
in OUT, so a killed run resumes. Concepts are the pilot set (toyworld.PILOT_CONCEPTS), disjoint from
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
    from multiconcept import toyworld as cw
    from multiconcept.api import SampleSettings, generate

    images = generate(prompt, [bundle], n=n, seed=seed, base=base, sampling=SampleSettings(steps=sample_steps, guidance=4.0))
    return [cw.analyse(np.asarray(img.convert("RGB").resize((64, 64)))).subjects for img in images], images


def asked(found, creature):
    """The reading that stands for the subject asked for: the best match among those found (None if none)."""
    from multiconcept import toyworld as cw

    return cw.match(found, [creature])[0]


def most_of(found, own, other) -> float:
    """Leakage in one image: the largest share of `other`'s parts on any subject found (a whole second
    subject counts as well as a part on the asked one); the pairs differ in every part."""
    from multiconcept import toyworld as cw

    return cw.leakage(found, [own], other, cw.PARTS)


def identity_pilot(args, out: Path) -> dict:
    from multiconcept import toyworld as cw
    from multiconcept.api import Source

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
                scores += [cw.identity(asked(f, c), c) for f in found]
                unnamed += [cw.identity(asked(f, c), c, cw.UNNAMED_PARTS) for f in found]
            unit[method] = {"identity": float(np.mean(scores)), "identity_unnamed": float(np.mean(unnamed))}
        rows[name] = unit
        print(name, json.dumps(unit), flush=True)
    return rows


def _mask(mask: np.ndarray):
    from PIL import Image

    return Image.fromarray(mask.astype(np.uint8) * 255)


def leakage_pairs(units: int) -> list[tuple[str, str]]:
    from multiconcept import toyworld as cw

    pairs = [(a, b) for a, b in itertools.permutations(cw.PILOT_CONCEPTS, 2)
             if cw.concept(a).creature.kind != cw.concept(b).creature.kind
             and cw.differ_in_every_part(cw.concept(a).creature, cw.concept(b).creature)]
    return pairs[:units]


def leakage_pilot(args, out: Path) -> dict:
    from multiconcept import toyworld as cw
    from multiconcept.api import Source

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
                other += [most_of(f, ca, cb) for f in found]
            unit[label] = float(np.mean(other))
        renders = cw.analyse(alone.image).subjects
        unit["checker_on_render"] = most_of(renders, ca, cb)
        rows[f"{a}+{b}"] = unit
        print(a, b, json.dumps(unit), flush=True)
    return rows


def same_kind_pairs(units: int) -> list[tuple[str, str]]:
    from multiconcept import toyworld as cw

    pairs = [(a, b) for a, b in itertools.combinations(cw.PILOT_CONCEPTS, 2)
             if cw.concept(a).creature.kind == cw.concept(b).creature.kind
             and cw.differ_in_every_part(cw.concept(a).creature, cw.concept(b).creature)]
    return pairs[:units]


# Without each paper's remedy; ToyWorld settings as benchmarks/fastcomposer_toyworld.py and
# subject_diffusion_toyworld.py train them (lr 1e-4, no grayscale crops: colour is identity here).
ENCODERS = {"fastcomposer": ["--loc-weight", "0", "--batch-size", "16", "--param", "aug_grayscale_p=0"],
            "subject-diffusion": ["--param", "attention_control=false", "--batch-size", "8",
                                  "--param", "warmup_steps=100"]}


def train_encoder(args, method: str, out: Path) -> Path:
    import subprocess
    import sys

    cmd = [str(Path(sys.executable).parent / "multiconcept"), "train-encoder", "--method", method, "--data",
           "toyworld", "--base", args.base, "--out", str(out), "--lr", "1e-4", "--steps",
           "3" if args.quick else "100000", "--max-minutes", str(args.encoder_minutes), "--param", "checkpoint_every=100",
           "--resume", "--no-progress", *ENCODERS[method]]
    if args.encoder:
        cmd += ["--image-encoder", args.encoder]
    if not (out / f"{method.replace('-', '_')}.json").exists() or args.encoder_minutes:
        subprocess.run(cmd, check=True)
    return out


def tuning_free_pilot(args, out: Path, method: str) -> dict:
    from PIL import Image

    from multiconcept import toyworld as cw
    from multiconcept.api import ComposeSettings, SubjectComposeSettings, compose

    model = train_encoder(args, method, out / "models" / method)
    settings = (ComposeSettings(steps=args.sample_steps) if method == "fastcomposer"
                else SubjectComposeSettings(steps=args.sample_steps))
    where = {"left": "0.0,0.1,0.5,0.95", "right": "0.5,0.1,1.0,0.95", "center": "0.25,0.1,0.75,0.95"}

    def read(prompt, subjects, boxes, name):
        folder = out / "images" / method
        paths = [folder / f"{name}_{i:02d}.png" for i in range(args.images)]
        if all(p.exists() for p in paths):  # composed by an earlier run of the same model: read again, not redrawn
            images = [Image.open(p) for p in paths]
        else:
            images = compose(prompt, subjects, model, n=args.images, seed=2000, settings=settings, base=args.base,
                             **({"locations": boxes} if method == "subject-diffusion" else {}))
            folder.mkdir(parents=True, exist_ok=True)
            for img, path in zip(images, paths):
                img.save(path)
        return [cw.analyse(np.asarray(img.convert("RGB").resize((64, 64)))).subjects for img in images]

    def mean(rows, key):
        values = [r[key] for r in rows if r[key] is not None]
        return float(np.mean(values)) if values else None

    rows = {}
    for a, b in same_kind_pairs(args.units):
        ca, cb = cw.concept(a).creature, cw.concept(b).creature
        ra, rb = cw.write_reference(a, out / "refs"), cw.write_reference(b, out / "refs")
        pair = read(f"a {ca.kind} <img> and a {cb.kind} <img> on a gray background", [ra, rb],
                    [where["left"], where["right"]], f"{a}+{b}")
        alone_a = read(f"a {ca.kind} <img> on a gray background", [ra], [where["center"]], a)
        alone_b = read(f"a {cb.kind} <img> on a gray background", [rb], [where["center"]], b)
        # the control: the same two subjects, one per image, scored as one pair of readings
        together = [cw.read_shares(cw.match(f, [ca, cb]), [(ca, cb), (cb, ca)]) for f in pair]
        apart = [cw.read_shares([asked(fa, ca), asked(fb, cb)], [(ca, cb), (cb, ca)])
                 for fa, fb in zip(alone_a, alone_b)]
        on_renders = [cw.read_shares(cw.match(cw.analyse(cw.render(cw.layout_specs([ca, cb], layout,
                                                                               np.random.default_rng(s)),
                                                                 "gray", layout).image).subjects, [ca, cb]),
                                   [(ca, cb), (cb, ca)])["other"]
                      for layout in ("pair", "overlap") for s in range(4)]
        unit = {"pair_other": mean(together, "other"), "pair_own": mean(together, "own"),
                "pair_found": mean(together, "found"), "control_other": mean(apart, "other"),
                "control_own": mean(apart, "own"), "control_found": mean(apart, "found"),
                "checker_on_renders": float(np.mean(on_renders)),
                "by_part": {p: {f"{arm}_{k}": mean([r["parts"][p] for r in shares], k)
                                for arm, shares in (("pair", together), ("control", apart)) for k in ("other", "own")}
                            for p in cw.PARTS}}
        rows[f"{a}+{b}"] = unit
        print(method, a, b, json.dumps(unit), flush=True)
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
    for method in ("fastcomposer", "subject-diffusion"):
        if method in results:
            rows = [r for r in results[method].values() if r["pair_other"] is not None
                    and r["control_other"] is not None]  # a pair with no subject read in either says nothing
            pair, ctl = [r["pair_other"] for r in rows], [r["control_other"] for r in rows]
            d = paired_difference(pair, ctl)
            own, own_ctl = [r["pair_own"] for r in rows], [r.get("control_own") for r in rows]
            print(f"{method} without its remedy, same-kind pairs: swapped parts {mean_sem(pair).text()}  control "
                  f"{mean_sem(ctl).text()}  excess {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] (n = {d.n}); own parts "
                  f"{np.mean(own):.3f} (alone {np.mean(own_ctl) if None not in own_ctl else float('nan'):.3f}); "
                  f"subjects found {np.mean([r['pair_found'] for r in rows]):.2f} of 2; checker on renders "
                  f"{np.mean([r['checker_on_renders'] for r in rows]):.3f}")
            for part in rows[0].get("by_part", {}):
                cells = [r["by_part"][part] for r in rows]
                d = paired_difference([c["pair_other"] for c in cells], [c["control_other"] for c in cells])
                print(f"  {part}: other's value {mean_sem([c['pair_other'] for c in cells]).text()} in pairs, "
                      f"{mean_sem([c['control_other'] for c in cells]).text()} alone, excess {d.mean:+.3f} "
                      f"[{d.low:+.3f}, {d.high:+.3f}]; own {mean_sem([c['pair_own'] for c in cells]).text()} in pairs, "
                      f"{mean_sem([c['control_own'] for c in cells]).text()} alone")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base", required=True, help="the creatures base: its built folder (OUT/base), or 'tiny'")
    ap.add_argument("--pilot", choices=("identity", "leakage", "fastcomposer", "subject-diffusion", "all"), default="all")
    ap.add_argument("--encoder", default=None, help="the world's encoder CLIP (OUT/encoder): the tuning-free image encoder")
    ap.add_argument("--encoder-minutes", type=float, default=30.0, help="training minutes of each tuning-free model "
                    "(resumed up to this total; 0: use the trained model as it is)")
    ap.add_argument("--units", type=int, default=8)
    ap.add_argument("--train-seeds", type=int, default=1)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="3 training steps, 2 units, 2 images: code paths only")
    args = ap.parse_args()
    if args.quick:
        args.units, args.images, args.sample_steps, args.encoder_minutes = 2, 2, 2, 0.2
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    pilots = {"identity": identity_pilot, "leakage": leakage_pilot,
              "fastcomposer": lambda a, o: tuning_free_pilot(a, o, "fastcomposer"),
              "subject-diffusion": lambda a, o: tuning_free_pilot(a, o, "subject-diffusion")}
    for name, run in pilots.items():
        if args.pilot in (name, "all"):
            results[name] = run(args, args.out)
            results_path.write_text(json.dumps(results, indent=1))  # a later pilot killed keeps this one's rows
    summarise(results)


if __name__ == "__main__":
    main()
