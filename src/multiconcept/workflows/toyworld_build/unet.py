"""Stages 4 and 5: the base-training latent pool, then the text encoder and UNet trained jointly."""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ...errors import UserError
from ...losses import diffusion_target, min_snr_weights
from ...models.compiled import compile_denoiser
from ...training import discard_checkpoint
from .common import (
    Log,
    StageJob,
    render_pool,
    replace_dir,
    stage_loop,
    to_pixels,
    write_json,
)
from .quality import quick_score
from .settings import CHECKPOINTS, NOISE_SCHEDULES, BuildConfig, clip_names, stage_digest
from .world import WORLD


def latent_pool(cfg: BuildConfig, work: Path, vae, log: Log):
    path, meta_path = work / "base_pool.safetensors", work / "base_pool.json"
    if path.exists() and meta_path.exists():
        with safe_open(str(path), "pt") as f:
            mean, std = f.get_tensor("mean"), f.get_tensor("std")
        if len(mean) == cfg.base_pool:
            return mean, std, json.loads(meta_path.read_text())
    t = time.time()
    images, meta = render_pool(cfg.base_pool, [cfg.seed, 4], lambda rng: WORLD.base_scene(rng, cfg), WORLD)
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            d = vae.encode(to_pixels(images[i:i + 256])).latent_dist
            means.append(d.mean.half().contiguous())
            stds.append(d.std.half().contiguous())
    mean, std = torch.cat(means), torch.cat(stds)
    save_file({"mean": mean, "std": std}, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    write_json(meta_path, meta)
    log(f"latent pool: {len(mean)} base scenes encoded in {time.time() - t:.0f} s "
        f"(posterior std mean {std.float().mean():.3f})")
    return mean, std, meta


# ---------------------------------------------------------------- 5. text encoder + UNet

def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def make_unet(cross_attention_dim: int = 128):
    from diffusers import UNet2DConditionModel

    # ToyWorld's 5.9 M layout: cross-attention at 16x16 and 8x8 (where methods read maps).
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32)


def make_schedulers(prediction_type: str = BuildConfig.prediction_type,
                    noise_schedule: str = BuildConfig.noise_schedule):
    from diffusers import DDIMScheduler, DDPMScheduler

    BuildConfig(prediction_type=prediction_type, noise_schedule=noise_schedule)  # refuses a bad pair
    common = dict(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False,
                  **NOISE_SCHEDULES[noise_schedule])
    # (trailing spacing ignores steps_offset; 1 keeps diffusers' outdated-config warning away)
    spacing = dict(timestep_spacing="trailing") if prediction_type == "v_prediction" else {}
    return DDPMScheduler(**common), DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1, **spacing)


def make_pipeline(vae, text_encoder, tokenizer, unet, cfg: BuildConfig):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_schedulers(cfg.prediction_type, cfg.noise_schedule)[1], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ema_update(ema: dict, modules: dict, decay: float) -> None:
    with torch.no_grad():
        for name, m in modules.items():
            for k, v in m.named_parameters():
                ema[f"{name}.{k}"].lerp_(v.detach(), 1 - decay)


def batch_indices(cfg: BuildConfig, pool_size: int, singles: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, list[bool]]:
    """Pool indices for one UNet batch, and which of them are curriculum ("easy") picks."""
    if not cfg.easy_share:
        return rng.integers(pool_size, size=cfg.unet_batch), [False] * cfg.unet_batch
    n_easy = int(round(cfg.unet_batch * cfg.easy_share))
    idx = np.concatenate([rng.choice(singles, n_easy), rng.integers(pool_size, size=cfg.unet_batch - n_easy)])
    return idx, [True] * n_easy + [False] * (cfg.unet_batch - n_easy)


def training_noise(cfg: BuildConfig, shape, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


def sample_timesteps(cfg: BuildConfig, n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    if cfg.timestep_sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (n,), generator=generator)
    u = torch.sigmoid(torch.randn(n, generator=generator) * cfg.timestep_std + cfg.timestep_mean)
    t = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    if cfg.timestep_sampling == "mixed":
        uniform = torch.randint(0, num_train_timesteps, (n,), generator=generator)
        t = torch.where(torch.rand(n, generator=generator) < 0.5, uniform, t)
    return t


def train_unet(cfg: BuildConfig, work: Path, tokenizer, vae, log: Log):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    final = work / "unet_final"
    if (final / "raw" / "unet" / "config.json").exists():
        out = {}
        for kind in ("raw", "ema"):
            out[kind] = (CLIPTextModel.from_pretrained(final / kind / "text_encoder").eval(),
                         UNet2DConditionModel.from_pretrained(final / kind / "unet").eval())
        return out, json.loads((final / "train.json").read_text())
    mean, std, meta = latent_pool(cfg, work, vae, log)
    torch.manual_seed(cfg.seed + 5)
    text_encoder, unet = make_text_encoder(tokenizer), make_unet(128)
    if cfg.text_encoder.startswith("evaluator"):  # "evaluator" (frozen) or "evaluator-tuned"
        from transformers import CLIPModel

        # the last CLIP trained: the encoder (settings.clip_names)
        tower = CLIPModel.from_pretrained(work / clip_names(cfg)[-1], dtype=torch.float32).text_model
        text_encoder.load_state_dict(tower.state_dict())
    if cfg.text_encoder == "evaluator":
        text_encoder.requires_grad_(False).eval()
        modules = {"unet": unet}  # what trains (and is checkpointed / averaged)
    else:
        modules = {"text_encoder": text_encoder, "unet": unet}
    log(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M")
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    ema = {f"{n}.{k}": v.detach().clone() for n, m in modules.items() for k, v in m.named_parameters()}
    ddpm, _ = make_schedulers(cfg.prediction_type, cfg.noise_schedule)
    alphas = ddpm.alphas_cumprod
    for m in modules.values():
        m.train()

    singles = np.array([i for i, m in enumerate(meta) if WORLD.is_single(m)])
    if cfg.easy_share and not len(singles):
        raise UserError("easy_share needs single-object scenes in the base pool; it has none: raise base_pool")

    # captions are re-drawn every step but come from a small vocabulary: each is tokenized once
    # (the same ids as tokenizing the batch, so the build's outputs do not change)
    caption_ids: dict[str, torch.Tensor] = {}

    def ids_of(captions: list[str]) -> torch.Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in caption_ids]
        if new:
            ids = tokenizer(new, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            caption_ids.update(zip(new, ids))
        return torch.stack([caption_ids[c] for c in captions])

    def loss_of(step: int) -> torch.Tensor:
        rng = np.random.default_rng([cfg.seed, 50, step])
        idx, easy = batch_indices(cfg, len(mean), singles, rng)
        captions = ["" if rng.random() < cfg.caption_dropout else
                    WORLD.base_caption(meta[i], None if e else rng, cfg)
                    for i, e in zip(idx, easy)]
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        # Posterior means, not samples: the tiny KL weight still let one VAE channel
        # collapse to the prior (measured posterior std per normalised channel
        # [0.26, 0.39, 4.96, 0.16]), so sampling made a quarter of every latent pure
        # noise of variance ~25 that held the UNet's loss at a floor of ~0.25.
        latents = mean[idx].float()
        noise = training_noise(cfg, latents.shape, g)
        t = sample_timesteps(cfg, len(idx), ddpm.config.num_train_timesteps, g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        ids = ids_of(captions)
        target = diffusion_target(ddpm, latents, noise, t)
        err = F.mse_loss(unet(noisy, t, text_encoder(ids)[0]).sample, target, reduction="none").mean((1, 2, 3))
        return (err * min_snr_weights(ddpm, t, cfg.snr_gamma)).mean() if cfg.snr_gamma else err.mean()

    def after_step(step: int, state: dict) -> None:
        _ema_update(ema, modules, cfg.ema_decay)
        if step % cfg.monitor_every == 0:
            scores = quick_score(make_pipeline(vae, text_encoder, tokenizer, unet, cfg), cfg, n=16)
            state["monitor"].append({"step": step, **scores})
            log(f"unet step {step}: checker on {scores['n']} prompts: class {scores['class_present']:.2f} "
                f"colour {scores['colour_present']:.2f} both {scores['match']:.2f} background {scores['background']:.2f}")
            for m in modules.values():
                m.train()

    uncompile = compile_denoiser(unet, cfg.compile)
    # checker scores during training ("monitor") are checkpointed with the loop
    try:
        info, loop_state = stage_loop("unet", StageJob(loss_of, {**modules, "ema": ema}, after_step), opt,
                                      steps=cfg.unet_steps,
                                      max_minutes=cfg.max_unet_hours * 60 if cfg.max_unet_hours else None,
                                      peak_lr=cfg.unet_lr, warmup=cfg.warmup, checkpoint=work / CHECKPOINTS["unet"],
                                      digest=stage_digest(cfg, "unet"), checkpoint_minutes=cfg.checkpoint_minutes,
                                      log=log, extra={"monitor": []})
    finally:
        uncompile()  # before the copies below: a compiled module does not deep-copy
    averaged = {name: copy.deepcopy(m) for name, m in modules.items()}
    with torch.no_grad():
        for name, m in averaged.items():
            for k, v in m.named_parameters():
                v.copy_(ema[f"{name}.{k}"])
    ema_te, ema_unet = averaged.get("text_encoder", text_encoder), averaged["unet"]
    tmp = final.with_name("unet_final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for kind, (te, un) in {"raw": (text_encoder, unet), "ema": (ema_te, ema_unet)}.items():
        te.save_pretrained(tmp / kind / "text_encoder", safe_serialization=True)
        un.save_pretrained(tmp / kind / "unet", safe_serialization=True)
    write_json(tmp / "train.json", info | {"monitor": loop_state["monitor"]})
    replace_dir(tmp, final)
    discard_checkpoint(work / CHECKPOINTS["unet"])
    return {"raw": (text_encoder.eval(), unet.eval()), "ema": (ema_te.eval(), ema_unet.eval())}, info


# ---------------------------------------------------------------- 6. evaluation and shipping
