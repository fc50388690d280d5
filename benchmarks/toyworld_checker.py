"""Accuracy and speed of ToyWorld's analytic checker on real renders, per part.

    .venv/bin/python benchmarks/toyworld_checker.py [n_scenes]

Renders of the base's layouts and of the world pool (free placement, small subjects), overlapping same-kind
pairs that differ in every part, then the same renders blurred (Gaussian σ 0.9 and 1.2) with pixel noise
(std 8), a stand-in for what a small diffusion model's decoder produces. Visible parts only.
"""

import sys
import time

import numpy as np
from PIL import Image, ImageFilter

from multiconcept.toyworld import base_training_scene, world_scene
from multiconcept.workflows.toyworld_build.quality import overlap_pairs
from multiconcept.workflows.toyworld_build.world import WORLD


def scenes(sampler, n: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    rng = np.random.default_rng(seed)
    drawn = [sampler(rng) for _ in range(n)]
    return np.stack([s.image for s in drawn]), [s.to_dict() for s in drawn]


def degraded(images: np.ndarray, sigma: float, seed: int = 99) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for img in images:
        blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32)
        out.append(np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def line(name: str, accuracy: dict) -> str:
    return f"{name:<34}" + "  ".join(f"{part} {v:.3f}" for part, v in accuracy.items())


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    base, base_meta = scenes(base_training_scene, n, 3)
    pool, pool_meta = scenes(world_scene, n, 4)
    overlaps, overlap_meta = overlap_pairs(max(1, n // 3), 5)
    t = time.perf_counter()
    clean = WORLD.part_accuracy(base, base_meta)
    per_image = (time.perf_counter() - t) / n
    print(line("base layouts", clean) + f"  ({per_image * 1e3:.1f} ms/image)")
    print(line("world pool", WORLD.part_accuracy(pool, pool_meta)))
    print(line("overlapping same-kind pairs", WORLD.part_accuracy(overlaps, overlap_meta)))
    for sigma in (0.9, 1.2):
        print(line(f"world pool, blur {sigma} + noise 8", WORLD.part_accuracy(degraded(pool, sigma), pool_meta)))
