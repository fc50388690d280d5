"""The Subject-Diffusion UNet: the base UNet rebuilt with one more input channel
(location control) and diffusers' GLIGEN gated self-attention in every
transformer block (dense image control), its pretrained weights copied.

- conv_in gains an input channel for the location map; its weights there start
  at zero, so the map changes nothing until training moves them (§3.1).
- each block's `fuser` (diffusers' `GatedSelfAttentionDense`, built when a UNet
  has attention_type="gated") computes, between self- and cross-attention,
      x += tanh(γ_attn) · SelfAttn(LN([x ; W h_e]))[:N]
      x += tanh(γ_ff)  · FF(LN(x))
  with γ initialised to 0 by diffusers, so at step 0 the UNet's output is the
  base UNet's exactly (tests/test_subject_diffusion.py checks it).

Location maps are drawn on the canvas at image size and pooled to the latent."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import require


def subject_unet(unet, location_map: bool = True, adapter: bool = True):
    """A new UNet2DConditionModel like `unet` plus the parts asked for, `unet`'s weights
    copied in; the new parts at their zero start. Same device and dtype."""
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    require(config.get("attention_type", "default") == "default",
            f"the base UNet already has attention_type={config['attention_type']!r}: give a plain Stable Diffusion base")
    if location_map:
        config["in_channels"] = unet.config.in_channels + 1
    if adapter:
        config["attention_type"] = "gated"
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    new = UNet2DConditionModel.from_config(config)
    state = dict(unet.state_dict())
    if location_map:
        w = state["conv_in.weight"]
        grown = torch.zeros(w.shape[0], w.shape[1] + 1, *w.shape[2:], dtype=w.dtype, device=w.device)
        grown[:, : w.shape[1]] = w
        state["conv_in.weight"] = grown
    missing, unexpected = new.load_state_dict(state, strict=False)
    stray = [k for k in missing if ".fuser." not in k and not k.startswith("position_net.")]
    odd = stray + list(unexpected)
    require(not odd, f"the base UNet's weights do not fit its gated copy ({odd[0] if odd else ''}): "
                     "not a Stable Diffusion UNet")
    if adapter:
        new.position_net = None  # the caller puts its object-token network here
    new = new.to(unet.device)
    return (new if new.dtype == unet.dtype else new.to(unet.dtype)).eval()


def adapter_gates(unet) -> torch.Tensor:
    """Every fuser's (γ_attn, γ_ff), ``blocks 2``: how far dense image control has opened."""
    gates = [torch.stack([m.alpha_attn, m.alpha_dense]) for name, m in unet.named_modules() if name.endswith(".fuser")]
    return torch.stack(gates).detach() if gates else torch.zeros(0, 2)


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a non-empty bool mask, x1/y1 exclusive."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def place_mask(mask: np.ndarray | None, box: tuple[float, float, float, float], size) -> np.ndarray:
    """A subject's mask (bool, its own image) cut to its extent and stretched into `box`
    (fractions of the canvas; `size` is H or (H, W)) → bool ``H W``; None mask: the whole box."""
    h, w = (size, size) if isinstance(size, int) else size
    canvas = np.zeros((h, w), dtype=bool)
    x0, x1 = (int(round(v * w)) for v in (box[0], box[2]))
    y0, y1 = (int(round(v * h)) for v in (box[1], box[3]))
    x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
    x1, y1 = max(min(x1, w), x0 + 1), max(min(y1, h), y0 + 1)
    if mask is None:
        canvas[y0:y1, x0:x1] = True
        return canvas
    a0, b0, a1, b1 = box_of(mask)
    cut = torch.from_numpy(mask[b0:b1, a0:a1].astype(np.float32))[None, None]
    canvas[y0:y1, x0:x1] = F.interpolate(cut, size=(y1 - y0, x1 - x0), mode="nearest")[0, 0].numpy() > 0.5
    return canvas


def location_map(masks: list[np.ndarray], size) -> torch.Tensor:
    """Union of subject masks on the canvas (bool ``H W`` each; `size` H or (H, W)) → ``1 H W`` float."""
    h, w = (size, size) if isinstance(size, int) else size
    out = np.zeros((h, w), dtype=bool)
    for m in masks:
        out |= m
    return torch.from_numpy(out.astype(np.float32))[None]


def latent_map(maps: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Canvas maps ``b 1 H W`` pooled to the latent grid (the share of each latent pixel covered)."""
    return F.interpolate(maps.float(), size=latent_hw, mode="area")
