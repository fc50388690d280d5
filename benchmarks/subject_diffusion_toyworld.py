"""Subject-Diffusion on ToyWorld: identity (parts own and swapped), kind, place and background, beside
FastComposer, with the paper's ablations.

    .venv/bin/python benchmarks/subject_diffusion_toyworld.py                       # trains what is missing, then scores
    .venv/bin/python benchmarks/subject_diffusion_toyworld.py --base tiny --quick   # proves it runs

1. Models (reused when their folder is complete, resumed when a checkpoint is there): the full model
   (`make subject-diffusion`'s settings, --minutes, default 60) and one per ablation of the paper's
   table (no location map, no boxes, no adapter, no attention control, no CLS embedding; each a flag
   that removes exactly its part; --ablation-minutes, default 20), each `multiconcept train-encoder
   --method subject-diffusion` in its own process, 1 thread, one after the other. FastComposer is the one
   `make fastcomposer` builds (--fastcomposer; skipped when absent). Training scenes come fresh from the
   renderer (free placement in half of them, same-kind pairs): the personal concepts below are unseen.
2. Prompts over ToyWorld's evidence concepts (one reference render each, centred, as the base draws a
   lone subject): one subject, "a <kind> <img> on a <bg> background", at its reference place and at
   places the base never draws unasked (small top-left, small bottom-right, top half); two subjects of
   ONE kind that differ in every part, "a robot <img> and a robot <img> on a <bg> background", with A
   right and B left (the base's pairs stand A left, B right), A top and B bottom, and both small in
   opposite corners. The checker's readings are matched to the subjects; per subject: kind right, parts
   own (identity) and parts of the other subject (a swap), place right (its reading's centre inside the
   asked box), and the evaluator's cosine of its pixels (else the asked box) with its own reference
   minus the other's; background right per image. FastComposer gets the same prompts and subjects, no
   places (it has none): its place-right is the base's habit.
3. Time to the first image of a new subject (a compose process, start to PNG) and peak memory (the
   process's ru_maxrss) of compose and of each training.

Prints markdown tables (docs/evidence.md, Subject-Diffusion), writes OUT/results.json and OUT/sheet.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from fastcomposer_toyworld import checked, crop_of, reference, same_kind_pairs  # noqa: E402  (the FastComposer benchmark's)

# "full (20 min)" is the full model on an ablation's budget: what each ablation is compared with
ABLATIONS = {"full": [], "full (20 min)": [], "no location map": ["location_map=false"], "no boxes": ["boxes=false"],
             "no adapter": ["adapter=false"], "no attention control": ["attention_control=false"],
             "no CLS embedding": ["cls_embedding=false"]}
SINGLE_PLACES = {"reference": None, "small top-left": (0.05, 0.05, 0.4, 0.4),
                 "small bottom-right": (0.6, 0.6, 0.95, 0.95), "top half": (0.2, 0.0, 0.8, 0.5)}
PAIR_PLACES = {"A right, B left": ((0.52, 0.2, 0.98, 0.8), (0.02, 0.2, 0.48, 0.8)),
               "A top, B bottom": ((0.25, 0.0, 0.75, 0.48), (0.25, 0.52, 0.75, 1.0)),
               "both small, corners": ((0.05, 0.05, 0.4, 0.4), (0.6, 0.6, 0.95, 0.95))}
PAIRS = same_kind_pairs()[:4]
BACKGROUNDS = ("white", "black", "beige", "gray")


def measured(cmd: list[str], threads: int) -> dict:
    """Run a command; its wall seconds and peak memory (this child's own ru_maxrss)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}")
    return {"seconds": round(time.time() - t0, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def train(name: str, folder: Path, a) -> dict:
    minutes = a.minutes if name == "full" else a.ablation_minutes
    cmd = [str(Path(sys.executable).parent / "multiconcept"), "train-encoder", "--method", "subject-diffusion", "--data",
           "toyworld", "--base", a.base, "--out", str(folder), "--lr", "1e-4", "--batch-size", str(a.batch_size),
           "--steps", str(a.max_steps), "--max-minutes", str(minutes), "--param", "warmup_steps=100",
           "--param", "checkpoint_every=100", "--resume", "--no-progress"]
    for p in ABLATIONS[name]:
        cmd += ["--param", p]
    print(f"training {name} ({minutes} min) -> {folder}", flush=True)
    return measured(cmd, 1)


def score_images(paths, subjects, places, bg, scorer, ref_emb) -> list[dict]:
    """Per generated subject (the checker's readings matched to the subjects): kind, parts own and swapped,
    place, identity and, with two subjects, multi-subject fidelity (every reading's crop matched to the
    references; missing or confused subjects score 0); per image: background."""
    from multiconcept.metrics.fidelity import match_subjects
    from multiconcept.toyworld import concept, match, part_outcomes

    creatures = [concept(r["concept"]).creature for r in subjects]
    rows = []
    for p in paths:
        img, analysis = checked(p)
        fidelity = [None] * len(subjects)
        if len(subjects) > 1:
            crops = [crop_of(img, r) for r in analysis.subjects if r.mask.any()]
            sim = (scorer.image_embeddings(crops) @ ref_emb.T).numpy() if crops else np.zeros((0, len(subjects)))
            fidelity = match_subjects(sim)
        for i, (reading, box) in enumerate(zip(match(analysis.subjects, creatures), places)):
            w, h = img.size
            ask = None if box is None else (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
            if reading is not None and reading.mask.any():
                crop = crop_of(img, reading)
            else:
                crop = img.crop(tuple(int(v) for v in ask)) if ask else img
            other = creatures[1 - i] if len(creatures) > 1 else None
            parts = part_outcomes(reading, creatures[i], other)
            e = scorer.image_embeddings([crop])[0]
            rows.append({"kind": reading is not None and reading.kind == creatures[i].kind, "parts": parts["own"],
                         "swapped": parts["other"] if other else None,
                         "place": bool(reading and ask and ask[0] <= reading.cx <= ask[2] and ask[1] <= reading.cy <= ask[3]),
                         "own": float(e @ ref_emb[i]), "other": float(e @ ref_emb[1 - i]) if len(ref_emb) > 1 else None,
                         "background": analysis.background == bg,
                         **({"fidelity": fidelity[i].fidelity, "missing": fidelity[i].status == "missing",
                             "confused": fidelity[i].status == "confused"} if fidelity[i] else {})})
    return rows


def summary(rows: list[dict]) -> dict:
    """Means, standard errors, and each unit's values for the paired differences between models."""
    from multiconcept.metrics.stats import mean_sem

    own = np.array([r["own"] for r in rows])
    keys = ("kind", "parts", "place") + (("swapped",) if rows and rows[0]["swapped"] is not None else ())
    out = {k: float(np.mean([r[k] for r in rows])) for k in (*keys, "background")}
    out.update({f"{k}_sem": mean_sem([float(r[k]) for r in rows]).sem for k in keys})
    out["own"] = float(own.mean())
    if rows and rows[0]["other"] is not None:
        margin = own - np.array([r["other"] for r in rows])
        out.update(margin=float(margin.mean()), margin_sem=float(margin.std(ddof=1) / np.sqrt(len(margin))),
                   own_wins=float((margin > 0).mean()))
    if rows and "fidelity" in rows[0]:
        f = np.array([r["fidelity"] for r in rows])
        out.update(fidelity=float(f.mean()), fidelity_sem=float(f.std(ddof=1) / np.sqrt(len(f))),
                   missing=float(np.mean([r["missing"] for r in rows])),
                   confused=float(np.mean([r["confused"] for r in rows])))
    out["n"] = len(rows)
    out["units"] = {r["unit"]: {"place": float(r["place"]), "margin": None if r["other"] is None else r["own"] - r["other"],
                                "fidelity": r.get("fidelity"), "parts": r["parts"], "swapped": r["swapped"]}
                    for r in rows if "unit" in r}
    return out


# (model, model it is compared with): Subject-Diffusion vs FastComposer, each ablation vs the full model on its budget
CLAIMS = [("full", "FastComposer")] + [(n, "full") for n in ("no location map", "no adapter", "no attention control")] \
    + [(n, "full (20 min)") for n in ("no boxes", "no CLS embedding")]


def claims(results: dict) -> list[str]:
    """Paired differences over the units two models share, pooled over the one- or two-subject conditions."""
    from multiconcept.metrics.stats import paired_difference

    scores, lines = results["scores"], []
    for a, b in CLAIMS:
        if a not in scores or b not in scores:
            continue
        for kind, key in (("single", "place"), ("single", "parts"), ("pair", "place"), ("pair", "margin"),
                          ("pair", "fidelity"), ("pair", "parts"), ("pair", "swapped")):
            ua = {f"{c}/{u}": v[key] for c, s in scores[a].items() if c.startswith(kind) for u, v in s.get("units", {}).items()}
            ub = {f"{c}/{u}": v[key] for c, s in scores[b].items() if c.startswith(kind) for u, v in s.get("units", {}).items()}
            shared = sorted(u for u in set(ua) & set(ub) if ua[u] is not None and ub[u] is not None)
            if len(shared) >= 2:
                d = paired_difference([ua[u] for u in shared], [ub[u] for u in shared])
                lines.append(f"- {kind} {key}: " + d.text(a, b))
    return lines


def evaluate(name: str, folder: Path, refs: dict, a, evaluator, out: Path) -> dict:
    """Every single and pair condition for one model; FastComposer without places."""
    from PIL import Image

    from multiconcept.metrics.clip import load_clip
    from multiconcept.workflows.compose import compose_any

    scorer = load_clip(evaluator)
    is_fc = name == "FastComposer"

    def ref_embeddings(cs):
        crops = [Image.open(refs[c]["image"]).convert("RGB").crop(Image.open(refs[c]["mask"]).getbbox()) for c in cs]
        return scorer.image_embeddings(crops)

    def run(prompt, cs, places, bg, where):
        specs = [f"{refs[c]['image']}:{refs[c]['mask']}" for c in cs]
        locs = [] if is_fc else [",".join(f"{v:g}" for v in p) if p else "ref" for p in places]
        paths = compose_any(prompt, specs, folder, locations=locs, steps=a.steps, n=a.seeds, seed=0, out_dir=where)
        own_places = [p if p else (0.0, 0.0, 1.0, 1.0) for p in places]
        rows = score_images(paths, [refs[c] for c in cs], own_places, bg, scorer, ref_embeddings(cs))
        # the unit every model shares: subjects, seed (the image's file), which subject
        for r, (p, i) in zip(rows, ((p, i) for p in paths for i in range(len(cs)))):
            r["unit"] = f"{'+'.join(cs)}/{Path(p).stem}/{i}"
        return rows

    result = {}
    singles = list(refs)[: a.singles]
    for place_name, box in SINGLE_PLACES.items():
        rows = []
        for k, c in enumerate(singles):
            bg = BACKGROUNDS[k % len(BACKGROUNDS)]
            rows += run(f"a {refs[c]['noun']} <img> on a {bg} background", [c], [box], bg,
                        out / name / "single" / place_name / c)
        result[f"single: {place_name}"] = summary(rows)
    for place_name, (pa, pb) in PAIR_PLACES.items():
        rows = []
        for k, (ca, cb) in enumerate(PAIRS[: a.pairs]):
            bg = BACKGROUNDS[k % len(BACKGROUNDS)]
            prompt = f"a {refs[ca]['noun']} <img> and a {refs[cb]['noun']} <img> on a {bg} background"
            rows += run(prompt, [ca, cb], [pa, pb], bg, out / name / "pair" / place_name / f"{ca}+{cb}")
        result[f"pair: {place_name}"] = summary(rows)
    return result


def contact_sheet(refs: dict, images: Path, models: list[str], path: Path, a, scale: int = 2) -> Path:
    """Per model and pair condition, the first pair: its two references, then its first four images."""
    from PIL import Image

    size, pad = 64, 4
    ca, cb = PAIRS[0]
    rows = []
    for m in models:
        for place in PAIR_PLACES:
            gen = sorted((images / m / "pair" / place / f"{ca}+{cb}").glob("*.png"))[:4]
            rows.append([Image.open(refs[c]["image"]).convert("RGB") for c in (ca, cb)]
                        + [Image.open(g).convert("RGB") for g in gen])
    width = max(len(cells) for cells in rows)
    sheet = Image.new("RGB", (width * (size + pad) + 3 * pad, len(rows) * (size + pad) + pad), (255, 255, 255))
    for i, cells in enumerate(rows):
        x = pad
        for j, cell in enumerate(cells):
            x += 2 * pad if j == 2 else 0
            sheet.paste(cell.resize((size, size)), (x, pad + i * (size + pad)))
            x += size + pad
    sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST).save(path, optimize=True)
    return path


def table(results: dict) -> str:
    lines = ["| model | condition | own − other (± sem) | own wins | fidelity (± sem), missing / confused | kind | parts own "
             "| parts swapped | place | background | n |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, conds in results["scores"].items():
        for cond, s in conds.items():
            margin = f"{s['margin']:+.3f} ± {s['margin_sem']:.3f}" if "margin" in s else f"own {s['own']:.3f}"
            wins = f"{s['own_wins']:.0%}" if "own_wins" in s else "—"
            fid = (f"{s['fidelity']:.3f} ± {s['fidelity_sem']:.3f}, {s['missing']:.0%} / {s['confused']:.0%}"
                   if "fidelity" in s else "—")
            pct = {k: "—" if k not in s else f"{s[k]:.0%}" + (f" ± {s[k + '_sem']:.0%}" if s.get(k + "_sem") is not None
                                                              else "")
                   for k in ("kind", "parts", "swapped", "place")}
            lines.append(f"| {model} | {cond} | {margin} | {wins} | {fid} | {pct['kind']} | {pct['parts']} | "
                         f"{pct['swapped']} | {pct['place']} | {s['background']:.0%} | {s['n']} |")
    lines += ["", "Paired differences (same subjects, seeds and places; 95% t interval):"] + claims(results)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="toyworld", help="toyworld (the real run) or tiny (proves the script runs)")
    ap.add_argument("--models", type=Path, default=ROOT.parent / "models" / "subject-diffusion")
    ap.add_argument("--fastcomposer", type=Path, default=ROOT.parent / "models" / "fastcomposer-toyworld")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "subject_diffusion_toyworld")
    ap.add_argument("--minutes", type=float, default=60.0, help="the full model's training budget")
    ap.add_argument("--ablation-minutes", type=float, default=20.0, help="each ablation's training budget")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--only", default="", help="comma-separated model names to train and score, FastComposer among "
                    "them (default: all); scores of earlier runs in OUT/results.json are kept")
    ap.add_argument("--seeds", type=int, default=4, help="images per prompt and condition")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps (paper: 50)")
    ap.add_argument("--singles", type=int, default=9, help="evidence concepts in the one-subject prompts")
    ap.add_argument("--pairs", type=int, default=len(PAIRS))
    ap.add_argument("--threads", type=int, default=2, help="threads for scoring")
    ap.add_argument("--quick", action="store_true", help="tiny budgets everywhere: a smoke run")
    a = ap.parse_args()
    if a.quick:
        a.minutes, a.ablation_minutes, a.max_steps, a.seeds, a.steps = 0.2, 0.2, 2, 1, 3
        a.singles, a.pairs, a.batch_size = 1, 1, 2
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    a.out.mkdir(parents=True, exist_ok=True)
    only = [n.strip() for n in a.only.split(",") if n.strip()]
    names = [n for n in ABLATIONS if not only or n in only]
    results = {"base": a.base, "training": {}, "scores": {}}
    if (a.out / "results.json").is_file():
        results = json.loads((a.out / "results.json").read_text())
    results["settings"] = {k: str(v) for k, v in vars(a).items()}
    folders = {n: a.models / re.sub(r"[^a-z0-9]+", "-", n.lower()).strip("-") for n in names}
    for n, folder in folders.items():
        info = folder / "subject_diffusion.json"
        if not info.is_file() or (folder / "checkpoint.safetensors").is_file():
            results["training"][n] = train(n, folder, a)
        cfg = json.loads(info.read_text())
        results["training"].setdefault(n, {}).update(steps=cfg["steps_done"], train_seconds=cfg["train_seconds"])

    work = Path(tempfile.mkdtemp(prefix="sd-bench-"))
    from multiconcept.toyworld import EVIDENCE_CONCEPTS

    refs = {}
    for c in EVIDENCE_CONCEPTS:
        img, mask, noun = reference(c, work / "refs")
        refs[c] = {"image": str(img), "mask": str(mask), "noun": noun, "concept": c}
    evaluator = None
    if a.base != "toyworld":
        from multiconcept.models.tiny_evaluators import save_tiny_clip

        evaluator = str(save_tiny_clip(work / "tiny_clip", image_size=32,
                                       processor={"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    scored = dict(folders)
    if only and "FastComposer" not in only:
        pass
    elif a.base == "toyworld" and (a.fastcomposer / "fastcomposer.json").is_file():
        scored["FastComposer"] = a.fastcomposer
    elif a.base == "toyworld":
        print(f"no FastComposer model at {a.fastcomposer}: run `make fastcomposer` to compare", flush=True)
    for n, folder in scored.items():
        print(f"scoring {n} ...", flush=True)
        results["scores"][n] = evaluate(n, folder, refs, a, evaluator, a.out / "images")

    c = PAIRS[0][0]
    if "full" in folders:  # the time to a first image is the full model's
        first = [str(Path(sys.executable).parent / "multiconcept"), "compose",
                 f"a {refs[c]['noun']} <img> on a gray background", "-s", f"{refs[c]['image']}:{refs[c]['mask']}",
                 "--model", str(folders["full"]), "--location", "0.05,0.05,0.4,0.4", "--steps", str(a.steps),
                 "--out", str(work / "first")]
        results["first_image"] = measured(first, a.threads)
    if (a.out / "results.json").is_file():  # another run of the script may have scored other models meanwhile:
        done = json.loads((a.out / "results.json").read_text())  # keep theirs, overlay only what this run made
        for key in ("scores", "training"):
            results[key] = {**done.get(key, {}), **{n: v for n, v in results[key].items() if n in scored or n in folders}}
        if "full" not in folders:
            results["first_image"] = done.get("first_image")
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {contact_sheet(refs, a.out / 'images', list(results['scores']), a.out / 'sheet.png', a)}")
    print(table(results))
    print(f"first image of a new subject: {results.get('first_image')}")
    print(f"\nwrote {a.out / 'results.json'}")


if __name__ == "__main__":
    main()
