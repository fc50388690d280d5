"""Accuracy and speed of the ToyWorld analytic checker on real renders.

    .venv/bin/python benchmarks/toyworld_checker.py [n_scenes]

Clean renders, then renders blurred (Gaussian σ 0.8) with pixel noise (σ 8),
a stand-in for what a small diffusion model's decoder produces.
"""

import sys
import time

import numpy as np
from PIL import Image, ImageFilter

from multiconcept.toyworld.check import analyse, checker_accuracy
from multiconcept.toyworld.scenes import base_training_scene


def degraded_accuracy(n_scenes: int, seed: int = 99) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    total = colour_ok = shape_ok = 0
    for _ in range(n_scenes):
        scene = base_training_scene(rng)
        blurred = np.asarray(Image.fromarray(scene.image).filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32)
        noisy = np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).astype(np.uint8)
        found = analyse(noisy).objects
        for o in scene.objects:
            total += 1
            overlaps = [(d.mask & o.mask).sum() for d in found]
            if overlaps and max(overlaps) > 0:
                d = found[int(np.argmax(overlaps))]
                colour_ok += d.colour == o.colour
                shape_ok += d.noun == o.noun
    return {"colour": colour_ok / total, "shape": shape_ok / total, "objects": total}


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    t = time.perf_counter()
    clean = checker_accuracy(n)
    per_image = (time.perf_counter() - t) / n
    print(f"clean renders   : colour {clean['colour']:.3f}  shape {clean['shape']:.3f}  "
          f"background {clean['background']:.3f}  ({clean['objects']} objects, {per_image * 1e3:.1f} ms/image incl. render)")
    noisy = degraded_accuracy(n)
    print(f"blurred + noise : colour {noisy['colour']:.3f}  shape {noisy['shape']:.3f}  ({noisy['objects']} objects)")
