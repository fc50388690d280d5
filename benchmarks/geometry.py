"""What the full-geometry scripts share (sdxl_full_geometry.py, flow_full_geometry.py): every fine-tuning method on a
real model's geometry with random weights, one training step and one generation step each, batch 1, on the CPU,
each method in its own process so its peak resident memory (VmHWM, reset between phases through
/proc/self/clear_refs) is its alone; an address-space limit turns an out-of-memory into a recorded error instead
of the kernel killing a process. Results go to OUT/results.json and a table on stdout.

A script gives a `Geometry`: how to build the pipeline (`build(small)`: the real configs, or the same structure
narrow and shallow to check the script in a minute), its name, each method's savers and generation settings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

METHODS = ("textual-inversion", "lora", "custom-diffusion", "disendiff", "infusion")
# the text encoders SDXL and SD3 share: CLIP ViT-L and OpenCLIP ViT-bigG, as their published configs
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu")


@dataclass
class Geometry:
    name: str  # the base's name in bundles
    build: Callable[[bool], object]  # small -> pipeline
    savers: dict[str, dict]  # method -> settings over its defaults
    sample: dict = field(default_factory=dict)  # SampleSettings fields for the generation step
    resolution: int = 1024  # the generation size (and training's, unless --train-resolution)


def clip_encoders(small: bool, small_width_2: int, first_projects: bool):
    """(tokenizer, tokenizer_2, CLIP-L, CLIP-bigG) at full size, or narrow and shallow (`small`; the second
    `small_width_2` wide). The tokenizers are the tiny test tokenizer, so the token tables are a few hundred rows
    instead of 49,408. `first_projects`: CLIP-L with its projection (SD3 pools both encoders; SDXL the second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from multiconcept.models.tiny import tiny_tokenizer

    tok, tok2 = tiny_tokenizer(), tiny_tokenizer()
    ids = dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    shallow = dict(num_hidden_layers=2, num_attention_heads=2)
    first = {**CLIP_L, **shallow, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32} if small else CLIP_L
    second = {**CLIP_BIGG, **shallow, "hidden_size": small_width_2, "intermediate_size": 2 * small_width_2,
              "projection_dim": small_width_2} if small else CLIP_BIGG
    te = (CLIPTextModelWithProjection if first_projects else CLIPTextModel)(CLIPTextConfig(**first, **ids))
    return tok, tok2, te, CLIPTextModelWithProjection(CLIPTextConfig(**second, **ids))


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


def one_method(geo: Geometry, method: str, small: bool, out: Path, train_resolution: int | None = None,
               extra: dict | None = None) -> dict:
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
    settings = {**geo.savers[method], **(extra or {})}
    row: dict = {"method": method, "settings": settings, "threads": torch.get_num_threads()}
    t = time.time()
    base = base_from_pipeline(geo.build(small), geo.name)
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
                     resolution=train_resolution or 0, **settings)
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
        row["attention_blocks"] = list(cfg.attention_blocks)
    del base, data
    import gc

    gc.collect()
    reset_peak()
    t = time.time()
    loaded = load_with_bundles(base_from_pipeline(geo.build(small), geo.name), [str(bundle)])
    row["generate_build_s"] = time.time() - t
    reset_peak()
    prompt = "photo of a cat" if method == "infusion" else "photo of a <a1> cat"
    t = time.time()
    generate(prompt, loaded, 1, 0, folder / "images", SampleSettings(steps=1, batch_size=1, **geo.sample))
    row["generate_one_step_s"] = time.time() - t
    row["generate_peak_mb"] = peak_mb()
    return row


def main(geo: Geometry, script: str, doc: str, default_out: str) -> None:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(default_out))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--small", action="store_true", help="the same structure, narrow and shallow (checks the script)")
    ap.add_argument("--limit-gb", type=float, default=21.0, help="address-space limit per method process")
    ap.add_argument("--train-resolution", default="",
                    help=f"METHOD=PX,...: train that method at PX (e.g. lora=768) to avoid an out-of-memory; "
                         f"generation stays at {geo.resolution}")
    ap.add_argument("--param", action="append", default=[],
                    help="KEY=VALUE over every method's settings, e.g. quantize_frozen=nf4 (typed as the setting's default)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    extra = {k: json.loads(v) if v[:1] in "0123456789-[{" or v in ("true", "false") else v
             for k, v in (p.split("=", 1) for p in args.param)}
    sizes = {k: int(v) for k, v in (x.split("=") for x in args.train_resolution.split(",") if x)}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        limit = int(args.limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        row = one_method(geo, args.one, args.small, args.out, sizes.get(args.one), extra)
        (args.out / f"{args.one}.json").write_text(json.dumps(row, indent=1))
        return
    rows = []
    for m in args.methods.split(","):
        cmd = [sys.executable, script, "--one", m, "--out", str(args.out), "--limit-gb", str(args.limit_gb),
               "--train-resolution", args.train_resolution, *[f"--param={p}" for p in args.param]]
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
        px = f", trained at {r['train_resolution']} px" if r.get("train_resolution", r["resolution"]) != r["resolution"] else ""
        print(f"| {r['method']} | {', '.join(f'{k}={v}' for k, v in r['settings'].items()) or 'none'}{px} "
              f"| {r['train_step_s']:.0f} s | {r['train_peak_mb'] / 1024:.1f} GB | {r['generate_one_step_s']:.0f} s "
              f"| {r['generate_peak_mb'] / 1024:.1f} GB | {r['bundle_tensor_bytes'] / 1e6:.2f} MB |")
