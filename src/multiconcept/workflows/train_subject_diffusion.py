"""train-encoder --method subject-diffusion: Subject-Diffusion's training on the one loop.

    multiconcept train-encoder --method subject-diffusion --data toyworld --out sd/ --lr 1e-4

Loss (Subject-Diffusion §3.4): L = ‖ε − ε_θ(z_t, t, text, subjects, boxes, map)‖² + λ·L_attn
(v instead of ε on v-prediction bases such as ToyWorld), L_attn being
FastComposer's balanced L1 (`train_encoder.localisation`) on the cross-attention
of each subject's placeholder and of its label in the clause, against the
subject's mask, over the middle blocks; λ = 0.01 as in the released code.

Guidance dropout, one draw r per sample (the released code's split): r < 5 %
drops the text (prompt ''), 5-10 % the text and the image condition, 10-15 % the
image condition alone (the location map, and the object tokens unless
drop_objects=False). Each subject image is FastComposer's crop (the subject on
noise, square) with its augmentations, grayscale left out (on ToyWorld colours
are much of the subject's identity).

Data are train-encoder's (`--data toyworld | DIR`); ToyWorld renders fresh
scenes with free placement (any place, 0.6-1.0 of the base's size) in half of
them, because location control must see boxes the base never drew, with
captions that name kinds only and leave every part to the subject images.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..attention import AttentionStore
from ..data import mask_tensor, to_tensor
from ..losses import denoising_loss
from ..methods.fastcomposer import FastComposerConfig, augment_crop, load_image_encoder, subject_crop
from ..methods.finetune import config_digest
from ..methods.subject_diffusion import (
    SubjectDiffusion,
    SubjectDiffusionConfig,
    adapter_gates,
    box_of,
    fusion_prompt,
    location_map,
    place_mask,
)
from ..models import Base, SingleFile
from ..training import Progress, adamw, discard_checkpoint
from .train_encoder import CHECKPOINT, EncoderTrainer, Record, fit, localisation, start


def normalised_box(box, h: int, w: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    return x0 / w, y0 / h, x1 / w, y1 / h


def make_sample(record: Record, cfg: SubjectDiffusionConfig, tokenizer, size: int, crop_size: int,
                rng: random.Random) -> dict:
    """One training sample: the fusion prompt, subject crops, boxes, location map, masks, dropout."""
    subjects = list(record.subjects)
    if len(subjects) > cfg.max_subjects:
        subjects = sorted(rng.sample(range(len(subjects)), cfg.max_subjects))
        subjects = [record.subjects[i] for i in subjects]
    r = rng.random()
    drop_text = r < cfg.text_dropout + cfg.text_mask_dropout
    drop_image = cfg.text_dropout <= r < cfg.text_dropout + cfg.text_mask_dropout + cfg.mask_dropout
    labels = [s.label for s in subjects]
    prompt = fusion_prompt(tokenizer, "", []) if drop_text else fusion_prompt(tokenizer, record.caption, labels, True)
    h, w = record.image.shape[:2]
    noise_rng = np.random.default_rng(rng.getrandbits(63))
    aug = FastComposerConfig(augment=cfg.augment, aug_grayscale_p=0.0)
    crops = [augment_crop(subject_crop(record.image, s.mask, s.box, crop_size, noise_rng), noise_rng, aug)
             for s in subjects]
    masks = [mask_tensor(Image.fromarray(s.mask.astype(np.uint8) * 255), size)[0] for s in subjects]
    boxes = [normalised_box(s.box if s.box is not None else box_of(s.mask), h, w) for s in subjects]
    if cfg.location_from == "box":
        canvas = [place_mask(None, b, size) for b in boxes]
    else:
        canvas = [m.numpy() > 0.5 for m in masks]
    return {
        "prompt": prompt, "text_on": not drop_text, "image_on": not drop_image,
        "pixels": to_tensor(Image.fromarray(record.image), size),
        "crops": torch.stack(crops) if crops else torch.zeros(0, 3, crop_size, crop_size),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "masks": torch.stack(masks) if masks else torch.zeros(0, size, size),
        "location": location_map(canvas, size),
    }


def collate(samples: list[dict]) -> dict:
    k = max(1, max(len(s["crops"]) for s in samples))
    b, size = len(samples), samples[0]["pixels"].shape[-1]
    boxes, valid = torch.zeros(b, k, 4), torch.zeros(b, k, dtype=torch.bool)
    tokens, token_valid = torch.zeros(b, 2 * k, dtype=torch.long), torch.zeros(b, 2 * k, dtype=torch.bool)
    masks = torch.zeros(b, 2 * k, size, size)
    for i, s in enumerate(samples):
        n = len(s["crops"])
        boxes[i, :n], valid[i, :n] = s["boxes"], True
        if s["text_on"] and n:
            p = s["prompt"]
            tokens[i, :n], tokens[i, k:k + n] = torch.tensor(p.placeholders), torch.tensor(p.entities)
            token_valid[i, :n] = token_valid[i, k:k + n] = True
            masks[i, :n] = masks[i, k:k + n] = s["masks"]
    return {
        "prompts": [s["prompt"] for s in samples], "crops": [s["crops"] for s in samples],
        "pixels": torch.stack([s["pixels"] for s in samples]),
        "boxes": boxes, "valid": valid, "text_on": torch.tensor([s["text_on"] for s in samples]),
        "image_on": torch.tensor([s["image_on"] for s in samples]),
        "location": torch.stack([s["location"] for s in samples]),
        "tokens": tokens, "token_valid": token_valid, "token_masks": masks,
    }


class SubjectDiffusionTrainer(EncoderTrainer):
    """FastComposer's trainer (data drawing per step, latents, the middle-block resolutions,
    DDPM) with Subject-Diffusion's samples and loss."""

    make_sample = staticmethod(make_sample)
    collate = staticmethod(collate)

    def forward(self, batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        cfg, model, dev = self.cfg, self.model, self.model.base.device
        z0 = self.latents(batch["pixels"], gen)
        b, k = batch["valid"].shape
        counts = [len(c) for c in batch["crops"]]
        pooled = patches = None
        if sum(counts):
            pooled, flat = model.subject_features(torch.cat([c for c in batch["crops"] if len(c)]))
            patches = flat.new_zeros(b, k, *flat.shape[1:])
            patches[batch["valid"].to(dev)] = flat
        else:
            p = model.encoder.vision.config
            patches = torch.zeros(b, k, (p.image_size // p.patch_size) ** 2, p.hidden_size, device=dev)
        starts = np.cumsum([0] + counts)
        texted = [i for i in range(b) if batch["text_on"][i] and counts[i]]
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in texted]) if texted else torch.zeros(0, dtype=torch.long)
        text = model.text_states(batch["prompts"], pooled[rows] if pooled is not None else None)
        image_on = batch["image_on"].to(dev)
        keep_objects = batch["valid"].to(dev) & (image_on[:, None] if cfg.drop_objects else True)
        gligen = model.gligen(patches, batch["boxes"], keep_objects)
        maps = batch["location"].to(dev) * image_on[:, None, None, None].float()
        channels = model.extra_channels(maps, b, z0.shape[-2:])
        store = None
        if cfg.attention_control and batch["token_valid"].any():
            store = AttentionStore(self.loc_resolutions, token_indices=batch["tokens"].to(dev), with_grad=cfg.loc_weight > 0)
        noise = denoising_loss(model.unet, self.scheduler, z0, text, gen, torch.ones(b, 1, self.size, self.size), store,
                               extra_channels=channels, cross_attention_kwargs=gligen)
        logs, total = {"noise": noise.item()}, noise
        if store is not None:
            loc, inside = localisation(store, batch["token_masks"].to(dev), batch["token_valid"].to(dev))
            logs.update(loc=loc.item(), mass_in_mask=inside.item())
            if cfg.loc_weight > 0:
                total = total + cfg.loc_weight * loc
        gates = adapter_gates(model.unet)
        if len(gates):
            logs["gate"] = gates.abs().mean().item()
        logs["loss"] = total.item()
        return total, logs


def train_subject_diffusion(
    data: str,
    out: str | Path,
    *,
    base: Base | str | SingleFile | None = None,
    cfg: SubjectDiffusionConfig | None = None,
    image_encoder: str | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    max_minutes: float | None = None,
    device: str = "auto",
    dtype: str = "fp32",
    on_step: Callable[[Progress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    workers: int = 0,
    sample_log: bool = False,
) -> Path | None:
    """Train Subject-Diffusion and write the model folder `out` (as `train_encoder.train_encoder`:
    None when `stop_after` ended the run early; `max_minutes` writes the model so far and keeps the
    checkpoint, so `resume=True` continues). Every step is logged to `out/train_log.jsonl`; `workers` and
    `sample_log` as train_encoder's."""
    cfg = cfg or SubjectDiffusionConfig()
    source, out, acc, base = start(data, out, base, cfg, device, dtype)
    torch.manual_seed(cfg.seed)
    model = SubjectDiffusion(base, load_image_encoder(image_encoder, base), cfg)
    trainables = model.set_trainable()
    optimizer = adamw(trainables.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    trainer = SubjectDiffusionTrainer(model, source, cfg)
    digest = config_digest(cfg, f"subject-diffusion|{source.name}|{image_encoder}", base.fingerprint)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    def lr_at(step: int, _progress: float) -> float:  # the paper's linear warm-up, then constant
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr

    outcome = fit(trainer, trainables, optimizer, cfg, acc, out, name="subject-diffusion", digest=digest, resume=resume,
                  progress=progress, stop_after=stop_after, max_minutes=max_minutes, on_step=on_step, cancel=cancel,
                  lr_at=lr_at, log_file=str(out / "train_log.jsonl"), workers=workers, sample_log=sample_log)
    if outcome is None:
        return None
    if acc.is_main_process:
        meta = {"data": source.name, "image_encoder_source": image_encoder, "steps_done": outcome.steps_done,
                "loc_resolutions": trainer.loc_resolutions, "stopped_for_time": outcome.reason == "time",
                "train_seconds": round(outcome.seconds, 1), "ablation": cfg.ablation}
        model.save(out, meta)
        if outcome.finished:
            discard_checkpoint(out / CHECKPOINT)
    return out


__all__ = ["SubjectDiffusionTrainer", "collate", "make_sample", "train_subject_diffusion"]
