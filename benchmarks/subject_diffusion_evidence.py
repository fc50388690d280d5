"""Subject-Diffusion on the creatures world: two subjects of one kind at asked boxes, and the paper's ablations.

    .venv/bin/python benchmarks/subject_diffusion_evidence.py --out runs/sd train [--models full,no-attention-control]
    .venv/bin/python benchmarks/subject_diffusion_evidence.py --out runs/sd score [--models ...]
    .venv/bin/python benchmarks/subject_diffusion_evidence.py --out /tmp/sd --quick train score   # code paths, tiny base

train  One model per ablation of the paper's table (full; no location map; no boxes; no adapter; no attention
       control; no CLS embedding: each a flag that removes exactly its part), all for the same --steps (6,000,
       declared in docs/evidence.md), seed 0, batch 8, lr 1e-4, 100 warm-up steps, on `--data toyworld` (fresh
       tuning-free scenes; the evidence concepts never appear). Resumed from checkpoints.
score  For each evidence kind's three concepts, every ordered pair "a robot <img> and a robot <img> on a <bg>
       background" (no position words) with the first-named subject asked in the RIGHT box and the second in the
       LEFT (the base draws a first-named subject on the left, so a subject in its box was put there by the
       location input), and each subject alone in each box; --images per arm over four backgrounds, the same
       seeds for every model. Per part, with the analytic checker: swap over the same-layout control, blend
       over the alone control, own, carried parts, placement (a found subject's centre inside its asked box),
       background obeyed (benchmarks/tuning_free_scores.py). Units: the 9 same-kind pairs.

Every model and image stays in OUT; a killed run resumes. Results: OUT/results.json and a summary on stdout with the
paired claims (each ablation against the full model).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tuning_free_scores import BACKGROUNDS, claims, kinds, mean_of, ordered_pairs, print_claims, score_units  # noqa: E402

COMMON = {"batch_size": 8, "lr": 1e-4, "warmup_steps": 100, "seed": 0, "checkpoint_every": 250}
QUICK = {"batch_size": 2, "warmup_steps": 1, "checkpoint_every": 1}
ABLATIONS = {"full": {}, "no-location-map": {"location_map": False}, "no-boxes": {"boxes": False},
             "no-adapter": {"adapter": False}, "no-attention-control": {"attention_control": False},
             "no-cls-embedding": {"cls_embedding": False}}
# slot 0 (named first) on the right, slot 1 on the left: against the base's habit
BOXES = ((0.52, 0.2, 0.98, 0.8), (0.02, 0.2, 0.48, 0.8))


def train(args, name: str) -> Path | None:
    from multiconcept.methods.subject_diffusion import SubjectDiffusionConfig
    from multiconcept.workflows.train_subject_diffusion import train_subject_diffusion

    folder = args.out / "models" / name
    if (folder / "subject_diffusion.json").is_file() and not (folder / "checkpoint.safetensors").is_file():
        return folder
    cfg = SubjectDiffusionConfig(**{**COMMON, **ABLATIONS[name], "steps": args.steps, **(QUICK if args.quick else {})})
    print(f"training {name}: {args.steps} steps -> {folder}", flush=True)
    return train_subject_diffusion("toyworld", folder, base=args.base, cfg=cfg, resume=True, progress=False)


def compose_arm(model, folder: Path, concepts: tuple[str, ...], slots: tuple[int, ...], args):
    """The arm's images (read from `folder` when an earlier run wrote them) and each one's asked background."""
    from PIL import Image

    from multiconcept import toyworld as cw
    from multiconcept.api import SubjectComposeSettings
    from multiconcept.workflows.compose_subject_diffusion import compose_images

    kind = cw.concept(concepts[0]).creature.kind
    refs = [cw.write_reference(c, args.out / "refs") for c in concepts]
    locations = [",".join(f"{v:g}" for v in BOXES[s]) for s in slots]
    subjects = " and ".join(f"a {kind} <img>" for _ in concepts)
    per_bg = max(1, args.images // len(BACKGROUNDS))
    name = "+".join(concepts) + "".join(f"@{'RL'[s]}" for s in slots)
    images, asked = [], []
    for b, bg in enumerate(BACKGROUNDS):
        paths = [folder / f"{name}_{bg}_{i:02d}.png" for i in range(per_bg)]
        if not all(p.exists() for p in paths):
            folder.mkdir(parents=True, exist_ok=True)
            drawn = compose_images(f"{subjects} on {cw.article(bg)} {bg} background", refs, model, n=per_bg,
                                   seed=3000 + 100 * b, settings=SubjectComposeSettings(steps=args.sample_steps),
                                   locations=locations, base=args.base)
            for img, path in zip(drawn, paths):
                img.save(path)
        images += [Image.open(p).convert("RGB") for p in paths]
        asked += [bg] * per_bg
    return [cw.analyse(np.asarray(img.resize((64, 64)))) for img in images], asked


def in_box(reading, box) -> bool:
    from multiconcept.toyworld import IMAGE_SIZE

    x0, y0, x1, y1 = (v * IMAGE_SIZE for v in box)
    return x0 <= reading.cx <= x1 and y0 <= reading.cy <= y1


def placed(matched) -> float | None:
    """Share of the found subjects whose centre is inside the box asked for them (None: none found)."""
    return mean_of([None if r is None else float(in_box(r, BOXES[slot])) for slot, r in enumerate(matched)])


def score_model(args, name: str) -> dict:
    from multiconcept.methods.subject_diffusion import SubjectDiffusion

    model = SubjectDiffusion.load(args.out / "models" / name, base=args.base)
    folder = args.out / "images" / name
    groups = kinds().values()
    pairs = {arm: compose_arm(model, folder, arm, (0, 1), args) for g in groups for arm in ordered_pairs(g)}
    single = {(c, s): compose_arm(model, folder, (c,), (s,), args)[0] for g in groups for c in g for s in (0, 1)}
    return {"model": name, "steps": args.steps, "units": score_units(pairs, lambda c, slot: single[(c, slot)], placed)}


def compare(results: dict) -> None:
    """Each ablation against the full model, paired over the pairs: swap (over its control), own, placement."""
    from multiconcept.metrics.stats import paired_difference

    if "full" not in results:
        return
    full = results["full"]["units"]
    for name, r in results.items():
        if name == "full":
            continue
        units = sorted(set(full) & set(r["units"]))
        for label, get in (("swap excess", lambda u: _excess(u, "other", "same_layout")),
                           ("own", lambda u: u["pair"]["all"]["own"]), ("placed", lambda u: u.get("placed"))):
            a, b = [get(r["units"][u]) for u in units], [get(full[u]) for u in units]
            if sum(x is not None and y is not None for x, y in zip(a, b)) >= 2:
                print(f"- {label}: " + paired_difference(a, b).text(name, "full"))


def _excess(unit: dict, key: str, control: str) -> float | None:
    a, b = unit["pair"]["all"][key], unit[control]["all"][key]
    return None if a is None or b is None else a - b


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stages", nargs="+", choices=("train", "score"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base", default="toyworld")
    ap.add_argument("--models", default=",".join(ABLATIONS), help="ablations, comma-separated")
    ap.add_argument("--steps", type=int, default=6000, help="training steps of every model (declared: 6,000)")
    ap.add_argument("--images", type=int, default=16, help="images per arm (4 backgrounds)")
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="the tiny base, 2 training steps, 4 images: code paths only")
    args = ap.parse_args()
    if args.quick:
        args.base, args.images, args.sample_steps, args.steps = "tiny", 4, 2, 2
    names = [m for m in args.models.split(",") if m]
    bad = [m for m in names if m not in ABLATIONS]
    if bad:
        ap.error(f"unknown model {bad[0]!r}: choose from {', '.join(ABLATIONS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if "train" in args.stages:
        for name in names:
            train(args, name)
    if "score" in args.stages:
        path = args.out / "results.json"
        results = json.loads(path.read_text()) if path.is_file() else {}
        for name in names:
            if name not in results:
                results[name] = score_model(args, name)
                path.write_text(json.dumps(results, indent=1))
            results[name]["claims"] = claims(results[name]["units"])
            print_claims(name, results[name]["claims"])
        path.write_text(json.dumps(results, indent=1))
        compare(results)


if __name__ == "__main__":
    main()
