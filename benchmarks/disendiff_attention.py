"""Why DisenDiff does or does not differ from Custom Diffusion: where the learned tokens attend on the source.

    .venv/bin/python benchmarks/disendiff_attention.py --out runs/dd [--units 16] [--variants disendiff,custom-diffusion]

Reads the bundles `benchmarks/disendiff_evidence.py --out runs/dd` learned. For each unit, its one source image
(the image every variant learned from) is noised at t = 100, 300, 500, 700, 900 with two noise seeds and
denoised once under the training caption "a <c1> robot and a <c2> bird" with each variant's bundle (and with
the plain base, class words only). At the level DisenDiff calibrates (8x8 on ToyWorld; --resolution), the
cross-attention maps (mean over heads and layers) give:
  bind        each concept's 1 - IoU between its modifier's map and its class word's map, as L_bind computes it
              (smoothed, class map suppressed); mean over the two concepts
  separation  the IoU of the two class words' maps, as L_s&s computes it
  own / other the share of a token's attention mass (summed over the map) inside its own subject's mask and
              inside the other subject's mask, for the modifiers and for the class words
If DisenDiff's bundle scores these as Custom Diffusion's does, its calibration did not move the maps; if it
moved them and leakage stayed, the leak is not where the maps are. Claims: DisenDiff against each other
variant, paired over units (95% t intervals). Writes OUT/attention.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

TIMESTEPS = (100, 300, 500, 700, 900)
NOISE_SEEDS = (0, 1)
KEYS = ("bind", "separation", "modifier_own", "modifier_other", "class_own", "class_other")


def positions(tokenizer, prompt: str, words: list[str]) -> list[int]:
    """The index of each word's first token in the prompt's ids, in order."""
    ids = tokenizer(prompt).input_ids
    out, start = [], 0
    for w in words:
        first = tokenizer(w, add_special_tokens=False).input_ids[0]
        start = ids.index(first, start)
        out.append(start)
        start += 1
    return out


def unit_maps(base, prompt: str, words: list[str], image, resolution: int):
    """``sample token h w``: the maps of `words` at `resolution`, one sample per (timestep, noise seed)."""
    import torch
    from diffusers import DDPMScheduler

    from multiconcept.attention import AttentionStore, capture_attention
    from multiconcept.latents import latent_scale
    from multiconcept.models.conditioning import encode_prompts

    pipe = base.pipe
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        z0 = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.mean * latent_scale(pipe.vae)
        cond = encode_prompts(base, [prompt]).hidden
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        idx = positions(pipe.tokenizer, prompt, words)
        out = []
        for seed in NOISE_SEEDS:
            noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
            for t in TIMESTEPS:
                ts = torch.tensor([t])
                store = AttentionStore(resolutions=[resolution], token_indices=idx)
                with capture_attention(pipe.unet, store):
                    pipe.unet(scheduler.add_noise(z0, noise, ts), ts, encoder_hidden_states=cond)
                out.append(store.maps(resolution)[0])
    return torch.stack(out)


def readings(maps, masks, with_modifiers: bool) -> dict:
    """The KEYS of one variant's maps ``sample token h w`` (tokens: c1, class1, c2, class2, or class1, class2)."""
    import torch

    from multiconcept.attention import resize_mask
    from multiconcept.losses import bind_loss, separation_loss

    m = resize_mask(torch.from_numpy(np.stack(masks)).float(), tuple(maps.shape[-2:]))  # concept h w
    if with_modifiers:
        mod, cls = maps[:, 0::2], maps[:, 1::2]
    else:
        mod, cls = None, maps
    mass = cls.sum((-2, -1))
    row = {"separation": float(separation_loss(cls).mean()),
           "class_own": float(((cls * m).sum((-2, -1)) / mass).mean()),
           "class_other": float(((cls * m.flip(0)).sum((-2, -1)) / mass).mean())}
    if mod is not None:
        mmass = mod.sum((-2, -1))
        row.update(bind=float(bind_loss(cls, mod, per_concept=True).mean()),
                   modifier_own=float(((mod * m).sum((-2, -1)) / mmass).mean()),
                   modifier_other=float(((mod * m.flip(0)).sum((-2, -1)) / mmass).mean()))
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the folder disendiff_evidence.py wrote")
    ap.add_argument("--base", default="toyworld")
    ap.add_argument("--units", type=int, default=16)
    ap.add_argument("--variants", default="disendiff,custom-diffusion,custom-diffusion masked")
    ap.add_argument("--resolution", type=int, default=8, help="map side (DisenDiff's default level on ToyWorld: 8)")
    args = ap.parse_args()
    from multiconcept import toyworld as cw
    from multiconcept.metrics.stats import mean_sem, paired_difference
    from multiconcept.models import load_base
    from multiconcept.workflows.generate import load_with_bundles

    labels = [v.strip() for v in args.variants.split(",")]
    path = args.out / "attention.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for i, (a, b) in enumerate(cw.two_kind_pairs(args.units)):
        key = f"{a}+{b}"
        if key in results and all(label in results[key] for label in ["base", *labels]):
            continue
        ca, cb = cw.concept(a).creature, cw.concept(b).creature
        scene = cw.two_concept_scene(a, b, seed=i)
        masks = [s.mask for s in scene.subjects]
        folder = args.out / "cells" / f"{i:02d}_{key}"
        plain = f"a {ca.kind} and a {cb.kind}"
        row = {"base": readings(unit_maps(load_base(args.base), plain, [ca.kind, cb.kind], scene.pil(),
                                          args.resolution), masks, with_modifiers=False)}
        prompt = f"a <c1> {ca.kind} and a <c2> {cb.kind}"
        for label in labels:
            bundle = folder / f"{label.replace(' ', '_')}.safetensors"
            base = load_with_bundles(args.base, [str(bundle)]).base
            words = ["<c1>", ca.kind, "<c2>", cb.kind]
            row[label] = readings(unit_maps(base, prompt, words, scene.pil(), args.resolution), masks, True)
        results[key] = row
        path.write_text(json.dumps(results, indent=1))
        print(key, json.dumps({k: {m: round(v, 3) for m, v in r.items()} for k, r in row.items()}), flush=True)
    units = [results[f"{a}+{b}"] for a, b in cw.two_kind_pairs(args.units)]
    print("| variant | " + " | ".join(KEYS) + " |\n|---|" + "---|" * len(KEYS))
    for label in ["base", *labels]:
        cells = [mean_sem([u[label][k] for u in units]).text() if k in units[0][label] else "–" for k in KEYS]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for other in labels[1:]:
        for k in KEYS:
            d = paired_difference([u[labels[0]][k] for u in units], [u[other][k] for u in units])
            print(f"- {k}: " + d.text(labels[0], other))


if __name__ == "__main__":
    main()
