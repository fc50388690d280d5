"""Metrics: CLIP-T, CLIP-I, DINO, leakage, Fréchet distance. Pure: images or embeddings in, numbers out.

- `clip`: any transformers CLIPModel (local folder or hub id; the ToyWorld
  evaluator by default) → CLIP-T and CLIP-I, raw cosine plus named scales.
- `dino`: any ViT/DINO checkpoint → CLS-feature image alignment.
- `leakage`: the other concept's signature in single-concept generations.
- `frechet`: the Fréchet (2-Wasserstein) distance between two feature sets.
Infusion's overfitting report, which generates images to score them, is a
workflow (workflows/overfitting.py).
"""

from __future__ import annotations

from .clip import (
    DISENDIFF_TEXT_PREFIX,
    SCALES,
    ClipScorer,
    check_scale,
    clip_text,
    load_clip,
    mean_pairwise_cosine,
    per_image_alignment,
    scaled,
    toyworld_evaluator_available,
)
from .dino import DinoScorer, load_dino
from .frechet import frechet_distance
from .leakage import Signature, toyworld_measures

__all__ = [
    "DISENDIFF_TEXT_PREFIX", "SCALES", "ClipScorer", "DinoScorer", "Signature", "check_scale", "clip_text", "frechet_distance",
    "load_clip", "load_dino", "mean_pairwise_cosine", "per_image_alignment", "scaled",
    "toyworld_evaluator_available", "toyworld_measures",
]

