"""What the memory savers cost here: gradient checkpointing in training, VAE slicing and tiling at generation.

    .venv/bin/python benchmarks/bench_memory_savers.py            # ToyWorld's base (SD geometry, 128 px)
    .venv/bin/python benchmarks/bench_memory_savers.py --base tiny-sdxl --steps 4

Each setting runs as its own `multiconcept` process beside a reference process without it, in the same
script on the same base: training (`learn -m lora`, batch 4, --steps) and generation (`generate`, -n 4,
25 steps). Printed per pair: wall seconds, the process's peak RSS (ru_maxrss: weights and activations on
CPU; a GPU's memory is not measured here) and the ratio to the reference. Process start-up and model loading
are inside the seconds, the same for both members of a pair.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

BIN = Path(sys.executable).parent / "multiconcept"


def measured(args: list[str], threads: int) -> dict:
    t0 = time.time()
    p = subprocess.Popen([str(BIN), *args], env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: multiconcept {' '.join(args)}\n{p.stderr.read().decode()[-2000:]}")
    return {"seconds": time.time() - t0, "peak_rss_mb": usage.ru_maxrss / 1024}


def scene(folder: Path, size: int) -> tuple[Path, Path]:
    a = np.full((size, size, 3), 200, np.uint8)
    a[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (200, 40, 40)
    m = np.zeros((size, size), np.uint8)
    m[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    Image.fromarray(a).save(folder / "img.png")
    Image.fromarray(m).save(folder / "mask.png")
    return folder / "img.png", folder / "mask.png"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="toyworld")
    ap.add_argument("--steps", type=int, default=20, help="training steps per run")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="savers-"))
    img, mask = scene(work, 128)
    learn = ["learn", "-m", "lora", "-c", "<a1>=square", "-i", str(img), "--mask", f"<a1>={mask}", "--base", a.base,
             "--steps", str(a.steps), "--batch-size", "4", "--no-progress"]
    gen = ["generate", "photo of a square", "--base", a.base, "-n", "4", "--steps", "25"]
    pairs = {
        "training: gradient checkpointing": (learn + ["-o", str(work / "ref.safetensors")],
                                             learn + ["-o", str(work / "gc.safetensors"),
                                                      "--param", "gradient_checkpointing=true"]),
        "generation: VAE slicing": (gen + ["-o", str(work / "g-ref")], gen + ["-o", str(work / "g-slice"), "--vae-slicing"]),
        "generation: VAE tiling": (gen + ["-o", str(work / "g-ref2")], gen + ["-o", str(work / "g-tile"), "--vae-tiling"]),
    }
    print(f"base {a.base}, {a.threads} threads, training {a.steps} steps at batch 4, generation 4 images x 25 steps\n")
    print("| setting | reference s | with s | time ratio | reference peak MB | with peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, (ref_args, with_args) in pairs.items():
        ref, got = measured(ref_args, a.threads), measured(with_args, a.threads)
        print(f"| {name} | {ref['seconds']:.1f} | {got['seconds']:.1f} | {got['seconds'] / ref['seconds']:.2f} | "
              f"{ref['peak_rss_mb']:.0f} | {got['peak_rss_mb']:.0f} | {got['peak_rss_mb'] / ref['peak_rss_mb']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
