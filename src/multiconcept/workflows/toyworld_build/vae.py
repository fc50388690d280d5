"""Stage 2: the VAE (AutoencoderKL, 4x down), its latents normalised per channel inside the model."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ...training import discard_checkpoint
from .common import (
    Log,
    StageJob,
    grid,
    render_pool,
    replace_dir,
    stage_loop,
    to_pixels,
    write_json,
)
from .settings import CHECKPOINTS, BuildConfig, stage_digest
from .world import WORLD


def make_vae():
    from diffusers import AutoencoderKL

    # Three blocks = two 2x downsamplings: 64x64x3 -> 16x16x4, ToyWorld's 0.95 M-param layout.
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64),
                         layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=64)


@torch.no_grad()
def latent_stats(vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    means = torch.cat([vae.encode(to_pixels(images[i:i + 256])).latent_dist.mean
                       for i in range(0, len(images), 256)])
    return means.mean((0, 2, 3)), means.std((0, 2, 3))


@torch.no_grad()
def normalise_latents(vae, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make latents zero-mean, unit-std per channel by folding the affine map into
    the 1x1 quant convs (encoder side) and its inverse into post_quant_conv; the
    VAE's input->output function is unchanged and the pipeline needs no extra code."""
    c = mean.numel()
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] /= std.view(c, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mean) / std
    q.bias[c:] -= 2 * torch.log(std)  # log-variance of z' = (z - m) / s
    p.bias += (p.weight[:, :, 0, 0] @ mean)
    p.weight *= std.view(1, c, 1, 1)


def train_vae(cfg: BuildConfig, work: Path, pool: np.ndarray, foreground: np.ndarray, log: Log):
    torch.manual_seed(cfg.seed)
    vae = make_vae()
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M params")
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)

    def loss_of(step: int) -> torch.Tensor:
        rng = np.random.default_rng([cfg.seed, 20, step])
        idx = rng.integers(len(pool), size=cfg.vae_batch)
        x = to_pixels(pool[idx])
        weight = 1 + cfg.vae_object_weight * torch.from_numpy(foreground[idx]).float()[:, None]
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        return (weight * (rec - x) ** 2).mean() / weight.mean() + cfg.vae_kl_weight * posterior.kl().mean()

    info, _ = stage_loop("vae", StageJob(loss_of, {"vae": vae}), opt, steps=cfg.vae_steps,
                         max_minutes=cfg.vae_max_minutes, peak_lr=cfg.vae_lr, warmup=min(100, cfg.vae_steps // 10 + 1),
                         checkpoint=work / CHECKPOINTS["vae"], digest=stage_digest(cfg, "vae"),
                         checkpoint_minutes=cfg.checkpoint_minutes, log=log)
    return vae.eval(), info


@torch.no_grad()
def vae_psnr(vae, images: np.ndarray) -> float:
    x = to_pixels(images)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).mean((1, 2, 3))
    return float((10 * torch.log10(1 / mse)).mean())


def vae_stage(cfg: BuildConfig, work: Path, log: Log):
    from diffusers import AutoencoderKL

    folder = work / "vae"
    if (folder / "config.json").exists():
        return AutoencoderKL.from_pretrained(folder).eval()
    images, _, foreground = world_pool(cfg, log)
    vae, train_info = train_vae(cfg, work, images, foreground, log)
    held_out, held_meta = render_pool(256, [cfg.seed, 21], WORLD.world_scene, WORLD)
    psnr_raw = vae_psnr(vae, held_out)
    mean, std = latent_stats(vae, images[:2048])
    log(f"vae: PSNR {psnr_raw:.2f} dB on held-out renders; latent channel means {mean.tolist()} stds {std.tolist()}")
    overall_std = float(torch.sqrt((std ** 2 + (mean - mean.mean()) ** 2).mean()))
    normalise_latents(vae, mean, std)
    vae.register_to_config(scaling_factor=1.0)  # latents are unit-std per channel now
    psnr = vae_psnr(vae, held_out)
    m2, s2 = latent_stats(vae, images[:2048])
    assert abs(psnr - psnr_raw) < 0.05 and (s2 - 1).abs().max() < 0.05, "latent normalisation changed the VAE"
    tmp = folder.with_name("vae.tmp")
    vae.save_pretrained(tmp, safe_serialization=True)
    with torch.no_grad():  # top row renders, bottom row reconstructions, for a human look
        rec = vae.decode(vae.encode(to_pixels(held_out[:8])).latent_dist.mean).sample.clamp(-1, 1)
    rec = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    grid(np.concatenate([held_out[:8], rec])).save(tmp / "reconstructions.png")
    parts = reconstruction_parts(vae, held_out, held_meta)
    if parts:
        log(f"vae: checker on reconstructions of held-out renders: {parts}")
    write_json(tmp / "metrics.json", {"psnr_db": psnr, "checker_on_reconstructions": parts, "raw_latent_std": overall_std,
                                       "raw_channel_mean": mean.tolist(), "raw_channel_std": std.tolist(),
                                       "scaling_factor": 1.0, "training": train_info})
    replace_dir(tmp, folder)
    discard_checkpoint(work / CHECKPOINTS["vae"])
    return vae


@torch.no_grad()
def reconstruction_parts(vae, images: np.ndarray, metas: list[dict]) -> dict:
    """What survives the latents: the checker's per-part accuracy on reconstructions."""
    rec = vae.decode(vae.encode(to_pixels(images)).latent_dist.mean).sample.clamp(-1, 1)
    return WORLD.part_accuracy(((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy(), metas)


WORLD_POOL_CACHE: dict = {}


def world_pool(cfg: BuildConfig, log: Log):
    key = (cfg.world, cfg.seed, cfg.world_pool)
    if key not in WORLD_POOL_CACHE:
        t = time.time()
        WORLD_POOL_CACHE.clear()
        WORLD_POOL_CACHE[key] = render_pool(cfg.world_pool, [cfg.seed, 2], WORLD.world_scene, WORLD,
                                                masks=True)
        log(f"world pool: {cfg.world_pool} renders in {time.time() - t:.0f} s")
    return WORLD_POOL_CACHE[key]


# ---------------------------------------------------------------- 3. evaluator
