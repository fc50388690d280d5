"""Tuning-free against fine-tuning on the creatures world: the same subjects, per-part identity.

    .venv/bin/python benchmarks/tuning_free_vs_finetuning.py --out runs/tf-vs-ft \\
        --fastcomposer FOLDER --subject-diffusion FOLDER
    .venv/bin/python benchmarks/tuning_free_vs_finetuning.py --out /tmp/tf --quick    # code paths, tiny base

Both tuning-free papers trade identity for time: no per-subject training, less likeness than fine-tuning.
Units: the 9 evidence concepts. Each one's subject is ONE centred reference render (`toyworld.write_reference`),
and each arm draws it in "a <kind> ... on a <bg> background", 4 images on each of 4 backgrounds, seeds fixed:
  FastComposer        the reference and its mask, "a robot <img>" (alpha 0.7, guidance 5: the paper's)
  Subject-Diffusion   the reference and its mask, where it stands in its reference (guidance 7.5, image 1.5)
  Custom Diffusion    learned from the same one reference (ToyWorld's one-concept settings, as the Infusion
                      table: 250 steps x batch 2 x 4 accumulated, lr 2.5e-5, captions 'a <c1> robot', no
                      augmentation), then "a <c1> robot" (guidance 4)
  Custom Diffusion, 4 references   the same, learned from 4 renders on varied backgrounds: its usual input
Scores (the analytic checker): identity, the share of the concept's five parts drawn with its own values on the
subject matched to it (0 when none is found), and over the four unnamed parts; subject found; background
obeyed. Claims: each tuning-free arm against each Custom Diffusion arm, paired over the 9 concepts, 95% t
intervals. The time to a first image is benchmarks/first_image_protocols.py's (whole processes).
Resumable: bundles and images stay in OUT.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tuning_free_scores import arm_readings  # noqa: E402

CD = {"augment": "false", "templates": "a {}", "lr": "2.5e-5", "seed": "0"}
QUICK = {"steps": "2", "grad_accum": "1"}
ARMS = ("FastComposer", "Subject-Diffusion", "Custom Diffusion, 1 reference", "Custom Diffusion, 4 references")


def tuning_free_draw(arm: str, model, ref: str, args):
    from multiconcept.api import ComposeSettings, SubjectComposeSettings
    from multiconcept.workflows import compose, compose_subject_diffusion

    if arm == "FastComposer":
        settings = ComposeSettings(steps=args.sample_steps)
        return lambda prompt, n, seed: compose.compose_images(prompt, [ref], model, n=n, seed=seed, settings=settings,
                                                              base=args.base)
    settings = SubjectComposeSettings(steps=args.sample_steps)
    return lambda prompt, n, seed: compose_subject_diffusion.compose_images(prompt, [ref], model, n=n, seed=seed,
                                                                            settings=settings, base=args.base)


def fine_tuned_draw(concept: str, kind: str, images: list[str], folder: Path, args):
    from multiconcept.api import Concept, SampleSettings, Source, generate, learn, parse_settings

    bundle = folder / "bundle.safetensors"
    if not bundle.exists():
        learn("custom-diffusion", [Concept("<c1>", kind)], [Source(p) for p in images], bundle, base=args.base,
              settings=parse_settings("custom-diffusion", {**CD, **(QUICK if args.quick else {})}))
    sampling = SampleSettings(steps=args.sample_steps, guidance=4.0)
    return lambda prompt, n, seed: generate(prompt.replace(f"a {kind} <img>", f"a <c1> {kind}"), [bundle], n=n,
                                            seed=seed, sampling=sampling, base=args.base)


def score(readings: list, asked: list[str], own) -> dict:
    from multiconcept import toyworld as cw

    matched = [cw.match(r.subjects, [own])[0] for r in readings]
    return {"identity": float(np.mean([cw.identity(m, own) for m in matched])),
            "identity_unnamed": float(np.mean([cw.identity(m, own, cw.UNNAMED_PARTS) for m in matched])),
            "found": float(np.mean([m is not None for m in matched])),
            "background_obeyed": float(np.mean([r.background == bg for r, bg in zip(readings, asked)]))}


def run(args) -> dict:
    from multiconcept import toyworld as cw
    from multiconcept.methods.fastcomposer import FastComposer
    from multiconcept.methods.subject_diffusion import SubjectDiffusion

    models = {"FastComposer": FastComposer.load(args.fastcomposer, base=args.base),
              "Subject-Diffusion": SubjectDiffusion.load(args.subject_diffusion, base=args.base)}
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for c in cw.EVIDENCE_CONCEPTS[: 2 if args.quick else None]:
        own = cw.concept(c).creature
        ref = cw.write_reference(c, args.out / "refs")
        four = [str(p) for p, _ in cw.write_concept_folder(c, args.out / "refs" / f"{c}-4")]
        draws = {arm: tuning_free_draw(arm, models[arm], ref, args) for arm in models}
        draws[ARMS[2]] = fine_tuned_draw(c, own.kind, [ref.rsplit(":", 1)[0]], args.out / "cd1" / c, args)
        draws[ARMS[3]] = fine_tuned_draw(c, own.kind, four, args.out / "cd4" / c, args)
        row = results.setdefault(c, {})
        for arm in ARMS:
            if arm not in row:
                readings, asked = arm_readings(args.out / "images" / arm.replace(" ", "_").replace(",", ""), c,
                                               f"a {own.kind} <img>", args.images, draws[arm])
                row[arm] = score(readings, asked, own)
                path.write_text(json.dumps(results, indent=1))
    return results


def report(results: dict) -> None:
    from multiconcept.metrics.stats import mean_sem, paired_difference

    rows = list(results.values())
    keys = ("identity", "identity_unnamed", "found", "background_obeyed")
    print("| arm | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for arm in ARMS:
        print(f"| {arm} | " + " | ".join(mean_sem([r[arm][k] for r in rows]).text() for k in keys) + " |")
    for a in ARMS[:2]:
        for b in ARMS[2:]:
            for key in ("identity", "identity_unnamed"):
                d = paired_difference([r[a][key] for r in rows], [r[b][key] for r in rows])
                print(f"- {key}: {d.text(a, b)}; half-width {(d.high - d.low) / 2:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base", default="toyworld")
    ap.add_argument("--fastcomposer", type=Path, help="model folder (default: ToyWorld's shipped)")
    ap.add_argument("--subject-diffusion", type=Path, help="model folder (default: ToyWorld's shipped)")
    ap.add_argument("--images", type=int, default=16, help="images per arm and concept (4 backgrounds)")
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="tiny base, 2 training steps, 2 concepts, 4 images")
    args = ap.parse_args()
    from multiconcept.workflows.compose import shipped_model

    if args.quick:
        args.base, args.images, args.sample_steps = "tiny", 4, 2
    args.fastcomposer = args.fastcomposer or shipped_model("fastcomposer")
    args.subject_diffusion = args.subject_diffusion or shipped_model("subject-diffusion")
    args.out.mkdir(parents=True, exist_ok=True)
    report(run(args))


if __name__ == "__main__":
    main()
