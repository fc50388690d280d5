"""The main job (`make demo`): two concepts from one image, end to end.

Renders ToyWorld's two-concept source image (two creatures of different
kinds) with its masks, learns both concepts, generates a grid for prompts
holding both and each concept, and writes one offline HTML page with the
source, masks, grid, attention heatmaps and a small metric table (the
analytic checker's exact part scores, and CLIP-I when the evaluator is in).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .. import report
from ..bundle import atomic_write
from ..data import Source, concept_set
from ..images import read_image, read_mask
from ..metrics.leakage import toyworld_measures
from ..models import toyworld_available
from ..prompts import Concept
from ..toyworld import left_to_right, write_two_concept_folder
from .generate import SampleSettings, generate, load_with_bundles
from .learn import learn_concepts

PAIR = ("robot_a", "bird_b")  # two kinds that differ in every part (toyworld.PERSONAL_CONCEPTS' pilot set)
TOKENS = ("<s1>", "<s2>")


DEMO_STEPS = 250


def demo_settings(method: str, background: str) -> dict[str, object]:
    """The demo's training settings over the method's defaults (measured on the ToyWorld base,
    docs/demo.md, "The demo's settings"): with the paper's lr (1e-5 x batch 2), scale augmentation,
    flips and 'photo of a {}' captions, 60-300 steps learned neither concept.

    - captions in ToyWorld's words ('a <s1> robot and a <s2> bird on a beige background');
    - no scale augmentation or flips: the base draws subjects at fixed places, and a flip
      swaps which side the caption's first concept is on;
    - lr 1e-4 (x batch 2): 1e-5 barely moves a 5.9 M-parameter UNet in 250 steps;
    - Break-A-Scene's union sampling with the unnamed concept painted out (the source has a
      plain background), so 'a <s2> bird' is trained on an image holding only the bird.
    """
    settings = {"grad_accum": 1, "lr": 1e-4, "augment": False,
                "templates": (f"a {{}} on {'an' if background[0] in 'aeiou' else 'a'} {background} background",)}
    if method == "disendiff":
        settings.update({"union_sampling": True, "unnamed": "erase", "loss_region": "all"})
    return settings


def run_demo(out_dir: str | Path, base: str | None = None, steps: int | None = None, n_images: int = 4,
             overrides: dict[str, object] | None = None, compile: str = "off") -> Path:
    out = Path(out_dir)
    if base is None:
        base = "toyworld" if toyworld_available() else "tiny"
    src = out / "source"
    scene = write_two_concept_folder(*PAIR, src, seed=0)
    a, b = left_to_right(scene.subjects)  # <s1> is the left subject
    data = concept_set([Concept(TOKENS[0], a.creature.kind), Concept(TOKENS[1], b.creature.kind)],
                       [Source(src / "image.png", {TOKENS[0]: src / f"{a.concept}_mask.png",
                                                   TOKENS[1]: src / f"{b.concept}_mask.png"})])
    method = "disendiff"
    steps = steps or (DEMO_STEPS if base != "tiny" else 10)
    settings_used = {**demo_settings(method, scene.background), "steps": steps, "compile": compile, **(overrides or {})}
    bundle_path = out / "concepts.safetensors"
    t0 = time.perf_counter()
    learn_concepts(method, data, bundle_path, settings=settings_used, base=base, progress=True)
    learn_s = time.perf_counter() - t0

    loaded = load_with_bundles(base, [str(bundle_path)])
    bg = scene.background
    art = "an" if bg[0] in "aeiou" else "a"
    prompts = {
        "both": f"a {TOKENS[0]} {a.creature.kind} and a {TOKENS[1]} {b.creature.kind} on {art} {bg} background",
        "concept 1": f"a {TOKENS[0]} {a.creature.kind} on {art} {bg} background",
        "concept 2": f"a {TOKENS[1]} {b.creature.kind} on {art} {bg} background",
    }
    # `compile` reaches the training only: 12 images of 25 steps with attention capture (whose processors stay
    # eager) never repay a whole-UNet compile (docs/speed.md: on ToyWorld it costs more than the demo's
    # whole eager run, and the cold demo must stay within 90 s)
    settings = SampleSettings(steps=25, guidance=4.0)
    t0 = time.perf_counter()
    grid, rows = {}, []
    for i, (kind, prompt) in enumerate(prompts.items()):
        paths = generate(prompt, loaded, n_images, 100 * i, out / "images", settings, attention_maps=True,
                         name_prefix=f"{kind.replace(' ', '')}_")
        grid[kind] = paths
        rows.append([kind, prompt] + _part_scores(paths, kind, a.creature, b.creature))
    gen_s = time.perf_counter() - t0
    clip_cols, clip_note = _clip_scores(grid, rows, src, (a.concept, b.concept))
    header = ["prompt", "text", "prompted kinds found", "identity (parts right)", "leak (other's parts)"] + clip_cols
    metrics = json.dumps({"learn_s": round(learn_s, 1), "settings": settings_used,
                          "rows": [dict(zip(header, r)) for r in rows]}, indent=1)
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(metrics))

    sections = [
        report.section("Source and masks", report.row([
            report.figure(src / "image.png", "source"),
            report.figure(src / f"{a.concept}_mask.png", f"{TOKENS[0]} = {a.creature.full_description()}"),
            report.figure(src / f"{b.concept}_mask.png", f"{TOKENS[1]} = {b.creature.full_description()}"),
        ])),
        report.section("Generations", "".join(
            report.prompt_line(kind, prompts[kind]) + report.row([report.figure(p, p.stem) for p in paths])
            for kind, paths in grid.items())),
        report.section("Attention heatmaps (first image of each prompt)", "".join(
            report.note(kind) + report.row([report.figure(h, h.stem.split('_', 2)[-1], 96)
                                           for h in sorted((out / "images" / "attention").glob(f"{paths[0].stem}_*.png"))])
            for kind, paths in grid.items())),
        report.section("Metrics", report.table(header, rows) + report.note(
            "Read by ToyWorld's analytic checker from pixels alone, means over the prompt's images: the share of "
            "images showing every prompted concept's kind; the share of the prompted concepts' five parts drawn "
            "with their own values (the concept's identity: no word says them); for a single-concept prompt, the "
            "most of the other concept's distinguishing parts on any subject (leakage: lower is better)."
            + clip_note)),
        report.section("Run", report.table(["setting", "value"], [
            ["base", loaded.base.name], ["method", method], ["training steps", steps],
            ["settings", ", ".join(f"{k}={v}" for k, v in settings_used.items() if k != "steps")],
            ["learn time (s)", round(learn_s, 1)], ["generation time (s)", round(gen_s, 1)],
            ["sampler", f"{settings.scheduler_for(loaded.base)}, {settings.steps} steps, guidance {settings.guidance}"],
        ]) + (report.note("The tiny base is a random model: its images are noise. Build ToyWorld "
                          "(multiconcept toyworld build) for a base that draws.") if loaded.base.name == "tiny" else "")),
    ]
    return report.write_page(out / "index.html", "multiconcept demo: two concepts from one image", sections)


def _clip_scores(grid: dict, rows: list, src: Path, names: tuple[str, str]) -> tuple[list[str], str]:
    """CLIP-I of each prompt's images against each concept's masked crop, with
    ToyWorld's evaluator; appended to `rows`. Nothing when it is not installed."""
    from ..metrics.clip import load_clip, mean_pairwise_cosine, toyworld_evaluator_available
    from .sources import concept_crop

    if not toyworld_evaluator_available():
        return [], ""
    scorer = load_clip(None)
    image = read_image(src / "image.png")
    refs = [scorer.image_embeddings([concept_crop(image, read_mask(src / f"{name}_mask.png"))]) for name in names]
    for row, paths in zip(rows, grid.values()):
        emb = scorer.image_embeddings([read_image(p) for p in paths])
        row += [round(mean_pairwise_cosine(emb, r), 3) for r in refs]
    return ([f"CLIP-I {TOKENS[0]}", f"CLIP-I {TOKENS[1]}"],
            " CLIP-I: mean cosine of ToyWorld-evaluator embeddings, generations vs the concept's masked crop "
            "of the source.")


def _part_scores(paths, kind, a, b) -> list:
    prompted = {"both": [a, b], "concept 1": [a], "concept 2": [b]}[kind]
    others = [c for c in (a, b) if c not in prompted]
    found = [toyworld_measures(read_image(p), prompted, others) for p in paths]

    def mean(key):
        vals = [float(m[key]) for m in found if m[key] is not None]
        return round(float(np.mean(vals)), 3) if vals else "–"
    return [mean("present"), mean("identity"), mean("leak")]
