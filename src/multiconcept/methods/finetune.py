"""Fine-tuning a method: data sampling, noise and the diffusion loss, as a job
of the one training loop (training/loop.py), which owns accelerate,
accumulation, checkpoints and resume. The diffusion loss is the base's own:
DDPM's on a UNet base, the rectified-flow loss on a transformer base (FLUX,
SD3: losses.flow_matching_loss), the rest of the job the same.

Every random choice of optimiser step `s` (which image, augmentation, noise,
timestep) comes from generators seeded by (seed, s), so a run killed and
resumed from a checkpoint follows exactly the path of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from ..bundle import save_bundle
from ..data import ConceptSet, RegExample, caption, hflip, mask_tensor, scale_augment, to_tensor
from ..errors import UserError, require
from ..latents import choose_latent_mode, latents_from_moments
from ..losses import denoising_loss, flow_matching_loss
from ..models import Base
from ..models.compiled import compile_denoiser
from ..models.conditioning import TextConditioning, added_conditioning, encode_flow, encode_ids, token_ids
from ..prompts import locate_concepts
from ..training import (
    LoopSettings,
    Progress,
    TrainingDiverged,
    discard_checkpoint,
    make_accelerator,
    run,
    step_seed,
    wrapper_syncs_gradients,
)
from ..training.checkpoint import remove_stale_temps
from ..training.optim import make_optimizer
from .base import Method, TrainConfig
from .precision import quantize_frozen_linears

__all__ = ["FineTuneJob", "Trainer", "TrainingDiverged", "choose_latent_mode", "config_digest", "latents_from_moments",
           "loss_region", "step_seed", "train"]


def loss_region(mode: str, named: torch.Tensor, unnamed: torch.Tensor) -> torch.Tensor:
    """Where the diffusion loss counts, given the masks of the concepts a caption
    names and of the image's other concepts (``k h w`` each, values in [0, 1]).

    - ``masks``: the union of the named concepts' masks (Break-A-Scene); the
      background is free to drift;
    - ``unnamed-out``: everywhere except the unnamed concepts' pixels, so the
      background is learned too and "a <s1> cat" is not taught the dog;
    - ``all``: the whole image.
    """
    ones = torch.ones(1, *(named.shape[-2:] if named.numel() else unnamed.shape[-2:]))
    if mode == "all":
        return ones
    if mode == "masks":
        return named.amax(0, keepdim=True) if len(named) else ones
    if mode == "unnamed-out":
        return ones - unnamed.amax(0, keepdim=True) if len(unnamed) else ones
    raise UserError(f"loss_region must be masks, unnamed-out or all, got {mode!r}: fix --param loss_region")


def erase_regions(pixels: torch.Tensor, erase: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """Paint the ``erase`` masks' pixels (``k h w``) with the median colour of the
    pixels outside every ``objects`` mask: a crude inpainting, exact on plain
    backgrounds (ToyWorld), so that a caption naming one concept of a
    several-concept image is not trained on the others."""
    out = pixels.clone()
    background = objects.amax(0) < 0.5
    fill = pixels[:, background].median(dim=1).values if background.any() else pixels.new_zeros(pixels.shape[0])
    hole = erase.amax(0) >= 0.5
    out[:, hole] = fill[:, None]
    return out


class Trainer:
    def __init__(self, method: Method, base: Base, data: ConceptSet, cfg: TrainConfig, reg: list[RegExample] | None = None):
        self.method, self.base, self.data, self.cfg = method, base, data, cfg
        self.reg = reg or []
        self.size = cfg.resolution or base.resolution
        self.text_cache: dict[str, tuple] = {}  # prompt -> (hidden, pooled or None)
        self.latent_cache: dict[int, torch.Tensor] = {}
        self.example_cache: dict[int, tuple] = {}  # example -> (pixels, {token: mask}) at the training size
        self.encoded_cache: dict[str, object] = {}
        self.ids_cache: dict[str, list[torch.Tensor]] = {}
        self.scheduler = _training_scheduler(base)
        self.dtype = base.denoiser.dtype  # diffusers' .dtype walks every module: read it once
        self.latent_mode = self._latent_mode()
        self.last_attention = None  # (batch, store) of the last loss, read by a progress display

    def _latent_mode(self) -> str:
        first = self.data.examples[0].image if self.data.examples else None
        pixels = to_tensor(first, self.size)[None] if first is not None else None
        return choose_latent_mode(self.cfg.latents, self.base.vae, pixels)

    # ---------------------------------------------------------------- data
    def sample(self, rng: random.Random) -> dict:
        """One training sample: image, loss mask, caption, concept masks."""
        cfg, size = self.cfg, self.size
        if self.reg and rng.random() < cfg.reg_fraction:
            i = rng.randrange(len(self.reg))
            ex = self.reg[i]
            key = ("reg", i)  # (regularisation sets run to hundreds of images: their pixels are not kept)
            pixels = None if key in self.latent_cache else to_tensor(ex.image, size)
            return {"key": key, "pixels": pixels, "loss_mask": torch.ones(1, size, size),
                    "prompt": ex.caption, "masks": {}, "target": False}
        i = rng.randrange(len(self.data.examples))
        ex = self.data.examples[i]
        tokens = self.method.choose_tokens(ex, rng)
        concepts = [self.data.concept(t) for t in tokens]
        prompt = caption(concepts, rng.choice(cfg.templates))
        pixels, mask_of = self.example_tensors(i)
        named = [t for t in tokens if t in ex.masks]
        # the unnamed concepts' masks ride along so the loss can leave their pixels out
        names = named + [t for t in ex.tokens if t in ex.masks and t not in named]
        masks = torch.cat([mask_of[t] for t in names]) if names else torch.zeros(0, size, size)
        region = torch.ones(1, size, size)
        key = ("ex", i)
        if cfg.unnamed == "erase" and len(names) > len(named):
            pixels = erase_regions(pixels, masks[len(named):], masks)
            key = ("ex", i, tuple(named))
        if cfg.augment:
            key = None
            pixels, masks, region, prefix = scale_augment(pixels, masks, rng)
            prompt = prefix + prompt
            if rng.random() < cfg.flip_p:
                pixels, masks, region = hflip(pixels, masks, region)
        concept_masks = {t: masks[j : j + 1] for j, t in enumerate(names) if t in named}
        loss_mask = region
        if names and self.method.mask_loss:
            loss_mask = region * loss_region(cfg.loss_region, masks[: len(named)], masks[len(named):])
        return {"key": key, "pixels": pixels, "loss_mask": loss_mask, "prompt": prompt, "masks": concept_masks, "target": True}

    def example_tensors(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Example `i`'s pixels and masks at the training size, made once (a user's few images; every later
        step's augmentation, erasing and flips make new tensors from them)."""
        if i not in self.example_cache:
            ex = self.data.examples[i]
            self.example_cache[i] = (to_tensor(ex.image, self.size),
                                     {t: mask_tensor(m, self.size) for t, m in ex.masks.items()})
        return self.example_cache[i]

    def batch(self, step: int, micro: int) -> dict:
        rng = random.Random(step_seed(self.cfg.seed, step, micro))
        samples = [self.sample(rng) for _ in range(self.cfg.batch_size)]
        return {
            "keys": [s["key"] for s in samples],
            "pixels": [s["pixels"] for s in samples],  # None where the latents are cached
            "loss_mask": torch.stack([s["loss_mask"] for s in samples]),
            "prompts": [s["prompt"] for s in samples],
            "masks": [s["masks"] for s in samples],
            "target": [s["target"] for s in samples],
            "encoded": [self.locate(s["prompt"]) for s in samples],
        }

    def locate(self, prompt: str):
        """Token positions of a caption (captions repeat: templates x prefixes), cached."""
        enc = self.encoded_cache.get(prompt)
        if enc is None:
            enc = self.encoded_cache[prompt] = locate_concepts(self.base.sequence_tokenizer, prompt, self.data.concepts)
        return enc

    # ---------------------------------------------------------------- encoders
    @torch.no_grad()
    def latents(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        vae, dev = self.base.vae, self.base.device
        params = []
        for k, px in zip(batch["keys"], batch["pixels"]):
            p = self.latent_cache.get(k) if k is not None else None
            if p is None:
                p = vae.encode(px[None].to(dev, vae.dtype)).latent_dist.parameters[0]
                if k is not None:
                    self.latent_cache[k] = p
            params.append(p)
        z = latents_from_moments(vae, torch.stack(params), self.latent_mode, gen)
        return z if self.base.flow is None else self.base.flow.to_model(self.base.pipe, z)

    def encode_prompts(self, prompts: list[str]) -> TextConditioning:
        hidden, pooled = [], []
        trained: dict[str, tuple] = {}  # captions with trained tokens: encoded once per batch, not once per sample
        for p in prompts:
            cacheable = not self.method.trainable_tokens_in(p)
            if cacheable and p in self.text_cache:
                h, q = self.text_cache[p]
            elif p in trained:
                h, q = trained[p]
            else:
                with torch.set_grad_enabled(not cacheable):
                    c = self._encode(p)
                h, q = c.hidden[0], (c.pooled[0] if c.pooled is not None else None)
                if cacheable:
                    self.text_cache[p] = (h.detach(), q.detach() if q is not None else None)
                else:
                    trained[p] = (h, q)
            hidden.append(h)
            pooled.append(q)
        return TextConditioning(torch.stack(hidden), torch.stack(pooled) if pooled[0] is not None else None)

    def _encode(self, prompt: str) -> TextConditioning:
        if self.base.flow is not None:
            return encode_flow(self.base, [prompt])
        ids = self.ids_cache.get(prompt)
        if ids is None:
            ids = self.ids_cache[prompt] = token_ids(self.base, prompt)
        return encode_ids(self.base, ids)

    # ---------------------------------------------------------------- loss
    def loss(self, batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        z0 = self.latents(batch, gen)
        cond = self.encode_prompts(batch["prompts"])
        store = self.method.attention_store(batch)
        self.last_attention = (batch, store) if store is not None else None
        if self.base.flow is not None:
            diffusion = self.flow_loss(z0, cond, gen, batch["loss_mask"], store)
        else:
            added = added_conditioning(self.base, cond.pooled, self.size, self.size)
            diffusion = denoising_loss(self.base.unet, self.scheduler, z0, cond.hidden, gen, batch["loss_mask"], store,
                                       self.dtype, added_cond_kwargs=added)
        logs = {"diffusion": diffusion.item()}
        extra, extra_logs = self.method.extra_loss(batch, store)
        logs.update(extra_logs)
        total = diffusion if extra is None else diffusion + extra
        logs["loss"] = total.item()
        return total, logs

    def flow_loss(self, z0: torch.Tensor, cond: TextConditioning, gen: torch.Generator, loss_mask: torch.Tensor,
                  store) -> torch.Tensor:
        """The rectified-flow loss of a transformer base, its joint attention captured into `store` on the way
        (the blocks the method asks for: `Method.attention_blocks`)."""
        from contextlib import nullcontext

        from ..joint_attention import capture_joint_attention

        base, cfg, dt = self.base, self.cfg, self.dtype
        hidden = cond.hidden.to(dt)
        pooled = cond.pooled.to(dt) if cond.pooled is not None else None

        def predict(zt: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return base.flow.predict(base.pipe, zt.to(dt), timesteps.to(dt), hidden, pooled, cfg.guidance)

        capture = capture_joint_attention(base.denoiser, store, base.flow, self.method.attention_blocks()) \
            if store is not None else nullcontext()
        with capture:
            return flow_matching_loss(predict, self.scheduler, z0, gen, loss_mask, cfg.weighting_scheme, cfg.logit_mean,
                                      cfg.logit_std, cfg.mode_scale)

    @torch.no_grad()
    def attention_maps(self) -> dict[str, torch.Tensor]:
        """The last step's cross-attention (the finest captured level, mean over layers and heads) of
        each concept's token and class word, from the first sample whose caption names it."""
        if self.last_attention is None:
            return {}
        batch, store = self.last_attention
        if not store.captured_resolutions:
            return {}
        maps = store.maps(max(store.captured_resolutions)).detach()  # batch token h w
        out: dict[str, torch.Tensor] = {}
        for c in self.data.concepts:
            for key, label in ((c.token, c.token), (c.token + "/class", f"{c.class_word} ({c.token})")):
                i = next((i for i, (enc, target) in enumerate(zip(batch["encoded"], batch["target"]))
                          if target and enc.positions.get(key)), None)
                if i is not None:
                    out[label] = maps[i, batch["encoded"][i].positions[key]].mean(0).float().cpu()
        return out


def _training_scheduler(base: Base):
    """A fresh scheduler of the base's config: DDPM's on a UNet base; on a flow base its own flow-matching
    scheduler as configured (its tables carry the static shift), never one a sampler has set timesteps on."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    kind = FlowMatchEulerDiscreteScheduler if base.flow is not None else DDPMScheduler
    return kind.from_config(base.pipe.scheduler.config)


# ---------------------------------------------------------------- the run

def config_digest(cfg: TrainConfig, method: str, fingerprint: str) -> str:
    # where logs go, and whether activations are recomputed, do not change what is trained; a compiled step
    # differs from an eager one in the last bits, so `compile` counts (left out when off: digests of runs
    # from before the setting existed stay valid)
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("log_file", "gradient_checkpointing") and not (k == "compile" and v == "off")}
    blob = json.dumps({"cfg": settings, "method": method, "base": fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class FineTuneJob:
    """A method's fine-tuning as a job of the training loop."""

    def __init__(self, trainer: Trainer, method: Method):
        self.trainer, self.method = trainer, method

    def loss(self, step: int, micro: int, gen: torch.Generator):
        return self.trainer.loss(self.trainer.batch(step, micro), gen)

    def state(self) -> dict[str, torch.Tensor]:
        return self.method.trainable_state()

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.method.load_trainable_state(tensors)

    def after_step(self, step: int, extra: dict) -> None:
        self.method.after_step()

    def attention_maps(self) -> dict[str, torch.Tensor]:
        return self.trainer.attention_maps()


def train(
    method_cls: type[Method],
    base: Base,
    data: ConceptSet,
    cfg: TrainConfig,
    out: str | Path,
    *,
    reg: list[RegExample] | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    on_step: Callable[[Progress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Path | None:
    """Train and write the bundle to `out`. Returns its path, or None when
    `stop_after` or `cancel` ended the run early (the checkpoint holds the state)."""
    out = Path(out)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".ckpt")
    ckpt = work / "checkpoint.safetensors"
    if cfg.gradient_checkpointing and method_cls.attention_store is not Method.attention_store:
        raise UserError(f"gradient_checkpointing does not work with {method_cls.name}: its attention losses read maps "
                        "captured in the forward pass, which the backward pass's recomputation captures again; leave it off")
    torch.manual_seed(cfg.seed)
    accelerator = make_accelerator(cfg.mixed_precision, device=base.device.type)
    method = method_cls(base, data, cfg)
    if cfg.quantize_frozen == "nf4":  # before setup: methods hook the layers they read (Infusion)
        quantize_frozen_linears(base.denoiser, method.full_precision_modules())
    groups = method.setup()
    if cfg.gradient_checkpointing:
        base.denoiser.enable_gradient_checkpointing()
    uncompile = compile_denoiser(base.denoiser, cfg.compile)  # after setup: its hooks and fp32 weights are traced
    lr = cfg.lr * (cfg.batch_size * cfg.grad_accum * accelerator.num_processes if cfg.scale_lr else 1)
    optimizer = make_optimizer(cfg.optimizer, groups, lr=lr, weight_decay=cfg.weight_decay)
    trainer = Trainer(method, base, data, cfg, reg)
    digest = config_digest(cfg, method.name, base.fingerprint)
    remove_stale_temps(out)
    # the loop averages gradients over processes itself (training/processes.py): only the optimiser is prepared
    require(not wrapper_syncs_gradients(accelerator), "learn runs on one process or DDP (`accelerate launch` with "
            "configs/accelerate/ddp-8gpu-bf16.yaml), not DeepSpeed or FSDP: choose that config")
    optimizer = accelerator.prepare(optimizer)
    settings = LoopSettings(steps=cfg.steps, seed=cfg.seed, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                            mixed_precision=cfg.mixed_precision, checkpoint_every=cfg.checkpoint_every,
                            log_file=cfg.log_file, progress_bar=progress, name=method.name)
    try:
        outcome = run(FineTuneJob(trainer, method), optimizer, [p for g in groups for p in g["params"]], settings,
                      checkpoint=ckpt, digest=digest, resume=resume, accelerator=accelerator, on_step=on_step,
                      cancel=cancel, stop_after=stop_after)
        bundle = method.to_bundle() if outcome.finished else None  # before teardown puts weights back in their dtype
    finally:
        uncompile()
        method.teardown()
        if cfg.gradient_checkpointing:
            base.denoiser.disable_gradient_checkpointing()
    if bundle is None:
        return None
    bad = next((k for k, v in bundle.tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise TrainingDiverged(f"training left NaN or infinite values in {bad}: lower --lr or use fp32; "
                               f"nothing was written to {out}")
    if accelerator.is_main_process:  # under `accelerate launch` the others have the same tensors
        save_bundle(bundle, out)
        discard_checkpoint(ckpt, remove_folder=True)
    accelerator.wait_for_everyone()
    return out
