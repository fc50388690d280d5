"""DisenDiff evidence on ToyWorld: TI vs Custom Diffusion vs DisenDiff (+ ablations).

    .venv/bin/python benchmarks/disendiff_toyworld.py --out runs/disendiff [--base toyworld]
        [--pairs 5] [--steps 250] [--ti-steps 1000] [--seeds 0,1] [--sample-steps 50] [--no-ablations]

Writes N two-concept ToyWorld source images (each a pair of personal
concepts of two kinds, from the evidence set, with its masks), runs the 30-prompt protocol (10 both, 10 concept
1, 10 concept 2) for every method variant with `multiconcept benchmark`
(fixed seeds, resumable: a killed run continues), and prints one markdown
table: image alignment (CLIP-I vs the whole source / the masked crop),
text alignment (CLIP-T, raw cosine) and leakage (the other concept's
alignment on single-concept prompts, plus ToyWorld's exact part-based
measure), ToyWorld identity (parts drawn right) and multi-subject fidelity
(each concept found by ToyWorld's checker, matched, compared) —
Combined / Concept 1 / Concept 2 / Mean, mean ± standard error over (source, seed) units; then the
paired claims (DisenDiff vs Custom Diffusion, each ablation vs DisenDiff) with 95% intervals.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (label, method, --param settings): the paper's comparison, the demo's masked DisenDiff, the ablations
VARIANTS = [
    ("textual-inversion", "textual-inversion", ()),
    ("custom-diffusion", "custom-diffusion", ()),
    ("disendiff", "disendiff", ()),
    ("disendiff + union/erase", "disendiff", (("union_sampling", "true"), ("unnamed", "erase"))),
]
# On the ToyWorld base every variant trains the same way (docs/demo.md, "The demo's settings"): whole-image
# loss (the papers'), captions in ToyWorld's words, no scale augmentation or flips (the base draws subjects
# at fixed places, and a flip swaps which side the first-named concept is on), batch 2 without
# accumulation. lr: 1e-4 x 2 for Custom Diffusion and DisenDiff (the paper's 1e-5 x 8 moved nothing in
# the demo's 250 steps); Textual Inversion 1e-3 x 2.
TOYWORLD_PARAMS = (("augment", "false"), ("templates", "a {}"), ("loss_region", "all"), ("grad_accum", "1"),
                   ("batch_size", "2"))
TOYWORLD_LR = {"textual-inversion": "1e-3", "custom-diffusion": "1e-4", "disendiff": "1e-4"}
ABLATIONS = [
    ("disendiff w/o L_bind", "disendiff", (("no_bind", "true"),)),
    ("disendiff w/o L_s&s", "disendiff", (("no_separation", "true"),)),
    ("disendiff w/o G", "disendiff", (("no_gaussian", "true"),)),
    ("disendiff w/o suppression", "disendiff", (("no_suppression", "true"),)),
    ("disendiff twice suppression", "disendiff", (("twice_suppression", "true"),)),
    ("disendiff all resolutions", "disendiff", (("all_resolutions", "true"),)),
    ("disendiff train Q/K/V", "disendiff", (("train_qkv", "true"),)),
]


def write_sources(folder: Path, n: int) -> list[Path]:
    """Pairs of evidence concepts of two kinds (the pilot set tunes the world; the demo's pair is a pilot),
    those that differ in every part first, so a leaked part is never ambiguous."""
    from multiconcept.toyworld import two_kind_pairs, write_two_concept_folder

    pairs = two_kind_pairs(n)
    out = []
    for i, (a, b) in enumerate(pairs):
        d = folder / f"{i:02d}_{a}+{b}"
        if not (d / "scene.json").exists():
            write_two_concept_folder(a, b, d, seed=i)
        out.append(d)
    return out


KEYS = ("image_alignment", "text_alignment", "leakage", "toyworld_leak", "toyworld_identity", "toyworld_present",
        "multi_subject_fidelity")
# (metric, column) pairs the claims are made on: overall alignment, leakage, identity, two concepts in one image
CLAIMS = (("image_alignment", "mean"), ("leakage", "mean"), ("toyworld_leak", "mean"), ("toyworld_identity", "mean"),
          ("multi_subject_fidelity", "combined"))


def row(label: str, entry: dict, sem: dict, columns: list[str]) -> list[str]:
    cells = [label]
    for key in KEYS:
        vals, errs = entry.get(key, {}), sem.get(key, {})
        cells += ["–" if vals.get(c) is None else f"{vals[c]:.3f}" + ("" if errs.get(c) is None else f" ± {errs[c]:.3f}")
                  for c in columns]
    return cells


def claims(runs: dict) -> list[str]:
    """DisenDiff (and its union/erase form) vs Custom Diffusion, each ablation vs DisenDiff, paired over the units both ran."""
    from multiconcept.workflows.benchmark.results import paired_units

    pairs = [("disendiff", "custom-diffusion"), ("disendiff", "textual-inversion"),
             ("disendiff + union/erase", "custom-diffusion")]
    pairs += [(a[0], "disendiff") for a in ABLATIONS]
    lines = []
    for a, b in pairs:
        if a not in runs or b not in runs:
            continue
        for key, col in CLAIMS:
            ua, ub = runs[a].get(key, {}).get(col), runs[b].get(key, {}).get(col)
            if ua and ub and len(set(ua) & set(ub)) >= 2:
                lines.append(f"- {key} ({col}): " + paired_units(ua, ub).text(a, b))
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base", default="toyworld")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: each method's paper default)")
    ap.add_argument("--ti-steps", type=int, default=1000,
                    help="Textual Inversion's steps (its default 3000 does not fit a CPU run; 0 = same as --steps)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--only", default="", help="comma-separated labels to run (e.g. to split variants over processes)")
    ap.add_argument("--ablation-pairs", type=int, default=None, help="sources the ablations run on (default: all)")
    ap.add_argument("--paper-settings", action="store_true",
                    help="train with each method's defaults even on ToyWorld (see TOYWORLD_PARAMS)")
    ap.add_argument("--clip", default=None, help="evaluator (default: ToyWorld's)")
    ap.add_argument("--no-ablations", action="store_true")
    args = ap.parse_args()

    from multiconcept.workflows.benchmark import BenchmarkSettings, benchmark, parse_seeds

    sources = write_sources(args.out / "sources", args.pairs)
    variants = VARIANTS + ([] if args.no_ablations else ABLATIONS)
    if args.ablation_pairs and not args.no_ablations:
        # the ablations' reference: DisenDiff on the same sources (its cells are reused, not retrained)
        variants.insert(len(VARIANTS), (f"disendiff, first {args.ablation_pairs} sources", "disendiff", ()))
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    toyworld = args.base == "toyworld" and not args.paper_settings
    tables = {}
    for label, method, params in variants:
        if only and label not in only:
            continue
        steps = args.steps
        if toyworld:
            params = TOYWORLD_PARAMS + (("lr", TOYWORLD_LR[method]),) + params
        if method == "textual-inversion" and args.ti_steps:
            params, steps = params + (("steps", str(args.ti_steps)),), None
        used, name = sources, label
        if args.ablation_pairs and label.startswith("disendiff, first"):
            used, name = sources[: args.ablation_pairs], "disendiff"
        if args.ablation_pairs and any(label == a[0] for a in ABLATIONS):
            used = sources[: args.ablation_pairs]
        settings = BenchmarkSettings(methods=(method,), base=args.base, steps=steps, params=params,
                                     seeds=parse_seeds(args.seeds), sample_steps=args.sample_steps,
                                     guidance=args.guidance, clip=args.clip)
        folder = args.out / name.replace(" ", "_").replace("/", "").replace("&", "")
        res = benchmark([str(s) for s in used], settings, folder, progress=True)
        tables[label] = (res["columns"], res["table"][method], res["sem"][method], res["units"][method])
    columns = next(iter(tables.values()))[0]
    head = ["method"] + [f"{m} {c}" for m in ("CLIP-I", "CLIP-T", "leak CLIP-I", "leak parts", "identity", "present",
                                              "fidelity") for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, (cols, entry, sem, _) in tables.items():
        lines.append("| " + " | ".join(row(label, entry, sem, cols)) + " |")
    lines += ["", "Paired differences (mean over shared source × seed units, 95% t interval):"]
    lines += claims({label: t[3] for label, t in tables.items()})
    text = "\n".join(lines)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "tables.json").write_text(json.dumps({k: {"table": v[1], "sem": v[2], "units": v[3]}
                                                      for k, v in tables.items()}, indent=1))


if __name__ == "__main__":
    main()
