"""Every fine-tuning method on the full SDXL geometry, random weights: one training step and one
generation step each, at 1024 px, batch 1, on the CPU, with the memory savers.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sdxl_full_geometry.py --out models/bench/sdxl
    .venv/bin/python benchmarks/sdxl_full_geometry.py --small --out /tmp/sdxl-small   # the same path, in a minute

The pipeline is built from SDXL base 1.0's published configs (UNet 2.57 B parameters, CLIP ViT-L and
OpenCLIP ViT-bigG text encoders, its VAE), written below; no download. The tokenizers are the tiny
test tokenizer, so the two token-embedding tables are a few hundred rows instead of 49,408 (about 0.1 B
parameters fewer; every other weight is SDXL's). Weights are fp32: this CPU has no bf16 matrix unit
(a 2048² bf16 matmul runs ~300x slower than fp32 here), so bf16 frozen weights are for GPUs.

Each method runs in its own process, so each peak resident memory (VmHWM, reset between phases
through /proc/self/clear_refs) is that method's alone; an address-space limit turns an out-of-memory
into a recorded error instead of the kernel killing a process. Results go to OUT/results.json and a
table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("textual-inversion", "lora", "custom-diffusion", "disendiff", "infusion")
# gradient checkpointing where the method allows it; DisenDiff and Infusion read attention maps or
# place residuals in the forward pass, which the recomputation would repeat (docs/sdxl.md)
SAVERS = {"textual-inversion": {"gradient_checkpointing": True},
          "lora": {"gradient_checkpointing": True, "train_text_encoder": True, "optimizer": "adamw8bit"},
          "custom-diffusion": {"gradient_checkpointing": True, "optimizer": "adamw8bit"},
          "disendiff": {"optimizer": "adamw8bit"},
          "infusion": {}}

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu")
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True)
# the same structure, narrow and shallow, at 256 px: checks the script end to end in a minute
SMALL_UNET = {**SDXL_UNET, "sample_size": 32, "block_out_channels": (32, 64, 128), "transformer_layers_per_block": (1, 1, 2),
              "attention_head_dim": (2, 4, 8), "cross_attention_dim": 96, "addition_time_embed_dim": 8,
              "projection_class_embeddings_input_dim": 6 * 8 + 64, "norm_num_groups": 8}
SMALL_L = {**CLIP_L, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "projection_dim": 32}
SMALL_G = {**CLIP_BIGG, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
           "projection_dim": 64}
SMALL_VAE = {**SDXL_VAE, "sample_size": 256, "block_out_channels": (16, 32, 32, 32), "norm_num_groups": 8}


def build_pipeline(small: bool):
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from multiconcept.models.tiny import tiny_tokenizer

    torch.manual_seed(0)
    tok, tok2 = tiny_tokenizer(), tiny_tokenizer()
    ids = dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    te = CLIPTextModel(CLIPTextConfig(**(SMALL_L if small else CLIP_L), **ids))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**(SMALL_G if small else CLIP_BIGG), **ids))
    unet = UNet2DConditionModel(**(SMALL_UNET if small else SDXL_UNET))
    vae = AutoencoderKL(**(SMALL_VAE if small else SDXL_VAE))
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=sched)


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS


def write_scene(folder: Path, size: int) -> dict:
    import numpy as np
    from PIL import Image

    img = np.full((size, size, 3), 128, np.uint8)
    a, b = slice(size // 8, size // 2), slice(size // 2 + size // 16, size - size // 16)
    img[a, a] = (230, 60, 30)
    img[b, b] = (40, 60, 220)
    Image.fromarray(img).save(folder / "scene.png")
    for name, sl in (("m1", a), ("m2", b)):
        m = np.zeros((size, size), np.uint8)
        m[sl, sl] = 255
        Image.fromarray(m).save(folder / f"{name}.png")
    return {"image": str(folder / "scene.png"), "m1": str(folder / "m1.png"), "m2": str(folder / "m2.png")}


def one_method(method: str, small: bool, out: Path, train_resolution: int | None = None) -> dict:
    import torch

    from multiconcept.bundle import describe
    from multiconcept.data import build_concept_set
    from multiconcept.methods import get_method
    from multiconcept.methods.finetune import train
    from multiconcept.models import base_from_pipeline
    from multiconcept.prompts import Concept
    from multiconcept.workflows.generate import SampleSettings, generate, load_with_bundles

    folder = out / method
    folder.mkdir(parents=True, exist_ok=True)
    row: dict = {"method": method, "settings": SAVERS[method], "threads": torch.get_num_threads()}
    t = time.time()
    base = base_from_pipeline(build_pipeline(small), "sdxl-geometry-random")
    row["build_s"] = time.time() - t
    row["parameters"] = {k: sum(p.numel() for p in m.parameters()) for k, m in base.parts.items()}
    row["parameters"]["vae"] = sum(p.numel() for p in base.vae.parameters())
    row["resolution"] = base.resolution
    row["train_resolution"] = train_resolution or base.resolution
    row["peak_after_build_mb"] = peak_mb()
    scene = write_scene(folder, base.resolution)
    two = method == "disendiff"
    concepts = [Concept("<a1>", "cat")] + ([Concept("<b1>", "dog")] if two else [])
    masks = [f"<a1>={scene['m1']}"] + ([f"<b1>={scene['m2']}"] if two else [])
    data = build_concept_set(concepts, [scene["image"]], masks)
    cls = get_method(method)
    # train_resolution: the setting that avoids an out-of-memory, fewer latent tokens in training only
    cfg = cls.Config(steps=1, batch_size=1, grad_accum=1, scale_lr=False, checkpoint_every=0, augment=False,
                     resolution=train_resolution or 0, **SAVERS[method])
    times: list[float] = []
    reset_peak()
    t = time.time()
    try:
        bundle = train(cls, base, data, cfg, folder / f"{method}.safetensors", progress=False,
                       on_step=lambda p: times.append(p.seconds))
    except (RuntimeError, MemoryError) as e:  # an allocation over the limit: a fact about the geometry
        row["train_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        row["train_peak_mb"] = peak_mb()
        return row
    row["train_call_s"] = time.time() - t
    row["train_step_s"] = times[0] if times else None
    row["train_peak_mb"] = peak_mb()
    d = describe(bundle)
    row["bundle_tensor_bytes"], row["bundle_file_bytes"] = d["tensor_bytes"], d["file_bytes"]
    if method == "disendiff":
        row["attention_resolution"] = cfg.attention_resolution
    del base, data
    import gc

    gc.collect()
    reset_peak()
    t = time.time()
    loaded = load_with_bundles(base_from_pipeline(build_pipeline(small), "sdxl-geometry-random"), [str(bundle)])
    row["generate_build_s"] = time.time() - t
    reset_peak()
    prompt = "photo of a cat" if method == "infusion" else "photo of a <a1> cat"
    t = time.time()
    generate(prompt, loaded, 1, 0, folder / "images", SampleSettings(steps=1, batch_size=1, vae_slicing=True, vae_tiling=True))
    row["generate_one_step_s"] = time.time() - t
    row["generate_peak_mb"] = peak_mb()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("models/bench/sdxl"))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--small", action="store_true", help="narrow, shallow SDXL structure at 256 px (checks the script)")
    ap.add_argument("--limit-gb", type=float, default=21.0, help="address-space limit per method process")
    ap.add_argument("--train-resolution", default="",
                    help="METHOD=PX,...: train that method at PX (e.g. lora=768) to avoid an out-of-memory; "
                    "generation stays at 1024")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = {k: int(v) for k, v in (x.split("=") for x in args.train_resolution.split(",") if x)}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        limit = int(args.limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        row = one_method(args.one, args.small, args.out, sizes.get(args.one))
        (args.out / f"{args.one}.json").write_text(json.dumps(row, indent=1))
        return
    rows = []
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", m, "--out", str(args.out), "--limit-gb", str(args.limit_gb),
               "--train-resolution", args.train_resolution]
        t = time.time()
        proc = subprocess.run(cmd + (["--small"] if args.small else []), capture_output=True, text=True, env=os.environ)
        result = args.out / f"{m}.json"
        if proc.returncode == 0 and result.is_file():
            row = json.loads(result.read_text())
        else:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            row = {"method": m, "process_error": f"exit {proc.returncode}: {tail[:300]}"}
        row["process_s"] = time.time() - t
        rows.append(row)
        print(json.dumps(row), flush=True)
    # a rerun of some methods keeps the others' rows
    kept = [r for r in (json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").is_file() else [])
            if r["method"] not in {x["method"] for x in rows}]
    rows = kept + rows
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n| method | settings | train step | train peak | generate 1 step | generate peak | bundle |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "process_error" in r or "train_error" in r:
            print(f"| {r['method']} | {r.get('settings', '')} | {r.get('train_error') or r.get('process_error')} "
                  f"| {r.get('train_peak_mb', float('nan')) / 1024:.1f} GB | | | |")
            continue
        px = f", trained at {r['train_resolution']} px" if r.get("train_resolution", 1024) != 1024 else ""
        print(f"| {r['method']} | {', '.join(f'{k}={v}' for k, v in r['settings'].items()) or 'none'}{px} "
              f"| {r['train_step_s']:.0f} s | {r['train_peak_mb'] / 1024:.1f} GB | {r['generate_one_step_s']:.0f} s "
              f"| {r['generate_peak_mb'] / 1024:.1f} GB | {r['bundle_tensor_bytes'] / 1e6:.2f} MB |")


if __name__ == "__main__":
    main()
