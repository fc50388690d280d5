"""DisenDiff on the creatures world: two concepts of two kinds learned from ONE image, per part.

    .venv/bin/python benchmarks/disendiff_evidence.py --out runs/dd [--units 8] [--variants main|ablations|levels|all]
    .venv/bin/python benchmarks/disendiff_evidence.py --out /tmp/dd --quick          # every code path, tiny base

Each unit is a two-concept source (`toyworld.two_concept_scene`) of two evidence concepts of different kinds
(`toyworld.two_kind_pairs`: concepts used evenly, pairs differing in every part preferred). Every variant learns
<c1> and <c2> from the one image (ToyWorld's settings: captions 'a {}', no augmentation, batch 2, 250 steps at
lr 1e-4; Textual Inversion 500 at 1e-3; one training seed); the control learns each concept alone with Custom
Diffusion, from the same image with the other concept left out.
Prompts, 4 images on each of 4 backgrounds (the source's and three new contexts):
  alone  "a <c1> robot on a <bg> background" (and <c2>): identity (share of the concept's five parts drawn with its
         own values; also over the four unnamed parts), leakage (the largest share of the other concept's
         distinguishing traits on any subject found), background obeyed;
  both   "a <c1> robot and a <c2> bird on a <bg> background": both kinds found, identity of each.
Claims (paired over units, 95% t intervals): leakage over the control (each variant's excess); DisenDiff against
Custom Diffusion, Textual Inversion and Custom Diffusion with Break-A-Scene's masked loss on identity and leakage;
each ablation and calibration level against DisenDiff. Resumable: bundles and images stay in OUT.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

COMMON = {"augment": "false", "templates": "a {}", "batch_size": "2", "grad_accum": "1", "loss_region": "all"}
LEARN = {"textual-inversion": {"templates": "a {}", "batch_size": "2", "grad_accum": "1", "lr": "1e-3", "steps": "500"},
         "custom-diffusion": {**COMMON, "lr": "1e-4", "steps": "250"},
         "disendiff": {**COMMON, "lr": "1e-4", "steps": "250"}}
# label -> (method, extra settings)
MAIN = {"textual-inversion": ("textual-inversion", {}), "custom-diffusion": ("custom-diffusion", {}),
        "custom-diffusion masked": ("custom-diffusion", {"loss_region": "masks"}), "disendiff": ("disendiff", {})}
ABLATIONS = {f"disendiff {k}": ("disendiff", {k: "true"}) for k in
             ("no_bind", "no_separation", "no_gaussian", "no_suppression", "twice_suppression", "train_qkv")}
LEVELS = {"disendiff all resolutions": ("disendiff", {"all_resolutions": "true"}),
          "disendiff level 16": ("disendiff", {"attention_resolution": "16"})}  # the default is the 8x8 level
BACKGROUNDS = ("gray", "white", "black", "beige")
QUICK = {"steps": "2"}


def learn_cell(path: Path, method: str, extra: dict, tokens, srcs, args) -> Path:
    from multiconcept.api import Concept, learn, parse_settings

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        settings = {**LEARN[method], **extra, **(QUICK if args.quick else {}), "seed": "0"}
        learn(method, [Concept(t, k) for t, k in tokens], srcs, path, base=args.base,
              settings=parse_settings(method, settings))
    return path


def drawn(bundle: Path, prompts: dict[str, str], folder: Path, args) -> dict[str, list]:
    """Each prompt's readings (4 images on each background), the images kept in `folder`."""
    from PIL import Image

    from multiconcept import toyworld as cw
    from multiconcept.workflows.generate import SampleSettings, generate, load_with_bundles

    loaded, out = None, {}
    per_bg = max(1, args.images // len(BACKGROUNDS))
    for key, template in prompts.items():
        out[key] = []
        for b, bg in enumerate(BACKGROUNDS):
            prefix = f"{key}_{bg}_"
            paths = sorted(folder.glob(f"{prefix}*.png"))
            if len(paths) < per_bg:
                loaded = loaded or load_with_bundles(args.base, [str(bundle)])
                paths = generate(template.format(bg=bg), loaded, per_bg, 1000 + 100 * b, folder,
                                 SampleSettings(steps=args.sample_steps, guidance=4.0), name_prefix=prefix)
            out[key] += [(bg, cw.analyse(np.asarray(Image.open(p).convert("RGB").resize((64, 64))))) for p in paths]
    return out


def mask_image(mask: np.ndarray):
    from PIL import Image

    return Image.fromarray(mask.astype(np.uint8) * 255)


def alone_scores(got: list, own, other) -> dict:
    """Identity (all parts, unnamed parts) and leakage of one concept's readings from its own prompt."""
    from multiconcept import toyworld as cw

    matched = [cw.match(a.subjects, [own])[0] for _, a in got]
    return {"identity": float(np.mean([cw.identity(r, own) for r in matched])),
            "identity_unnamed": float(np.mean([cw.identity(r, own, cw.UNNAMED_PARTS) for r in matched])),
            "leak": _mean([cw.leakage(a.subjects, [own], other) for _, a in got])}


def score(readings: dict, ca, cb, source_bg: str) -> dict:
    from multiconcept import toyworld as cw

    row = {}
    for key, own, other in (("c1", ca, cb), ("c2", cb, ca)):
        got = readings[key]
        row[key] = {**alone_scores(got, own, other),
                    "new_context_obeyed": float(np.mean([a.background == bg for bg, a in got if bg != source_bg]))}
    both = readings["both"]
    matched = [cw.match(a.subjects, [ca, cb]) for _, a in both]
    row["both"] = {"found": float(np.mean([sum(r is not None and r.kind == c.kind for r, c in zip(m, (ca, cb))) / 2
                                           for m in matched])),
                   "identity": float(np.mean([(cw.identity(m[0], ca) + cw.identity(m[1], cb)) / 2 for m in matched]))}
    return {"identity": (row["c1"]["identity"] + row["c2"]["identity"]) / 2,
            "identity_unnamed": (row["c1"]["identity_unnamed"] + row["c2"]["identity_unnamed"]) / 2,
            "leak": _mean([row["c1"]["leak"], row["c2"]["leak"]]),
            "new_context_obeyed": (row["c1"]["new_context_obeyed"] + row["c2"]["new_context_obeyed"]) / 2,
            "both_found": row["both"]["found"], "both_identity": row["both"]["identity"], "per_concept": row}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def run_unit(a: str, b: str, i: int, variants: dict, args) -> dict:
    from multiconcept import toyworld as cw
    from multiconcept.api import Source

    ca, cb = cw.concept(a).creature, cw.concept(b).creature
    scene = cw.two_concept_scene(a, b, seed=i)
    tokens = [("<c1>", ca.kind), ("<c2>", cb.kind)]
    two = [Source(scene.pil(), masks={"<c1>": mask_image(scene.subjects[0].mask), "<c2>": mask_image(scene.subjects[1].mask)})]
    prompts = {"c1": f"a <c1> {ca.kind} on a {{bg}} background", "c2": f"a <c2> {cb.kind} on a {{bg}} background",
               "both": f"a <c1> {ca.kind} and a <c2> {cb.kind} on a {{bg}} background"}
    folder = args.out / "cells" / f"{i:02d}_{a}+{b}"
    unit = {}
    for label, (method, extra) in variants.items():
        name = label.replace(" ", "_")
        bundle = learn_cell(folder / f"{name}.safetensors", method, extra, tokens, two, args)
        unit[label] = score(drawn(bundle, prompts, folder / name, args), ca, cb, scene.background)
    unit["control"] = control_scores(a, b, i, args)
    return unit


def control_scores(a: str, b: str, i: int, args) -> dict:
    """The control: each concept learned alone by Custom Diffusion, from the same image with the other concept
    left out; its leakage (chance and the base's habits) and identity (what one image teaches without a
    second concept beside it), mean over the two concepts."""
    from multiconcept import toyworld as cw
    from multiconcept.api import Source

    ca, cb = cw.concept(a).creature, cw.concept(b).creature
    scene = cw.two_concept_scene(a, b, seed=i)
    folder = args.out / "cells" / f"{i:02d}_{a}+{b}"
    rows = []
    for token, s, own, other, key in (("<c1>", scene.subjects[0], ca, cb, "c1"), ("<c2>", scene.subjects[1], cb, ca, "c2")):
        alone = cw.render([cw.Spec(s.creature, s.cx, s.cy, s.scale, s.position, s.concept)], scene.background, "center")
        src = [Source(alone.pil(), masks={token: mask_image(alone.subjects[0].mask)})]
        bundle = learn_cell(folder / f"control_{key}.safetensors", "custom-diffusion", {}, [(token, own.kind)], src, args)
        got = drawn(bundle, {key: f"a {token} {own.kind} on a {{bg}} background"}, folder / f"control_{key}", args)[key]
        rows.append(alone_scores(got, own, other))
    return {k: _mean([r[k] for r in rows]) for k in rows[0]}


def claims(results: dict, labels: list[str]) -> list[str]:
    from multiconcept.metrics.stats import paired_difference

    units = list(results.values())
    lines = []
    for label in labels:
        leak = [u[label]["leak"] for u in units]
        d = paired_difference(leak, [u["control"]["leak"] for u in units])
        lines.append(f"- leakage excess over the control, {label}: {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] (n {d.n})")
    pairs = [("disendiff", other) for other in MAIN if other != "disendiff"]
    pairs += [(label, "disendiff") for label in labels if label not in MAIN]
    for a, b in pairs:
        if a in labels and b in labels:
            for key in ("identity", "identity_unnamed", "leak", "both_identity"):
                va, vb = [u[a][key] for u in units], [u[b][key] for u in units]
                d = paired_difference(va, vb)
                lines.append(f"- {key}: " + d.text(a, b) + f"; half-width {(d.high - d.low) / 2:.3f}")
    return lines


def table(results: dict, labels: list[str]) -> str:
    from multiconcept.metrics.stats import mean_sem

    keys = ("identity", "identity_unnamed", "leak", "new_context_obeyed", "both_found", "both_identity")
    lines = ["| variant | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for label in labels:
        cells = [mean_sem([u[label][k] for u in results.values()]).text() for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    control = [mean_sem([u["control"][k] for u in results.values()]).text() for k in ("identity", "identity_unnamed", "leak")]
    lines.append("| control (CD, each concept alone) | " + " | ".join(control) + " | – | – | – |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base", default="toyworld")
    ap.add_argument("--units", type=int, default=8)
    ap.add_argument("--variants", choices=("main", "ablations", "levels", "all"), default="main")
    ap.add_argument("--images", type=int, default=16, help="images per prompt (4 backgrounds)")
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="tiny base, 2 steps, 2 units, 4 images: code paths only")
    args = ap.parse_args()
    from multiconcept.toyworld import two_kind_pairs

    if args.quick:
        args.base, args.units, args.images, args.sample_steps = "tiny", 2, 4, 2
    variants = {**MAIN, **({} if args.variants in ("main", "levels") else ABLATIONS),
                **({} if args.variants in ("main", "ablations") else LEVELS)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for i, (a, b) in enumerate(two_kind_pairs(args.units)):
        key = f"{a}+{b}"
        if key not in results or any(label not in results[key] for label in variants):
            results[key] = {**results.get(key, {}), **run_unit(a, b, i, variants, args)}
            path.write_text(json.dumps(results, indent=1))
        if "identity" not in results[key]["control"]:  # tables scored before the control's identity was
            results[key]["control"] = control_scores(a, b, i, args)
            path.write_text(json.dumps(results, indent=1))
        print(key, json.dumps({k: round(v["leak"] or 0, 3) for k, v in results[key].items()}), flush=True)
    labels = list(variants)
    used = {k: results[k] for k in (f"{a}+{b}" for a, b in two_kind_pairs(args.units))}
    print(table(used, labels))
    print("\n".join(claims(used, labels)))


if __name__ == "__main__":
    main()
