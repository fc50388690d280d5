"""Subject crops: the subject on seeded noise, and the training augmentations."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import require
from .config import FastComposerConfig


def subject_crop(image, mask=None, box=None, size: int = 224, rng: np.random.Generator | None = None) -> torch.Tensor:
    """The paper's subject crop: cut to the box, pixels outside the segment
    replaced by uniform random noise, padded square (with noise too: nothing
    but the subject carries signal), resized to `size`. → ``3 size size`` in [0, 1].

    image: PIL image or uint8 ``H W 3``; mask: bool ``H W`` (None = keep every
    pixel); box: (x0, y0, x1, y1), x1/y1 exclusive (None = the mask's extent,
    or the whole image)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    img = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    require(img.ndim == 3 and img.shape[2] == 3, f"a subject image must be RGB, got shape {img.shape}")
    H, W = img.shape[:2]
    if mask is not None:
        mask = np.asarray(mask).astype(bool)
        require(mask.shape == (H, W), f"a subject mask is {mask.shape[1]}x{mask.shape[0]} but its image is {W}x{H}: "
                                      "make them the same size")
        require(bool(mask.any()), "a subject mask is empty: paint the subject white on black")
    if box is None:
        if mask is None:
            box = (0, 0, W, H)
        else:
            ys, xs = np.nonzero(mask)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    x0, y0, x1, y1 = (int(v) for v in box)
    require(0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H, f"subject box {tuple(box)} is outside the {W}x{H} image")
    crop = img[y0:y1, x0:x1]
    if mask is not None:
        noise = rng.integers(0, 256, crop.shape, dtype=np.uint8)
        crop = np.where(mask[y0:y1, x0:x1, None], crop, noise)
    h, w = crop.shape[:2]
    side = max(h, w)
    square = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = crop
    x = torch.from_numpy(square).permute(2, 0, 1).float()[None] / 255.0
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)
    return x[0].clamp(0, 1)


def augment_crop(x: torch.Tensor, rng: np.random.Generator, cfg: FastComposerConfig) -> torch.Tensor:
    """The paper's subject-crop augmentations on one ``3 S S`` crop in [0, 1],
    drawn from `rng` (seeded per sample, so a resumed run sees the same crops):
    one affine warp (zoom, rotation, flip; uncovered corners filled with
    uniform noise like the crop's own background), brightness/contrast/
    saturation jitter, blur and grayscale. Without torchvision: grid_sample
    and a separable Gaussian conv."""
    if not cfg.augment:
        return x
    size = x.shape[-1]
    scale = 1.0 + rng.uniform(-cfg.aug_zoom, cfg.aug_zoom)
    angle = np.deg2rad(rng.uniform(-cfg.aug_rotation, cfg.aug_rotation))
    flip = -1.0 if rng.random() < cfg.aug_flip_p else 1.0
    if scale != 1.0 or angle != 0.0 or flip < 0:
        c, s_ = np.cos(angle) / scale, np.sin(angle) / scale
        theta = torch.tensor([[c * flip, -s_, 0.0], [s_ * flip, c, 0.0]], dtype=x.dtype)[None]
        grid = F.affine_grid(theta, (1, 3, size, size), align_corners=False)
        warped = F.grid_sample(torch.cat([x, torch.ones_like(x[:1])])[None], grid, mode="bilinear",
                               padding_mode="zeros", align_corners=False)[0]
        noise = torch.from_numpy(rng.random((3, size, size), dtype=np.float32)).to(x.dtype)
        x = warped[:3] + (1 - warped[3:]) * noise
    if cfg.aug_jitter > 0:
        b, c, s_ = (1.0 + rng.uniform(-cfg.aug_jitter, cfg.aug_jitter) for _ in range(3))
        x = x * b
        x = (x - x.mean()) * c + x.mean()
        grey = _luma(x)
        x = (x - grey) * s_ + grey
    if rng.random() < cfg.aug_blur_p:
        sigma = rng.uniform(0.1, 2.0) * size / 224
        r = max(1, int(np.ceil(3 * sigma)))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
        k = (k / k.sum()).expand(3, 1, 1, -1)
        x = F.conv2d(F.pad(x[None], (r, r, 0, 0), mode="reflect"), k, groups=3)
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.transpose(2, 3), groups=3)[0]
    if rng.random() < cfg.aug_grayscale_p:
        x = _luma(x).expand(3, -1, -1)
    return x.clamp(0, 1).contiguous()


def _luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of a ``3 H W`` image, ``1 H W``."""
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
