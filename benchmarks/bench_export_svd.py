"""Custom Diffusion / DisenDiff exported as a LoRA (truncated SVD): file bytes and image difference vs rank.

    .venv/bin/python benchmarks/bench_export_svd.py [--quick] [--out runs/export_svd]

ToyWorld: Custom Diffusion and DisenDiff bundles are learned on ToyWorld two-concept sources with the
demo's settings (workflows/demo.py: lr 1e-4 x batch 2, no augmentation, ToyWorld captions; DisenDiff with
union sampling), then exported with `export --format a1111` at each rank. Each export is loaded by
diffusers' own loaders (`load_textual_inversion`, `load_lora_weights`, as the README shows) into a fresh
ToyWorld pipeline and sampled with the same prompts and seeds as `multiconcept generate` with the bundle:
the table gives the LoRA file's bytes, the relative Frobenius error of the deltas (all layers), and the
mean and max absolute pixel difference to the bundle's images (0-255; the base without the concepts is
given for scale).

SD 1.5 geometry: its UNet is built from its config on the `meta` device; the LoRA file a Custom Diffusion
bundle (attn2 K/V) becomes is written at each rank through the same writer (zero factors: random weights
say nothing about the error) and its bytes measured, beside the bundle's own delta bytes.
Writes OUT/export_svd.json (and, without --quick, benchmarks/results/export_svd.json) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # on a shared CPU, spinning threads starve each other

import numpy as np  # noqa: E402
import torch  # noqa: E402

RANKS = (1, 4, 16, 32, 64, None)
SD15_RANKS = (1, 4, 16, 32, 64, 128, None)
PAIRS = (("robot_a", "bird_b"), ("ghost_c", "robot_b"))  # two kinds each (the demo's pair first)
TOKENS = ("<s1>", "<s2>")


def learn_bundles(out: Path, pairs, methods, steps: int) -> list[dict]:
    from multiconcept.data import Source, concept_set
    from multiconcept.prompts import Concept
    from multiconcept.toyworld import left_to_right, write_two_concept_folder
    from multiconcept.workflows.demo import demo_settings
    from multiconcept.workflows.learn import learn_concepts

    bundles = []
    for i, pair in enumerate(pairs):
        src = out / f"source{i}"
        scene = write_two_concept_folder(*pair, src, seed=i)
        a, b = left_to_right(scene.subjects)
        ka, kb = a.creature.kind, b.creature.kind
        data = concept_set([Concept(TOKENS[0], ka), Concept(TOKENS[1], kb)],
                           [Source(src / "image.png", {TOKENS[0]: src / f"{a.concept}_mask.png",
                                                       TOKENS[1]: src / f"{b.concept}_mask.png"})])
        bg = scene.background
        prompts = [f"a {TOKENS[0]} {ka} and a {TOKENS[1]} {kb} on a {bg} background",
                   f"a {TOKENS[0]} {ka} on a {bg} background", f"a {TOKENS[1]} {kb} on a {bg} background"]
        for method in methods:
            path = out / f"{method}_{i}.safetensors"
            if not path.exists():
                t0 = time.perf_counter()
                learn_concepts(method, data, path, settings={**demo_settings(method, bg), "steps": steps},
                               base="toyworld", progress=False)
                print(f"learned {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
            bundles.append({"path": path, "method": method, "pair": "+".join(pair), "prompts": prompts})
    return bundles


def sample(pipe, prompts, seeds, steps: int) -> np.ndarray:
    from multiconcept.workflows.generate import make_scheduler

    pipe.scheduler = make_scheduler(pipe, "ddim")
    images = []
    for p in prompts:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        with torch.no_grad():
            out = pipe([p] * len(seeds), num_inference_steps=steps, guidance_scale=4.0, generator=gens).images
        images += [np.asarray(im, dtype=np.int16) for im in out]
    return np.stack(images)


def toyworld_rows(out: Path, bundles: list[dict], ranks, seeds, steps: int) -> list[dict]:
    from multiconcept.export import export_for_tools
    from multiconcept.models import load_base
    from multiconcept.workflows.generate import load_with_bundles

    rows = []
    for b in bundles:
        ours = sample(load_with_bundles("toyworld", [str(b["path"])]).base.pipe, b["prompts"], seeds, steps)
        base = load_base("toyworld")
        plain = sample(base.pipe, [p.replace(f"{TOKENS[0]} ", "").replace(f"{TOKENS[1]} ", "") for p in b["prompts"]],
                       seeds, steps)
        row = {"bundle": b["path"].name, "method": b["method"], "pair": b["pair"],
               "base_vs_bundle_mean_abs": float(np.abs(plain - ours).mean()), "ranks": []}
        for r in ranks:
            folder = out / f"{b['path'].stem}_r{r or 'full'}"
            res = export_for_tools(b["path"], base, folder, "a1111", r)
            pipe = load_base("toyworld").pipe
            for token, word in res.embeddings.items():
                pipe.load_textual_inversion(str(folder / "embeddings" / f"{word}.safetensors"), token=token)
            pipe.load_lora_weights(str(folder / "loras"), weight_name=f"{res.lora}.safetensors")
            theirs = sample(pipe, b["prompts"], seeds, steps)
            diff = np.abs(theirs - ours)
            row["ranks"].append({"rank": r or "full", "kept": max(e.rank for e in res.svd.layers),
                                 "lora_bytes": (folder / "loras" / f"{res.lora}.safetensors").stat().st_size,
                                 "embedding_bytes": sum((folder / "embeddings" / f"{w}.safetensors").stat().st_size
                                                        for w in res.embeddings.values()),
                                 "relative_error": res.svd.relative_error, "worst_layer_error": res.svd.worst.relative_error,
                                 "pixel_mean_abs": float(diff.mean()), "pixel_max_abs": int(diff.max())})
            print(f"{row['bundle']} rank {r or 'full'}: error {res.svd.relative_error:.4f}, "
                  f"pixels mean {diff.mean():.3f} max {diff.max()}", flush=True)
        rows.append(row)
    return rows


def sd15_bytes(ranks) -> dict:
    """LoRA file bytes of a Custom Diffusion bundle (attn2 K/V) of SD 1.5's geometry, via the export's writer."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from multiconcept.export.kohya import kohya_lora

    config = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    layers = {n: m for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}
    delta_bytes = 4 * sum(m.weight.numel() for m in layers.values())
    out = {"layers": len(layers), "custom_diffusion_delta_bytes_fp32": delta_bytes, "ranks": []}
    with tempfile.TemporaryDirectory() as d:
        for r in ranks:
            peft = {}
            for n, m in layers.items():
                k = min(r or 10**9, m.in_features, m.out_features)
                peft[f"unet.{n}.lora_A.weight"] = torch.zeros(k, m.in_features)
                peft[f"unet.{n}.lora_B.weight"] = torch.zeros(m.out_features, k)
            f = Path(d) / "x.safetensors"
            save_file(kohya_lora(peft, None), str(f))
            out["ranks"].append({"rank": r or "full", "lora_bytes": f.stat().st_size})
    return out


def table(rows: list[dict], sd15: dict) -> str:
    by_rank = {}
    for row in rows:
        for e in row["ranks"]:
            by_rank.setdefault(str(e["rank"]), []).append(e)
    sd = {str(e["rank"]): e["lora_bytes"] for e in sd15["ranks"]}
    lines = ["| rank | ToyWorld LoRA bytes | rel. Frobenius error (mean / max over bundles) | pixel diff mean | "
             "pixel diff max | SD 1.5 LoRA bytes |", "|---|---|---|---|---|---|"]
    for r, es in by_rank.items():
        lines.append(f"| {r} | {es[0]['lora_bytes']:,} | {np.mean([e['relative_error'] for e in es]):.3f} / "
                     f"{max(e['relative_error'] for e in es):.3f} | {np.mean([e['pixel_mean_abs'] for e in es]):.2f} | "
                     f"{max(e['pixel_max_abs'] for e in es)} | {sd.get(r, 0):,} |")
    scale = np.mean([row["base_vs_bundle_mean_abs"] for row in rows])
    lines.append(f"\nFor scale: the base without the concepts differs from the bundle's images by {scale:.2f} on average; "
                 f"SD 1.5 Custom Diffusion deltas: {sd15['custom_diffusion_delta_bytes_fp32']:,} bytes (fp32), "
                 f"{sd15['layers']} layers.")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/export_svd"))
    ap.add_argument("--quick", action="store_true", help="DisenDiff only, 30 steps, 3 ranks, one seed")
    ap.add_argument("--steps", type=int, default=200, help="training steps (the demo: 250)")
    ap.add_argument("--pairs", type=int, default=1, help="ToyWorld sources (concept pairs), each learned by both methods")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        pairs, methods, steps, ranks, seeds = PAIRS[:1], ("disendiff",), 30, (4, 16, None), (0,)
    else:
        pairs, methods, steps, ranks, seeds = PAIRS[: args.pairs], ("custom-diffusion", "disendiff"), args.steps, RANKS, (0, 1)
    t0 = time.perf_counter()
    bundles = learn_bundles(args.out, pairs, methods, steps)
    rows = toyworld_rows(args.out, bundles, ranks, seeds, args.sample_steps)
    sd15 = sd15_bytes(ranks if args.quick else SD15_RANKS)
    result = {"settings": {"steps": steps, "sample_steps": args.sample_steps, "guidance": 4.0, "seeds": list(seeds),
                           "pairs": ["+".join(p) for p in pairs], "methods": list(methods)},
              "toyworld": rows, "sd15": sd15, "seconds": round(time.perf_counter() - t0)}
    text = json.dumps(result, indent=1, default=str)
    (args.out / "export_svd.json").write_text(text)
    if not args.quick:
        Path("benchmarks/results/export_svd.json").write_text(text)
    print(table(rows, sd15))


if __name__ == "__main__":
    main()
