"""The Fréchet (2-Wasserstein) distance between two feature sets: FID's formula."""

from __future__ import annotations

import torch

from ..errors import require


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Squared 2-Wasserstein distance between Gaussians fitted to feature sets (N, D), (M, D):

        ‖μa − μb‖² + Tr Σa + Tr Σb − 2 Tr (Σa^½ Σb Σa^½)^½

    (FID's formula; the matrix square roots from symmetric eigendecompositions,
    float64, so no scipy). Each set needs at least 2 rows.
    """
    require(a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[1],
            f"Fréchet distance needs two (N, D) feature sets of equal D, got {tuple(a.shape)} and {tuple(b.shape)}")
    require(len(a) >= 2 and len(b) >= 2, "Fréchet distance needs at least 2 feature vectors per set")
    a, b = a.double(), b.double()
    mu = a.mean(0) - b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(ca)
    sqrt_ca = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(sqrt_ca @ cb @ sqrt_ca)
    return float(mu @ mu + ca.trace() + cb.trace() - 2 * cross.clamp_min(0).sqrt().sum())
