"""The one training loop every fine-tuning method runs in.

Methods supply trainable tensors and extra losses; this file owns the data
sampling, noise, the diffusion loss, accelerate (mixed precision, devices,
`accelerate launch` for many GPUs), accumulation, checkpoints and resume.

Every random choice of optimiser step `s` (which image, augmentation, noise,
timestep) comes from generators seeded by (seed, s), so a run killed and
resumed from a checkpoint follows exactly the path of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .bundle import atomic_write, save_bundle
from .data import ConceptSet, RegExample, caption, hflip, mask_tensor, scale_augment, to_tensor
from .errors import UserError
from .losses import diffusion_target, masked_mse
from .methods.base import Method, TrainConfig
from .models import Base
from .prompts import locate_concepts


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
        std = dist.std.float().mean((0, 2, 3)) * vae.config.scaling_factor
    return "mean" if std.max().item() > POSTERIOR_STD_LIMIT else "sample"


def latents_from_moments(vae, moments: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Scaled latents from the VAE's posterior moments (``batch 2C h w``: mean, log-variance)."""
    mean, logvar = moments.float().chunk(2, dim=1)
    z = mean
    if mode == "sample":
        z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape, generator=gen).to(mean.device)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


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


class TrainingDiverged(UserError):
    pass


def step_seed(seed: int, step: int, micro: int = 0) -> int:
    return (seed * 1_000_003 + step * 1_009 + micro) % (2**63)


class Trainer:
    def __init__(self, method: Method, base: Base, data: ConceptSet, cfg: TrainConfig, reg: list[RegExample] | None = None):
        self.method, self.base, self.data, self.cfg = method, base, data, cfg
        self.reg = reg or []
        self.size = cfg.resolution or base.resolution
        self.text_cache: dict[str, torch.Tensor] = {}
        self.latent_cache: dict[int, torch.Tensor] = {}
        self.encoded_cache: dict[str, object] = {}
        self.ids_cache: dict[str, torch.Tensor] = {}
        self.scheduler = _training_scheduler(base)
        self.dtype = base.unet.dtype  # diffusers' .dtype walks every module: read it once
        self.latent_mode = self._latent_mode()

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
            return {"key": ("reg", i), "pixels": to_tensor(ex.image, size), "loss_mask": torch.ones(1, size, size),
                    "prompt": ex.caption, "masks": {}, "target": False}
        i = rng.randrange(len(self.data.examples))
        ex = self.data.examples[i]
        tokens = self.method.choose_tokens(ex, rng)
        concepts = [self.data.concept(t) for t in tokens]
        prompt = caption(concepts, rng.choice(cfg.templates))
        pixels = to_tensor(ex.image, size)
        named = [t for t in tokens if t in ex.masks]
        # the unnamed concepts' masks ride along so the loss can leave their pixels out
        names = named + [t for t in ex.tokens if t in ex.masks and t not in named]
        masks = torch.cat([mask_tensor(ex.masks[t], size) for t in names]) if names else torch.zeros(0, size, size)
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

    def batch(self, step: int, micro: int) -> dict:
        rng = random.Random(step_seed(self.cfg.seed, step, micro))
        samples = [self.sample(rng) for _ in range(self.cfg.batch_size)]
        return {
            "keys": [s["key"] for s in samples],
            "pixels": torch.stack([s["pixels"] for s in samples]),
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
            enc = self.encoded_cache[prompt] = locate_concepts(self.base.tokenizer, prompt, self.data.concepts)
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
        return latents_from_moments(vae, torch.stack(params), self.latent_mode, gen)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for p in prompts:
            cacheable = not self.method.trainable_tokens_in(p)
            if cacheable and p in self.text_cache:
                out.append(self.text_cache[p])
                continue
            ids = self.ids_cache.get(p)
            if ids is None:
                ids = self.ids_cache[p] = self.base.tokenizer(
                    p, padding="max_length", max_length=self.base.tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(self.base.device)
            with torch.set_grad_enabled(not cacheable):
                h = self.base.text_encoder(ids)[0][0]
            if cacheable:
                self.text_cache[p] = h.detach()
            out.append(h)
        return torch.stack(out)

    # ---------------------------------------------------------------- loss
    def loss(self, batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        dev, unet = self.base.device, self.base.unet
        z0 = self.latents(batch, gen)
        noise = torch.randn(z0.shape, generator=gen).to(dev)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (z0.shape[0],), generator=gen).to(dev)
        zt = self.scheduler.add_noise(z0, noise, t)
        cond = self.encode_prompts(batch["prompts"])
        store = self.method.attention_store(batch)
        if store is not None:
            from .attention import capture_attention

            with capture_attention(unet, store):
                pred = unet(zt.to(self.dtype), t, cond.to(self.dtype)).sample.float()
        else:
            pred = unet(zt.to(self.dtype), t, cond.to(self.dtype)).sample.float()
        target = diffusion_target(self.scheduler, z0, noise, t)
        mask = F.interpolate(batch["loss_mask"].to(dev), size=z0.shape[-2:], mode="area")
        diffusion = masked_mse(pred, target, mask)
        logs = {"diffusion": diffusion.item()}
        extra, extra_logs = self.method.extra_loss(batch, store)
        logs.update(extra_logs)
        total = diffusion if extra is None else diffusion + extra
        logs["loss"] = total.item()
        return total, logs


def _training_scheduler(base: Base):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(base.pipe.scheduler.config)


# ---------------------------------------------------------------- checkpoints

def config_digest(cfg: TrainConfig, method: str, fingerprint: str) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k != "log_file"}  # where logs go does not change training
    blob = json.dumps({"cfg": settings, "method": method, "base": fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_checkpoint(path: Path, method: Method, optimizer: torch.optim.Optimizer, step: int, digest: str) -> None:
    tensors = {f"param/{k}": v.detach().cpu().contiguous() for k, v in method.trainable_state().items()}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"opt/{idx}/{name}"] = val.detach().cpu().contiguous().reshape(val.shape)
    meta = {"step": str(step), "digest": digest}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_checkpoint(path: Path, method: Method, optimizer: torch.optim.Optimizer, digest: str) -> int:
    start_over = f"delete {path.parent} to start over (or run without --resume)"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("digest") != digest:
                raise UserError(f"checkpoint {path} was made with other settings, method or base: use the same ones, or {start_over}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        step = int(meta["step"])
        method.load_trainable_state({k[6:]: v for k, v in tensors.items() if k.startswith("param/")})
        state = {}
        for k, v in tensors.items():
            if k.startswith("opt/"):
                _, idx, name = k.split("/", 2)
                state.setdefault(int(idx), {})[name] = v
        sd = optimizer.state_dict()
        sd["state"] = state
        optimizer.load_state_dict(sd)
    except UserError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}): {start_over}") from e
    return step


def remove_stale_temps(target: Path) -> None:
    """Temp files of `target` left by a run killed while writing it (see bundle.atomic_write)."""
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- the loop

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
) -> Path | None:
    """Train and write the bundle to `out`. Returns its path, or None when
    `stop_after` ended this run early (the checkpoint holds the state)."""
    from accelerate import Accelerator

    out = Path(out)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".ckpt")
    ckpt = work / "checkpoint.safetensors"
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=base.device.type == "cpu")
    method = method_cls(base, data, cfg)
    groups = method.setup()
    lr = cfg.lr * (cfg.batch_size * cfg.grad_accum * accelerator.num_processes if cfg.scale_lr else 1)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
    trainer = Trainer(method, base, data, cfg, reg)
    digest = config_digest(cfg, method.name, base.fingerprint)
    start = 0
    if work.is_dir():
        remove_stale_temps(ckpt)
    if out.parent.is_dir():
        remove_stale_temps(out)
    if resume and ckpt.is_file():
        start = load_checkpoint(ckpt, method, optimizer, digest)
    unet, text_encoder, optimizer = accelerator.prepare(base.unet, base.text_encoder, optimizer)
    params = [p for g in groups for p in g["params"]]

    bar = _progress(progress, cfg.steps, start, method.name)
    log = open(cfg.log_file, "a", encoding="utf-8") if cfg.log_file else None
    try:
        for step in range(start, cfg.steps):
            if stop_after is not None and step >= stop_after:
                save_checkpoint(ckpt, method, optimizer, step, digest)
                return None
            optimizer.zero_grad(set_to_none=True)
            logs_sum: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, micro) + 1)
                with accelerator.autocast():
                    loss, logs = trainer.loss(trainer.batch(step, micro), gen)
                if not torch.isfinite(loss):
                    where = f"; the last good checkpoint is {ckpt}" if ckpt.is_file() else ""
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at step {step}{where}: lower --lr or use fp32; nothing was written to {out}"
                    )
                accelerator.backward(loss / cfg.grad_accum)
                for k, v in logs.items():
                    logs_sum[k] = logs_sum.get(k, 0.0) + v / cfg.grad_accum
            if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            method.after_step()
            if bar:
                bar[0].update(bar[1], advance=1, loss=logs_sum.get("loss", math.nan))
            if log:
                log.write(json.dumps({"step": step + 1, **{k: round(v, 6) for k, v in logs_sum.items()}}) + "\n")
                log.flush()  # a killed run keeps every step it logged
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(ckpt, method, optimizer, step + 1, digest)
    finally:
        if log:
            log.close()
        if bar:
            bar[0].stop()
        method.teardown()
    save_bundle(method.to_bundle(), out)
    if work.is_dir():
        ckpt.unlink(missing_ok=True)
        remove_stale_temps(ckpt)
        try:
            work.rmdir()
        except OSError:  # the user's own files are in it
            pass
    return out


def _progress(enabled: bool, total: int, start: int, name: str):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                 TimeRemainingColumn())
    task = p.add_task(name, total=total, completed=start, loss=math.nan)
    p.start()
    return p, task
