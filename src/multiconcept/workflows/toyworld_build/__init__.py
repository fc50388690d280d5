"""Build ToyWorld's models from nothing.

    multiconcept toyworld build --out OUT --work WORK [--steps 12000] [--seed 0]
    multiconcept toyworld build --out /tmp/tw --work /tmp/tw-work --smoke   # every stage, ~2 min

Stages, each resumable (re-run the same command; a killed run continues from
its last checkpoint; every stage trains in the one training loop):
  1. tokenizer  byte-level BPE in CLIP format on the world's captions + common English
  2. vae        AutoencoderKL, 4x down (16x16x4 latents), trained on every appearance,
                personal concepts included; latents are then normalised per channel
                inside the VAE's 1x1 quant convs, so scaling_factor is 1
  3. evaluator  two small transformers CLIPModels trained contrastively on renders + captions by one
                recipe: the evaluator (CLIP-I/T, no method uses it) and the encoder (the base's text
                tower and the tuning-free methods' image encoder start from it)
  4. pool       base-training scenes (no personal concepts) encoded once to latents
  5. unet       CLIPTextModel (from the encoder's text tower) + UNet2DConditionModel
                trained jointly, v-prediction on zero-terminal-SNR betas
  6. ship       OUT/base (StableDiffusionPipeline, fp16), OUT/evaluator and OUT/encoder (CLIPModel +
                processor), OUT/quality.json, OUT/samples.png, OUT/contact_sheet.png
"""

from __future__ import annotations

import os

# Shared CPUs: OpenMP's default spin-waiting burned 3x the CPU time of useful
# work when other processes competed for the 2 cores (VAE step 23.7 s vs 7.2 s
# wall, measured under load 6). Only effective before torch loads its runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .common import Log, write_json
from .evaluator import train_clips
from .quality import quality_report
from .settings import BuildConfig, check_state
from .ship import ship
from .tokenizer import train_tokenizer
from .unet import train_unet
from .vae import WORLD_POOL_CACHE, vae_stage


def build(out_dir: str | Path, work_dir: str | Path, seed: int = 0, steps: int | None = None,
          resume: bool = True, progress: bool = True, config: BuildConfig | None = None) -> dict:
    """Build (or resume building) ToyWorld into out_dir; returns the quality report.

    steps: UNet + text-encoder training steps (default config.unet_steps = 12000).
    config: every other knob; BuildConfig.smoke() runs all stages in ~2 minutes.
    """
    from transformers import CLIPTokenizer

    cfg = replace(config or BuildConfig(), seed=seed)
    if steps is not None:
        cfg = replace(cfg, unet_steps=steps)
    out, work = Path(out_dir), Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    # Without this, weights and activations drifting into denormal floats made
    # CPU steps 4-8x slower (measured on the VAE: 0.9 s -> 3.5-6 s per step).
    torch.set_flush_denormal(True)
    log = Log(work / "build.log", progress)
    check_state(work, cfg, resume)
    log(f"build: out={out} work={work} config={asdict(cfg)}")
    timings, t = {}, time.time()

    tok_dir = work / "tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir) if (tok_dir / "tokenizer_config.json").exists() \
        else train_tokenizer(cfg, tok_dir, log)
    timings["tokenizer"], t = time.time() - t, time.time()
    vae = vae_stage(cfg, work, log)
    timings["vae"], t = time.time() - t, time.time()
    evaluator = train_clips(cfg, work, tokenizer, log)["evaluator"]
    timings["evaluator"], t = time.time() - t, time.time()
    WORLD_POOL_CACHE.clear()
    trained, train_info = train_unet(cfg, work, tokenizer, vae, log)
    timings["unet"], t = time.time() - t, time.time()
    choice, ship_scores = ship(cfg, out, work, tokenizer, vae, trained, log)
    report = quality_report(cfg, out, evaluator, tokenizer, log)
    timings["ship_and_evaluate"] = time.time() - t
    size_mb = sum(f.stat().st_size for f in (out / "base").rglob("*.safetensors")) / 2**20
    report |= {"shipped_weights": choice, "raw_vs_ema_quick_scores": ship_scores,
               "base_weights_mb": round(size_mb, 2), "unet_training": train_info,
               "vae": json.loads((work / "vae" / "metrics.json").read_text()),
               "stage_seconds_this_run": {k: round(v, 1) for k, v in timings.items()},
               "config": asdict(cfg)}
    write_json(out / "quality.json", report)
    log(f"build: done -> {out}; single-object class {report['single_object']['class_present']:.2f} "
        f"colour {report['single_object']['colour_present']:.2f}; evaluator retrieval "
        f"{report['evaluator']['top1_caption_retrieval_full']:.2f}; base weights {size_mb:.1f} MB")
    return report
