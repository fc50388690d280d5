"""Per-token attention heatmaps as PNGs: each map min-max normalised, coloured
with viridis, optionally laid over the generated image."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .attention import minmax_normalize
from .bundle import atomic_write

# Anchors of matplotlib's viridis; np.interp between them is close enough
# for a heatmap and needs no matplotlib.
_VIRIDIS = np.array(
    [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
     [31, 158, 137], [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37]],
    dtype=np.float64,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] ``h w`` → RGB uint8 ``h w 3`` (viridis)."""
    v = np.clip(values, 0.0, 1.0)
    grid = np.linspace(0.0, 1.0, len(_VIRIDIS))
    rgb = np.stack([np.interp(v, grid, _VIRIDIS[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def _safe_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_.") or "token"


def heatmap_images(maps: torch.Tensor, image=None, size: int = 256, alpha: float = 0.5) -> list[Image.Image]:
    """One RGB image per token map ``token h w``: min–max normalised, upsampled
    bilinearly to the image size (or to `size` on the short side without an
    image), coloured with viridis and, given `image` (PIL image or ``H W 3``
    uint8 array), blended over it with weight `alpha`."""
    if maps.ndim != 3:
        raise ValueError(f"heatmaps want maps (token, h, w), got {tuple(maps.shape)}.")
    base = None
    if image is not None:
        base = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        if base.dtype != np.uint8:
            base = (np.clip(base, 0, 1) * 255).round().astype(np.uint8)
        if base.ndim == 2:
            base = np.repeat(base[..., None], 3, axis=-1)
        H, W = base.shape[:2]
    else:
        h, w = maps.shape[-2:]
        H, W = (size, round(size * w / h)) if h <= w else (round(size * h / w), size)

    m = minmax_normalize(maps.detach().float().cpu())
    m = F.interpolate(m[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    images = []
    for heat in m.numpy():
        rgb = colormap(heat)
        if base is not None:
            rgb = ((1 - alpha) * base + alpha * rgb).round().astype(np.uint8)
        images.append(Image.fromarray(rgb))
    return images


def save_heatmaps(
    maps: torch.Tensor,
    labels: Sequence[str],
    out_dir: str | Path,
    image=None,
    prefix: str = "",
    size: int = 256,
    alpha: float = 0.5,
) -> list[Path]:
    """Write `heatmap_images` as one PNG per token map ``token h w``; return the paths.

    Files are ``{prefix}{i:02d}_{label}.png``, written to a temp file in
    `out_dir` then renamed.
    """
    if len(labels) != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but {len(labels)} labels.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (label, img) in enumerate(zip(labels, heatmap_images(maps, image, size, alpha))):
        path = out / f"{prefix}{i:02d}_{_safe_label(label)}.png"
        atomic_write(path, lambda tmp, img=img: img.save(tmp, format="PNG"))
        paths.append(path)
    return paths
