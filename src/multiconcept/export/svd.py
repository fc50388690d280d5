"""A weight delta as a LoRA: truncated SVD (Eckart–Young: the best rank-r approximation in Frobenius norm).

ΔW [out, in] = U S Vᵀ; keeping the r largest singular values, lora_up = U_r S_r^½ and
lora_down = S_r^½ V_rᵀ (the scale split evenly, so neither factor is tiny), at scale 1.
The relative error ‖ΔW − up·down‖_F / ‖ΔW‖_F is √(Σ_{i>r} s_i²) / √(Σ s_i²), read off the singular
values; at r = rank(ΔW) the factorisation is exact up to float error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import require


@dataclass
class LayerError:
    name: str
    rank: int  # the rank kept (at most min(out, in))
    full_rank: int  # min(out, in)
    relative_error: float  # ‖ΔW − up·down‖_F / ‖ΔW‖_F
    norm: float  # ‖ΔW‖_F


@dataclass
class Factorisation:
    """{name: (up [out, r], down [r, in])} and the error per layer and in total."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    layers: list[LayerError] = field(default_factory=list)

    @property
    def relative_error(self) -> float:
        """‖ΔW − LoRA‖_F / ‖ΔW‖_F over every layer's entries together."""
        total = sum(e.norm ** 2 for e in self.layers)
        lost = sum((e.relative_error * e.norm) ** 2 for e in self.layers)
        return math.sqrt(lost / total) if total > 0 else 0.0

    @property
    def worst(self) -> LayerError:
        return max(self.layers, key=lambda e: e.relative_error)


def factorise(deltas: dict[str, torch.Tensor], rank: int | None) -> Factorisation:
    """Each 2-D delta as rank-`rank` LoRA factors (None: full rank, exact). An all-zero delta
    (a layer training never moved) gets no factors."""
    require(rank is None or rank >= 1, f"rank must be at least 1 (or full), got {rank}")
    out = Factorisation()
    for name, d in deltas.items():
        w = d.detach().to(torch.float64).cpu()
        full = min(w.shape)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = full if rank is None else min(rank, full)
        energy = s.pow(2)
        norm = float(energy.sum().sqrt())
        if norm == 0.0:
            out.layers.append(LayerError(name, 0, full, 0.0, 0.0))
            continue
        root = s[:r].sqrt()
        up = (u[:, :r] * root).to(d.dtype).contiguous()
        down = (root[:, None] * vh[:r]).to(d.dtype).contiguous()
        out.factors[name] = (up, down)
        out.layers.append(LayerError(name, r, full, float(energy[r:].sum().sqrt()) / norm, norm))
    return out
