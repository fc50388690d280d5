"""Subject-Diffusion on the creatures world: two subjects of one kind at asked boxes, and the paper's ablations.

    .venv/bin/python benchmarks/subject_diffusion_evidence.py --out runs/sd train [--models full,no-attention-control]
    .venv/bin/python benchmarks/subject_diffusion_evidence.py --out runs/sd score [--models ...]
    .venv/bin/python benchmarks/subject_diffusion_evidence.py --out runs/sd diagnose --models full,no-attention-control
    .venv/bin/python benchmarks/subject_diffusion_evidence.py --out /tmp/sd --quick train score   # code paths, tiny base

train  One model per ablation of the paper's table (full; no location map; no boxes; no adapter; no attention
       control; no CLS embedding: each a flag that removes exactly its part), all for the same --steps (6,000,
       declared in docs/evidence.md), seed 0, batch 8, lr 1e-4, 100 warm-up steps, on `--data toyworld` (fresh
       tuning-free scenes; the evidence concepts never appear). Resumed from checkpoints.
diagnose
       Declared with the table: for each model asked (the full one and the one without attention control), the
       pair prompts composed again under attention capture; per token type (each subject's placeholder and
       label word, the caption's nouns, the end token, padding), the share of its cross-attention (mean over
       layers and heads, summed over steps, conditional branch) inside its own subject's box and inside the
       other's (a token of no subject: inside either box), mean over the 9 pairs.
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
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tuning_free_scores import (  # noqa: E402
    BACKGROUNDS,
    arm_readings,
    claims,
    kinds,
    mean_of,
    ordered_pairs,
    print_claims,
    score_units,
)

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
    """The arm's readings and asked backgrounds (tuning_free_scores.arm_readings), each subject in its slot's box."""
    from multiconcept import toyworld as cw
    from multiconcept.api import SubjectComposeSettings
    from multiconcept.workflows.compose_subject_diffusion import compose_images

    kind = cw.concept(concepts[0]).creature.kind
    refs = [cw.write_reference(c, args.out / "refs") for c in concepts]
    locations = [",".join(f"{v:g}" for v in BOXES[s]) for s in slots]
    settings = SubjectComposeSettings(steps=args.sample_steps)
    name = "+".join(concepts) + "".join(f"@{'RL'[s]}" for s in slots)
    return arm_readings(folder, name, " and ".join(f"a {kind} <img>" for _ in concepts), args.images,
                        lambda prompt, n, seed: compose_images(prompt, refs, model, n=n, seed=seed, settings=settings,
                                                               locations=locations, base=args.base))


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


def token_types(model, prompt: str, kind: str) -> dict[str, list[tuple[int, int | None]]]:
    """Token positions by type, each with the subject it stands for (None: no subject): the placeholder and
    the label word of each subject's clause, the caption's nouns (its kind words in order, and 'background'),
    the end token, the padding."""
    from multiconcept.methods.subject_diffusion import parse_marked_prompt

    fp = parse_marked_prompt(model.tokenizer, prompt, 2)
    offsets = model.tokenizer(fp.text, return_offsets_mapping=True)["offset_mapping"]

    def last_piece(start: int, end: int) -> int:  # a word's last token, as the label's position is taken
        return max(i for i, (a, b) in enumerate(offsets) if a < end and b > start)

    def words(word: str) -> list[int]:
        return [last_piece(m.start(), m.end()) for m in re.finditer(rf"\b{word}\b", fp.caption)]

    n = len(fp.input_ids)
    return {"placeholder": [(i, s) for s, i in enumerate(fp.placeholders)],
            "label": [(i, s) for s, i in enumerate(fp.entities)],
            "caption noun": [(i, s) for s, i in enumerate(words(kind)[:2])] + [(i, None) for i in words("background")],
            "end": [(n - 1, None)], "padding": [(i, None) for i in range(n, model.tokenizer.model_max_length)]}


def box_shares(store, positions: list[tuple[int, int | None]]) -> dict[str, float | None]:
    """Of each token's cross-attention (mean over layers and heads, summed over steps), the share inside its own
    subject's box and inside the other's; for a token of no subject, inside either box."""
    import torch

    own, other, either = [], [], []
    for maps in store.layer_maps().values():  # batch heads token h w
        m = maps.mean(1)
        h, w = m.shape[-2:]
        boxes = []
        for x0, y0, x1, y1 in BOXES:
            mask = torch.zeros(h, w)
            mask[int(y0 * h):max(int(y0 * h) + 1, round(y1 * h)), int(x0 * w):max(int(x0 * w) + 1, round(x1 * w))] = 1
            boxes.append(mask)
        for i, subject in positions:
            t = m[:, i]
            total = t.sum(dim=(-2, -1)).clamp_min(1e-12)
            inside = [(t * b).sum(dim=(-2, -1)) / total for b in boxes]
            if subject is None:
                either += (inside[0] + inside[1]).tolist()
            else:
                own += inside[subject].tolist()
                other += inside[1 - subject].tolist()
    return {"own": mean_of(own), "other": mean_of(other), "either": mean_of(either)}


def diagnostic(args, name: str) -> dict:
    """Per token type, per pair: where its attention falls, on the pair arm's prompts (composed again under
    capture; the scored images are not read)."""
    from multiconcept import toyworld as cw
    from multiconcept.api import SubjectComposeSettings
    from multiconcept.attention import AttentionStore, capture_attention
    from multiconcept.methods.subject_diffusion import SubjectDiffusion
    from multiconcept.workflows.compose_subject_diffusion import compose_images

    model = SubjectDiffusion.load(args.out / "models" / name, base=args.base)
    per_bg = max(1, args.images // len(BACKGROUNDS))
    locations = [",".join(f"{v:g}" for v in BOXES[s]) for s in (0, 1)]
    units = {}
    for group in kinds().values():
        for x, y in ((group[0], group[1]), (group[0], group[2]), (group[1], group[2])):
            kind = cw.concept(x).creature.kind
            refs = [cw.write_reference(c, args.out / "refs") for c in (x, y)]
            found: dict[str, list[dict]] = {}
            for b, bg in enumerate(BACKGROUNDS):
                prompt = f"a {kind} <img> and a {kind} <img> on {cw.article(bg)} {bg} background"
                store = AttentionStore(accumulate=True, batch_slice=slice(0, per_bg))  # the conditional branch
                with capture_attention(model.unet, store):
                    compose_images(prompt, refs, model, n=per_bg, seed=3000 + 100 * b,
                                   settings=SubjectComposeSettings(steps=args.sample_steps, batch_size=per_bg),
                                   locations=locations, base=args.base)
                for kind_of_token, positions in token_types(model, prompt, kind).items():
                    found.setdefault(kind_of_token, []).append(box_shares(store, positions))
            units[f"{x}+{y}"] = {t: {k: mean_of([r[k] for r in rows]) for k in ("own", "other", "either")}
                                 for t, rows in found.items()}
    return units


def print_diagnostic(name: str, units: dict) -> None:
    from multiconcept.metrics.stats import mean_sem

    print(f"{name}: attention share by token type (mean ± sem over {len(units)} pairs)")
    for t in next(iter(units.values())):
        cells = []
        for k in ("own", "other", "either"):
            values = [u[t][k] for u in units.values() if u[t][k] is not None]
            if values:
                cells.append(f"{k} box {mean_sem(values).text()}")
        print(f"  {t}: " + ", ".join(cells))


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
    ap.add_argument("stages", nargs="+", choices=("train", "score", "diagnose"))
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
        results = cached(args.out / "results.json", names, lambda name: score_model(args, name))
        for name in names:
            print_claims(name, claims(results[name]["units"]))
        compare(results)
    if "diagnose" in args.stages:
        found = cached(args.out / "diagnostic.json", names, lambda name: diagnostic(args, name))
        for name in names:
            print_diagnostic(name, found[name])


def cached(path: Path, names: list[str], compute) -> dict:
    """{name: compute(name)}, each written to `path` as it finishes and read from there by a later run."""
    done = json.loads(path.read_text()) if path.is_file() else {}
    for name in names:
        if name not in done:
            done[name] = compute(name)
            path.write_text(json.dumps(done, indent=1))
    return done


if __name__ == "__main__":
    main()
