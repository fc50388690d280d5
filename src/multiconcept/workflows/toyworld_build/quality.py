"""Stage 6a: what the built base draws, scored by the analytic checker and the CLIPs, against the thresholds a
world that poses the methods' problems must meet.

- The checker reads every part (≥ 95% on renders; ≥ 90% on VAE reconstructions and on overlapping
  same-kind pairs, visible parts only).
- Given the most detailed caption the base's words allow ("a red robot in the center on a gray
  background"), the named parts come out right (≥ 0.8) and each part words cannot name comes out at
  chance: every one of its k values between 0.5/k and 1.5/k of the time, the 95% interval's half-width
  ≤ 0.05 (../../shared/spec/toyworld2.md, "Identity beyond words" measured, not assumed).
- Both CLIPs retrieve their renders' full captions.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ... import toyworld as tw
from ...metrics.frechet import frechet_distance
from .common import Log, grid, render_pool, to_pixels, write_json
from .evaluator import image_features, retrieval_top1
from .settings import BuildConfig, clip_names
from .world import WORLD


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
    prompts = WORLD.quick_prompts(n, seed=cfg.seed + 777)
    images = generate(pipe, [p for p, _ in prompts], cfg, seed=10_000)
    results = [WORLD.quick_check(img, expected) for img, (_, expected) in zip(images, prompts)]
    return {"n": n, **{k: float(np.mean([r[k] for r in results])) for k in results[0]}}


def detailed_prompts(seeds: int, seed: int) -> list[tuple[str, dict]]:
    """Every kind x body colour x background, `seeds` times: one subject, said as fully as the base's words allow."""
    out = []
    for kind in tw.KINDS:
        for colour in tw.BODY_COLOURS:
            for bg in tw.BACKGROUNDS:
                out += [(f"a {colour} {kind} in the center on {tw.article(bg)} {bg} background",
                         {"kind": kind, "body_colour": colour, "background": bg})] * seeds
    return [out[i] for i in np.random.default_rng(seed).permutation(len(out))]


def pair_prompts(n: int, seed: int) -> list[tuple[str, list[dict]]]:
    """Two subjects, with positions said in half of them and of one kind in half."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kinds = [str(rng.choice(tw.KINDS))] * 2 if i % 2 else [str(k) for k in rng.choice(tw.KINDS, 2, replace=False)]
        colours = [str(c) for c in rng.choice(list(tw.BODY_COLOURS), 2, replace=False)]
        where = (" on the left", " on the right") if (i // 2) % 2 else ("", "")
        bg = str(rng.choice(list(tw.BACKGROUNDS)))
        text = " and ".join(f"a {c} {k}{w}" for c, k, w in zip(colours, kinds, where))
        out.append((f"{text} on {tw.article(bg)} {bg} background",
                    [{"kind": k, "body_colour": c} for k, c in zip(kinds, colours)]))
    return out


def wilson_half_width(p: float, n: int, z: float = 1.96) -> float:
    """Half the width of the Wilson score interval: unlike the normal one it is not 0 at a share of 0 or 1."""
    if n == 0:
        return 1.0
    return float(z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n))


def chance_report(values: list[str | None], k_values: tuple[str, ...]) -> dict:
    """Each value's share among readings, its 95% (Wilson) half-width, and whether all lie in [0.5/k, 1.5/k]."""
    read = [v for v in values if v is not None]
    n, k = len(read), len(k_values)
    shares = {v: read.count(v) / max(1, n) for v in k_values}
    half = {v: wilson_half_width(p, n) for v, p in shares.items()}
    return {"n": n, "k": k, "shares": shares, "half_widths": half,
            "at_chance": bool(n and all(0.5 / k <= p <= 1.5 / k for p in shares.values())),
            "half_width_ok": bool(n and max(half.values()) <= 0.05)}


def overlap_pairs(n: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """Same-kind pairs that differ in every part, overlapping: the checker's hardest renders."""
    rng = np.random.default_rng(seed)
    images, metas = [], []
    while len(images) < n:
        a = tw.random_creature(rng, personal=True)
        b = tw.random_creature(rng, kind=a.kind, personal=True)
        if not tw.differ_in_every_part(a, b):
            continue
        scene = tw.render(tw.layout_specs([a, b], "overlap", rng), str(rng.choice(list(tw.BACKGROUNDS))), "overlap")
        images.append(scene.image)
        metas.append(scene.to_dict())
    return np.stack(images), metas


def _render_like(expected: dict, key: list[int]) -> np.ndarray:
    """A render of what a detailed prompt asks for; the parts it cannot say drawn at random."""
    rng = np.random.default_rng(key)
    c = tw.random_creature(rng, kind=expected["kind"], personal=True)
    c = tw.Creature(**{**c.parts(), "kind": c.kind, "body_colour": expected["body_colour"]})
    return tw.render(tw.layout_specs([c], "center", rng), expected["background"], "center").image


def contact_sheet(path: Path, rows: dict[str, np.ndarray], scale: int = 2) -> Path:
    """Labelled rows of 64 px images, for a human look (docs/toyworld.md)."""
    from PIL import Image, ImageDraw

    label_w, cell = 150, 64 * scale
    n = max(len(v) for v in rows.values())
    sheet = Image.new("RGB", (label_w + n * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for y, (label, images) in enumerate(rows.items()):
        draw.text((4, y * cell + cell // 2 - 6), label, fill="black")
        for x, img in enumerate(images):
            sheet.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (label_w + x * cell, y * cell))
    sheet.save(path)
    return path


def quality_report(cfg: BuildConfig, out: Path, evaluator, tokenizer, log: Log) -> dict:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    pipe = StableDiffusionPipeline.from_pretrained(out / "base", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    t = time.time()
    singles = detailed_prompts(max(1, 5 * cfg.eval_seeds), seed=cfg.seed + 1001)  # 480: half-width <= 0.05
    pairs = pair_prompts(24 * cfg.eval_seeds, seed=cfg.seed + 1002)
    gen_single = generate(pipe, [p for p, _ in singles], cfg, seed=50_000)
    gen_pair = generate(pipe, [p for p, _ in pairs], cfg, seed=60_000)
    gen_seconds = time.time() - t

    readings = [tw.analyse(img).subjects for img in gen_single]
    one = [r[0] if len(r) == 1 else None for r in readings]
    right = lambda key: float(np.mean([r is not None and (r.kind if key == "kind" else r.parts[key]) == e[key]  # noqa: E731
                                       for r, (_, e) in zip(one, singles)]))
    unnamed = {p: chance_report([r.parts[p] if r is not None else None for r in one], tw.PART_VALUES[p])
               for p in tw.UNNAMED_PARTS}
    pair_found = []
    for img, (_, expected) in zip(gen_pair, pairs):
        found = tw.analyse(img).subjects
        wanted = sorted((e["kind"], e["body_colour"]) for e in expected)
        pair_found.append((len(found) == 2, sorted((str(r.kind), str(r.parts["body_colour"])) for r in found) == wanted))

    renders, render_meta = render_pool(300, [cfg.seed, 1003], tw.world_scene, WORLD)
    overlaps, overlap_meta = overlap_pairs(100, cfg.seed + 1004)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(out / "base" / "vae", dtype=torch.float32).eval()
    with torch.no_grad():
        rec = vae.decode(vae.encode(to_pixels(renders)).latent_dist.mean).sample.clamp(-1, 1)
    rec = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    full = [WORLD.full_caption(m) for m in render_meta]
    short = [tw.caption(m) for m in render_meta]
    clips = {name: evaluator if name == "evaluator" else CLIPModel.from_pretrained(out / name, dtype=torch.float32).eval()
             for name in clip_names(cfg)}
    like, like2 = ([_render_like(e, [i, k]) for i, (_, e) in enumerate(singles)] for k in (7, 8))
    feats = lambda imgs: image_features(evaluator, np.stack(imgs))  # noqa: E731
    report = {
        "sampling": {"scheduler": "DDIMScheduler", "steps": cfg.sample_steps, "guidance": cfg.guidance,
                     "seeds": "50000+i single, 60000+i pairs"},
        "checker": {"renders": WORLD.part_accuracy(renders, render_meta),
                    "vae_reconstructions": WORLD.part_accuracy(rec, render_meta),
                    "overlapping_same_kind_pairs": WORLD.part_accuracy(overlaps, overlap_meta)},
        "single_object": {"prompts": len(singles),
                          "one_subject_found": float(np.mean([r is not None for r in one])),
                          "class_present": right("kind"), "colour_present": right("body_colour"),
                          "background": float(np.mean([tw.analyse(img).background == e["background"]
                                                       for img, (_, e) in zip(gen_single, singles)])),
                          "unnamed_parts": unnamed},
        "two_subjects": {"prompts": len(pairs), "two_found": float(np.mean([a for a, _ in pair_found])),
                         "both_kinds_and_colours": float(np.mean([b for _, b in pair_found]))},
        "evaluator": {"top1_caption_retrieval_full": retrieval_top1(evaluator, tokenizer, renders, full),
                      "top1_caption_retrieval_short": retrieval_top1(evaluator, tokenizer, renders, short),
                      "retrieval_candidates": len(full),
                      "frechet_generated_vs_rendered": frechet_distance(feats(list(gen_single)), feats(like)),
                      "frechet_rendered_vs_rendered": frechet_distance(feats(like), feats(like2))},
        "clips": {name: {"top1_caption_retrieval_full": retrieval_top1(m, tokenizer, renders, full)}
                  for name, m in clips.items()},
        "seconds_per_image": gen_seconds / (len(singles) + len(pairs)),
    }
    log(f"quality: checker on reconstructions {report['checker']['vae_reconstructions']}; unnamed parts at chance "
        f"{ {p: u['at_chance'] for p, u in unnamed.items()} }")
    grid(np.concatenate([gen_single[:48], gen_pair[:16]])).save(out / "samples.png")
    contact_sheet(out / "contact_sheet.png", {"renders": renders[:8], "VAE reconstructions": rec[:8],
                                              "same kind, overlapping": overlaps[:8], "base: one subject": gen_single[:8],
                                              "base: two subjects": gen_pair[:8]})
    write_json(out / "samples.json", [p for p, _ in singles[:48]] + [p for p, _ in pairs[:16]])
    return report
