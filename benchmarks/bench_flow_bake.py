"""How closely a checkpoint baked from a single-file flow base draws what its bundle draws (docs/single-file.md).

The tiny FLUX.1, SD3.5-shaped and FLUX.2 [klein] pipelines written as single files (as tests/test_flow_single_file.py
writes them), a bundle learned on each through the command line (Custom Diffusion on FLUX.1, LoRA with both CLIPs'
LoRA on SD3, LoRA on klein; 2 steps, lr 0.05), baked; then `generate`'s images of the bundle on the file and of the
baked file with its embedding files, 4 seeds, 10 flow-Euler steps, 32 px, in levels of 0-255:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_flow_bake.py --out benchmarks/results/flow_bake.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import save_file

from multiconcept.cli import main
from multiconcept.export.original_layout import original_tensors
from multiconcept.models import SingleFile
from multiconcept.models.tiny_flow import tiny_flux2_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline
from multiconcept.workflows.external import add_embedding
from multiconcept.workflows.generate import SampleSettings, generate, load_with_bundles

PROMPT = "photo of a <a1> cat and <b1> dog"
SEEDS, STEPS = (0, 1, 2, 3), 10
BASES = {"flux1": (tiny_flux_pipeline, "custom-diffusion", []),
         "sd3": (lambda: tiny_sd3_pipeline(clip_widths=(12, 20), unprojected_clip_l=True), "lora",
                 ["-p", "train_text_encoder=true"]),
         "flux2": (tiny_flux2_pipeline, "lora", [])}


def images(root: Path, base, bundles=(), embeddings=()) -> np.ndarray:
    loaded = load_with_bundles(base, [str(b) for b in bundles])
    for e in embeddings:
        add_embedding(loaded, str(e))
    paths = generate(PROMPT, loaded, len(SEEDS), SEEDS[0], root, SampleSettings(steps=STEPS, height=32, width=32))
    return np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in paths])


def measure(root: Path, arch: str) -> dict:
    build, method, extra = BASES[arch]
    pipe = build()
    pipe.save_pretrained(root / "folder")
    save_file(original_tensors(pipe, arch), str(root / "base.safetensors"))
    a = np.full((32, 32, 3), 128, np.uint8)
    a[4:14, 4:14], a[18:30, 18:30] = (230, 30, 30), (30, 30, 230)
    Image.fromarray(a).save(root / "scene.png")
    for name, (lo, hi) in (("m1", (4, 14)), ("m2", (18, 30))):
        m = np.zeros((32, 32), np.uint8)
        m[lo:hi, lo:hi] = 255
        Image.fromarray(m).save(root / f"{name}.png")
    base = ["--base", str(root / "base.safetensors"), "--base-config", str(root / "folder")]
    main(["learn", "-m", method, "-c", "<a1>=cat", "-c", "<b1>=dog", "-i", str(root / "scene.png"), "--mask",
          f"<a1>={root / 'm1.png'}", "--mask", f"<b1>={root / 'm2.png'}", "-o", str(root / "bundle.safetensors"),
          "--steps", "2", "--grad-accum", "1", "--lr", "0.05", "-p", "resolution=32", "--no-progress", *base, *extra])
    main(["bake", str(root / "bundle.safetensors"), "-o", str(root / "baked" / "pets.safetensors"), *base])
    on_file = SingleFile(root / "base.safetensors", str(root / "folder"))
    embeddings = sorted((root / "baked" / "embeddings").glob("*.safetensors"))
    bundle = images(root / "bundle", on_file, [root / "bundle.safetensors"])
    baked = images(root / "baked-images", SingleFile(root / "baked" / "pets.safetensors", str(root / "folder")),
                   embeddings=embeddings)
    plain = images(root / "plain", on_file, embeddings=embeddings)
    diff = np.abs(baked - bundle)
    return {"method": method, "max": int(diff.max()), "mean": float(diff.mean()),
            "pixels_off": int((diff.max(-1) > 0).sum()), "pixels": int(np.prod(diff.shape[:-1])),
            "bundle_vs_plain_base_max": int(np.abs(plain - bundle).max())}


def run(out: Path) -> dict:
    results = {"seeds": list(SEEDS), "steps": STEPS, "size": 32}
    for arch in BASES:
        with tempfile.TemporaryDirectory() as tmp:
            results[arch] = measure(Path(tmp), arch)
            print(arch, results[arch], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/flow_bake.json"))
    run(parser.parse_args().out)
