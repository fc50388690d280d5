"""Stage 6a: what the built base draws, scored by the analytic checker and the evaluator."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ...metrics.frechet import frechet_distance
from ...toyworld.check import check
from ...toyworld.render import BACKGROUNDS, CLASS_NOUNS, COLOURS, Appearance, ObjectSpec, describe, render_scene
from ...toyworld.scenes import world_scene
from .common import Log, grid, render_pool, write_json
from .evaluator import image_features, retrieval_top1
from .settings import BuildConfig
from .worlds import WORLDS, objects_from_dicts


def single_object_prompts(n: int, seed: int) -> list[tuple[str, str, str, str]]:
    """(prompt, noun, colour, background), cycling through every class x colour."""
    return [(p, e["noun"], e["colour"], e["background"]) for p, e in WORLDS["shapes"].quick_prompts(n, seed)]


def two_object_prompts(n: int, seed: int) -> list[tuple[str, tuple, tuple, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        n1, n2 = rng.choice(CLASS_NOUNS, 2, replace=False)
        c1, c2 = rng.choice(list(COLOURS), 2, replace=False)
        bg = str(rng.choice(list(BACKGROUNDS)))
        a1, a2 = ("an" if c[0] in "aeiou" else "a" for c in (c1, c2))
        out.append((f"{a1} {c1} {n1} on the left and {a2} {c2} {n2} on the right on a {bg} background",
                    (str(n1), str(c1)), (str(n2), str(c2)), bg))
    return out


def colourless_score(pipe, cfg: BuildConfig, seeds: int = 2) -> dict:
    """Class prompts without a colour ("a star on a gray background", every class x
    background x seed): personalisation's class prompts look like this."""
    prompts = [(f"a {noun} on a {bg} background", noun) for noun in CLASS_NOUNS for bg in BACKGROUNDS
               for _ in range(seeds)]
    images = generate(pipe, [p for p, _ in prompts], cfg, seed=70_000)
    found = [check(img, noun, None) for img, (_, noun) in zip(images, prompts)]
    return {"prompts": len(prompts), "class_present": float(np.mean([r["class_present"] for r in found])),
            "largest_object_is_class": float(np.mean([r["largest_is_class"] for r in found]))}


@torch.no_grad()
def generate(pipe, prompts: list[str], cfg: BuildConfig, seed: int, batch: int = 32) -> np.ndarray:
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance,
                   generator=gens, output_type="np").images
        images.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(images)


def quick_score(pipe, cfg: BuildConfig, n: int) -> dict:
    """Checker scores on n held-out single-object prompts (seeded, so comparable across steps)."""
    world = WORLDS[cfg.world]
    prompts = world.quick_prompts(n, seed=cfg.seed + 777)
    images = generate(pipe, [p for p, _ in prompts], cfg, seed=10_000)
    results = [world.quick_check(img, expected) for img, (_, expected) in zip(images, prompts)]
    return {"n": n, **{k: float(np.mean([r[k] for r in results])) for k in results[0]}}


def _render_like(noun: str, colour: str, bg: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return render_scene([ObjectSpec(noun, Appearance(colour), str(rng.choice(["small", "large"])), "center")],
                        bg, "plain", rng).image


def quality_report(cfg: BuildConfig, out: Path, evaluator, tokenizer, log: Log) -> dict:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "base", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    t = time.time()
    singles = single_object_prompts(len(CLASS_NOUNS) * len(COLOURS) * cfg.eval_seeds, seed=cfg.seed + 1001)
    pairs = two_object_prompts(24 * cfg.eval_seeds, seed=cfg.seed + 1002)
    gen_single = generate(pipe, [p[0] for p in singles], cfg, seed=50_000)
    gen_pair = generate(pipe, [p[0] for p in pairs], cfg, seed=60_000)
    gen_seconds = time.time() - t
    single = [check(img, noun, colour) for img, (_, noun, colour, _) in zip(gen_single, singles)]
    pair = [(check(img, *a), check(img, *b)) for img, (_, a, b, _) in zip(gen_pair, pairs)]
    mean = lambda xs: float(np.mean(xs))  # noqa: E731

    held_out, held_meta = render_pool(200, [cfg.seed, 1003], world_scene, WORLDS["shapes"])
    full = [describe(objects_from_dicts(m["objects"]), m["background"]) for m in held_meta]
    # class and appearance words only: what a prompt without layout words says
    short = [" and ".join(o.phrase(size=False, position=False) for o in objects_from_dicts(m["objects"]))
             for m in held_meta]
    base_renders = np.stack([_render_like(noun, colour, bg, i) for i, (_, noun, colour, bg) in enumerate(singles)])
    fd = frechet_distance(image_features(evaluator, gen_single), image_features(evaluator, base_renders))
    fd_floor = frechet_distance(image_features(evaluator, base_renders),
                                image_features(evaluator, np.stack([_render_like(n, c, b, 10_000 + i)
                                                                    for i, (_, n, c, b) in enumerate(singles)])))
    report = {
        "sampling": {"scheduler": "DDIMScheduler", "steps": cfg.sample_steps, "guidance": cfg.guidance,
                     "seeds": "50000+i single, 60000+i pairs"},
        "single_object": {"prompts": len(singles), "class_present": mean([r["class_present"] for r in single]),
                          "largest_object_is_class": mean([r["largest_is_class"] for r in single]),
                          "objects_detected_per_image": mean([len(r["detections"]) for r in single]),
                          "colour_present": mean([r["colour_present"] for r in single]),
                          "class_and_colour_same_object": mean([r["match"] for r in single]),
                          "background": mean([r["background"] == p[3] for r, p in zip(single, singles)])},
        "two_object": {"prompts": len(pairs),
                       "both_classes_present": mean([a["class_present"] and b["class_present"] for a, b in pair]),
                       "both_colours_present": mean([a["colour_present"] and b["colour_present"] for a, b in pair]),
                       "both_bound": mean([a["match"] and b["match"] for a, b in pair])},
        "no_colour_in_prompt": colourless_score(pipe, cfg, cfg.eval_seeds),
        "evaluator": {"top1_caption_retrieval_full": retrieval_top1(evaluator, tokenizer, held_out, full),
                      "top1_caption_retrieval_short": retrieval_top1(evaluator, tokenizer, held_out, short),
                      "retrieval_candidates": len(full),
                      "frechet_generated_vs_rendered": fd,
                      "frechet_rendered_vs_rendered": fd_floor,
                      "frechet_samples": len(singles)},
        "seconds_per_image": gen_seconds / (len(singles) + len(pairs)),
    }
    grid(np.concatenate([gen_single[:48], gen_pair[:16]])).save(out / "samples.png")
    write_json(out / "samples.json", [p[0] for p in singles[:48]] + [p[0] for p in pairs[:16]])
    return report
