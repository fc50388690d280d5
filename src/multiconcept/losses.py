"""Losses: the diffusion loss (optionally masked) and attention-map losses.

Pure functions on tensors. Attention maps come from
`AttentionStore.maps(...)` selected per concept: ``batch concept h w``
(softmax over tokens already done, mean over heads and layers). A leading
batch dim is optional where noted. Masks may have any size; they are
resized to the map with `resize_mask`.

- `bind_loss`, `separation_loss`: DisenDiff (CVPR 2024) attention calibration.
- `mask_attention_loss`: Break-A-Scene's cross-attention loss.
- `balanced_l1_loc_loss`: FastComposer's L_loc.
- `masked_mse`: Custom Diffusion / DisenDiff masked ε-loss.
- `denoising_loss` (UNet bases, DDPM) and `flow_matching_loss` (transformer bases, rectified flow): the
  diffusion loss every trainer here uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import gaussian_smooth, minmax_normalize, resize_mask

# ---------------------------------------------------------------- helpers


def soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Soft IoU per map: (Σ a·b + 1) / (Σ a + Σ b − Σ a·b + 1).

    ``... h w`` × ``... h w`` → ``...``. The +1 (DisenDiff) keeps two empty
    maps at IoU 1 and the gradient finite.
    """
    inter = (a * b).sum(dim=(-2, -1))
    union = a.sum(dim=(-2, -1)) + b.sum(dim=(-2, -1)) - inter
    return (inter + 1) / (union + 1)


def suppress(a: torch.Tensor, power: int = 2) -> torch.Tensor:
    """DisenDiff's f_m: A ⊙ A on maps in [0, 1], damping weak responses.

    `power` 1 turns it off; 4 applies it twice (an ablation).
    """
    return a if power == 1 else a.pow(power)


def _calibrated(maps: torch.Tensor, smooth: bool) -> torch.Tensor:
    """DisenDiff's preprocessing: min–max normalise, then G if `smooth`."""
    maps = minmax_normalize(maps)
    return gaussian_smooth(maps) if smooth else maps


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ.")


def _mean_over(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``batch concept`` values over the `valid` entries (all if None)."""
    if valid is None:
        return values.mean()
    valid = valid.to(values.dtype).expand_as(values)
    return (values * valid).sum() / valid.sum().clamp_min(1.0)


# ---------------------------------------------------------------- DisenDiff


def bind_loss(
    class_maps: torch.Tensor,
    modifier_maps: torch.Tensor,
    smooth: bool = True,
    suppression_power: int = 2,
    per_concept: bool = False,
) -> torch.Tensor:
    """L_bind = Σ_i [1 − IoU(sg(f_m(G(A_class_i))), G(A_modifier_i))], mean over batch
    (``per_concept``: the ``[batch] concept`` terms, unsummed).

    class_maps, modifier_maps: ``[batch] concept h w`` raw attention maps,
    concept i's class word and its modifier token. Each map is min–max
    normalised here, then smoothed (`smooth`, G) and, for class maps only,
    suppressed (`suppression_power`, 1 = off). Class maps are the target:
    no gradient flows into them.
    """
    _check_same_shape(class_maps, modifier_maps, "bind_loss")
    target = suppress(_calibrated(class_maps, smooth), suppression_power).detach()
    moving = _calibrated(modifier_maps, smooth)
    terms = 1 - soft_iou(target, moving)  # [batch] concept
    return terms if per_concept else terms.sum(dim=-1).mean()


def separation_loss(
    class_maps: torch.Tensor, smooth: bool = True, suppression_power: int = 2
) -> torch.Tensor:
    """L_s&s = mean_{i<j} IoU(f_m(G(A_class_i)), f_m(G(A_class_j))), mean over batch.

    class_maps: ``[batch] concept h w``. Gradient flows into both maps of
    each pair. With one concept there is nothing to separate: 0 (still
    connected to the graph, so ``loss.backward()`` works).
    """
    n = class_maps.shape[-3]
    if n < 2:
        return class_maps.sum() * 0.0
    maps = suppress(_calibrated(class_maps, smooth), suppression_power)
    i, j = torch.triu_indices(n, n, offset=1, device=maps.device)
    pair_iou = soft_iou(maps[..., i, :, :], maps[..., j, :, :])  # [batch] pair
    return pair_iou.mean()


# ---------------------------------------------------------------- mask-guided


def mask_attention_loss(
    maps: torch.Tensor,
    masks: torch.Tensor,
    valid: torch.Tensor | None = None,
    reduction: str = "mean",
    eps: float = 1e-8,
) -> torch.Tensor:
    """Break-A-Scene: MSE(A / max A, mask at map size) per token.

    maps: ``[batch] token h w``; masks: ``[batch] token H W`` (resized by
    area); valid: optional ``[batch] token`` bool for padded tokens.
    Reduced over tokens by `reduction` ("mean"; the reference code sums,
    i.e. "sum") and averaged over the batch.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: use 'mean' or 'sum'.")
    target = resize_mask(masks, maps.shape[-2:]).to(maps.dtype)
    _check_same_shape(maps, target, "mask_attention_loss")
    peak = maps.amax(dim=(-2, -1), keepdim=True).clamp_min(eps)
    per_token = ((maps / peak - target) ** 2).mean(dim=(-2, -1))  # [batch] token
    if reduction == "mean":
        return _mean_over(per_token, valid)
    if valid is not None:
        per_token = per_token * valid.to(per_token.dtype)
    return per_token.sum(dim=-1).mean()


def balanced_l1_loc_loss(
    maps: torch.Tensor,
    masks: torch.Tensor,
    valid: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """FastComposer's L_loc: mean_{p∉M} A(p) − mean_{p∈M} A(p), averaged.

    maps: ``[batch] subject h w``; masks: ``[batch] subject H W`` (resized
    to soft masks, as the reference's antialiased bilinear); valid:
    optional ``[batch] subject`` bool, False for padded subjects. Negative
    when attention lies inside the mask. The term is linear in A, so
    averaging maps over heads and layers first gives the paper's average.
    """
    m = resize_mask(masks, maps.shape[-2:]).to(maps.dtype)
    _check_same_shape(maps, m, "balanced_l1_loc_loss")
    inside = (maps * m).sum(dim=(-2, -1)) / (m.sum(dim=(-2, -1)) + eps)
    outside = (maps * (1 - m)).sum(dim=(-2, -1)) / ((1 - m).sum(dim=(-2, -1)) + eps)
    return _mean_over(outside - inside, valid)


# ---------------------------------------------------------------- diffusion


def masked_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """sum(loss·mask) / sum(mask) per sample, mean over batch.

    pred, target: ``batch channel h w``; mask: ``batch h w`` or
    ``batch 1|channel h w`` at the latent size, broadcast over channels
    (so a full mask gives plain MSE). None → plain MSE. A sample with an
    empty mask contributes 0. Computed in float32.
    (Custom Diffusion's script divides by the 1-channel mask sum, i.e. is
    `channel` times larger; scale λ accordingly when porting its numbers.)
    """
    _check_same_shape(pred, target, "masked_mse")
    if mask is None:
        return F.mse_loss(pred.float(), target.float())
    if mask.ndim == pred.ndim - 1:
        mask = mask.unsqueeze(1)
    if mask.shape[0] != pred.shape[0] or mask.shape[-2:] != pred.shape[-2:]:
        raise ValueError(
            f"masked_mse: mask {tuple(mask.shape)} does not fit pred {tuple(pred.shape)}; "
            "resize it to the latent with attention.resize_mask."
        )
    loss = (pred.float() - target.float()) ** 2
    mask = mask.to(loss.dtype).expand_as(loss)
    dims = tuple(range(1, loss.ndim))
    per_sample = (loss * mask).sum(dim=dims) / mask.sum(dim=dims).clamp_min(eps)
    return per_sample.mean()


__all__ = [
    "balanced_l1_loc_loss",
    "bind_loss",
    "mask_attention_loss",
    "masked_mse",
    "separation_loss",
    "soft_iou",
    "suppress",
]


def diffusion_target(scheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict, per the scheduler's ``prediction_type``:
    the noise (SD 1.x), the velocity (SD 2.x, ToyWorld) or the clean latent."""
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return scheduler.get_velocity(z0, noise, t)
    if kind == "sample":
        return z0
    return noise


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-γ (Hang et al. 2023) for the scheduler's
    ``prediction_type``: the x₀-space weight min(SNR, γ), expressed for an ε target
    (÷ SNR), a velocity target (÷ (SNR + 1)) or a clean-latent target (as is).
    A zero-SNR timestep gets weight 0 under ε, where its target is undefined anyway."""
    alphas = scheduler.alphas_cumprod.to(t.device)[t].float()
    snr = alphas / (1 - alphas).clamp_min(1e-12)
    clipped = snr.clamp(max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return clipped / (snr + 1)
    if kind == "sample":
        return clipped
    return torch.where(snr > 0, clipped / snr.clamp_min(1e-12), torch.zeros_like(snr))


def denoising_loss(unet, scheduler, z0: torch.Tensor, cond: torch.Tensor, gen: torch.Generator,
                   loss_mask: torch.Tensor, store=None, dtype: torch.dtype | None = None,
                   extra_channels: torch.Tensor | None = None, cross_attention_kwargs: dict | None = None,
                   added_cond_kwargs: dict | None = None) -> torch.Tensor:
    """The diffusion loss every trainer here uses (DDPM, Ho et al. 2020): `z0` noised at a timestep
    drawn uniformly, the UNet's prediction against its target (epsilon or v, as the scheduler
    says), mean squared error over `loss_mask` (b 1 h w, pixels; pooled to the latent grid). With
    `store`, the UNet's attention is captured into it on the way. `extra_channels` (b c h w at the
    latent size) join the noisy latent as more UNet inputs (a location map); `cross_attention_kwargs`
    go to the UNet as they are (GLIGEN's object tokens), and so do `added_cond_kwargs` (SDXL's
    pooled text and size/crop ids, models/conditioning.py)."""
    from contextlib import nullcontext

    from .attention import capture_attention

    dev, dtype = z0.device, dtype or unet.dtype
    noise = torch.randn(z0.shape, generator=gen).to(dev)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],), generator=gen).to(dev)
    zt = scheduler.add_noise(z0, noise, t)
    with capture_attention(unet, store) if store is not None else nullcontext():
        x = zt if extra_channels is None else torch.cat([zt, extra_channels.to(zt.dtype)], dim=1)
        added = {k: v.to(dtype) for k, v in added_cond_kwargs.items()} if added_cond_kwargs else None
        pred = unet(x.to(dtype), t, cond.to(dtype), cross_attention_kwargs=cross_attention_kwargs,
                    added_cond_kwargs=added).sample.float()
    mask = F.interpolate(loss_mask.to(dev), size=z0.shape[-2:], mode="area")
    return masked_mse(pred, diffusion_target(scheduler, z0, noise, t), mask)


FLOW_WEIGHTINGS = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


def flow_matching_loss(predict, scheduler, z0: torch.Tensor, gen: torch.Generator, loss_mask: torch.Tensor,
                       weighting: str = "none", logit_mean: float = 0.0, logit_std: float = 1.0,
                       mode_scale: float = 1.29) -> torch.Tensor:
    """The rectified-flow loss FLUX and SD3 were trained with (Esser et al. 2024, SD3 section 2), as diffusers'
    DreamBooth scripts compute it: u ~ `compute_density_for_timestep_sampling(weighting)`, the timestep and
    σ at index ⌊u·T⌋ of the scheduler's own tables (so its static shift applies), x_t = (1 − σ)·x₀ + σ·ε, the
    model's prediction of the velocity ε − x₀, squared error weighted by `compute_loss_weighting_for_sd3` and
    averaged over `loss_mask` (b 1 h w, pixels; pooled to the latent grid). `predict(x_t, timesteps)` calls the
    transformer and returns its prediction in x_t's shape. The defaults are diffusers' scripts' (weighting
    "none": uniform timesteps, weight 1; logit-normal 0, 1; mode scale 1.29)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    dev, n = z0.device, scheduler.config.num_train_timesteps
    u = compute_density_for_timestep_sampling(weighting, z0.shape[0], logit_mean, logit_std, mode_scale, generator=gen)
    index = (u * n).long().clamp(0, n - 1)  # the "mode" density can reach u = 1
    timesteps = scheduler.timesteps[index].to(dev)
    sigmas = scheduler.sigmas[index].to(dev, torch.float32).view(-1, *([1] * (z0.ndim - 1)))
    noise = torch.randn(z0.shape, generator=gen).to(dev)
    zt = (1 - sigmas) * z0.float() + sigmas * noise
    pred = predict(zt, timesteps).float()
    weight = compute_loss_weighting_for_sd3(weighting, sigmas).float()
    mask = F.interpolate(loss_mask.to(dev), size=z0.shape[-2:], mode="area")
    return masked_mse(pred * weight.sqrt(), (noise - z0.float()) * weight.sqrt(), mask)
