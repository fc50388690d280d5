"""Latents from the VAE: the posterior's sample or its mean, chosen by measurement.

Used by every loop that trains on images (fine-tuning methods, tuning-free
encoders).
"""

from __future__ import annotations

import torch

from .errors import UserError

POSTERIOR_STD_LIMIT = 0.5  # see choose_latent_mode


def choose_latent_mode(mode: str, vae, pixels: torch.Tensor | None) -> str:
    """``sample`` (diffusers' and kohya's scripts) or ``mean`` of the VAE posterior.

    ``auto`` measures the posterior on ``pixels`` (one training image): when a
    latent channel's posterior std exceeds POSTERIOR_STD_LIMIT, in the scaled
    latents the UNet sees (whose spread is about 1), a sample is mostly noise
    in that channel, so the posterior mean is used. SD's VAE gives stds of a
    few hundredths; ToyWorld's has one channel that collapsed to the prior
    (std ~4.7), and its base was trained on posterior means for that reason:
    sampling held the fine-tuning loss near 5 instead of 0.3."""
    if mode in ("sample", "mean"):
        return mode
    if mode != "auto":
        raise UserError(f"latents must be auto, sample or mean, got {mode!r}: fix --param latents")
    if pixels is None:
        return "sample"
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        std = dist.std.float().mean((0, 2, 3)) * latent_scale(vae)
    return "mean" if std.max().item() > POSTERIOR_STD_LIMIT else "sample"


def latents_from_moments(vae, moments: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Scaled latents from the VAE's posterior moments (``batch 2C h w``: mean, log-variance)."""
    mean, logvar = moments.float().chunk(2, dim=1)
    z = mean
    if mode == "sample":
        z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape, generator=gen).to(mean.device)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * latent_scale(vae)


def latent_scale(vae) -> float:
    """The VAE's latent scaling factor; 1 for a VAE without one (FLUX.2's, normalised by batch-norm statistics
    after patching instead: models/flow.py)."""
    return getattr(vae.config, "scaling_factor", None) or 1.0
