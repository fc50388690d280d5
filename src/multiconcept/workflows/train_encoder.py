"""train-encoder: FastComposer's training. Subject-annotated images in, a model folder out.

    multiconcept train-encoder --method fastcomposer --data toyworld --base toyworld --out fc --lr 1e-4
    accelerate launch --config_file configs/accelerate/ddp-8gpu-bf16.yaml -m multiconcept train-encoder \
        --method fastcomposer --data DIR --workers 4 ...

The same command runs in one process or under `accelerate launch`: micro-batch
`micro` of a step is the same data wherever it runs (the loop numbers micro-
batches over every process), the loop averages gradients over the processes,
and only the main process writes files, logs and the progress bar. So P
processes train what one process does with --grad-accum P (a test checks it).

Loss (FastComposer §3.3): L = L_noise + λ·L_loc, λ = 1e-3.
- L_noise: ε-prediction MSE; with p = 0.5 per sample it is masked to the
  union of the sample's subject masks.
- L_loc: balanced L1 of each subject token's cross-attention map against its
  mask (`losses.balanced_l1_loc_loss`), averaged over subjects, heads, batch
  and the attn2 layers of the middle blocks. The paper's "middle blocks" of
  SD 1.5 (down 1, down 2, mid, up 1, up 2) are exactly the layers whose maps
  are smaller than the latent, i.e. every level but the outermost; we use
  that rule for any UNet: ToyWorld (16² latent) reads the 8² and 4² layers
  (down 1, mid, up 1), the tiny test UNet its 8² layers (down 1, mid, up 0).
- Captions are dropped to "" with p = 0.1 (classifier-free guidance) and each
  subject is kept (marker + image) with p = 0.9.

Data: `--data` (workflows/encoder_data.py): 'toyworld' (rendered on the fly), a folder
`multiconcept dataset build` wrote or its URL (streamed), WebDataset tars, or a subjects.jsonl folder.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..attention import AttentionStore, resize_mask
from ..data import mask_tensor, to_tensor
from ..errors import require
from ..latents import choose_latent_mode, latents_from_moments
from ..losses import balanced_l1_loc_loss, denoising_loss
from ..methods.fastcomposer import (
    MARKER,
    FastComposer,
    FastComposerConfig,
    augment_crop,
    load_image_encoder,
    parse_subject_prompt,
    subject_crop,
)
from ..methods.finetune import config_digest
from ..methods.settings import config_dict
from ..models import Base, SingleFile, load_base
from ..models.compiled import compile_denoiser
from ..models.flow import refuse_flow_base
from ..prompts import find_word_spans
from ..training import (
    LoopSettings,
    Progress,
    adamw,
    discard_checkpoint,
    main_process_value,
    make_accelerator,
    run,
    step_seed,
    wrapper_syncs_gradients,
)
from .encoder_data import (
    MANIFEST,
    Annotation,
    FolderSubjects,
    Record,
    StreamSubjects,
    ToyWorldSubjects,
    open_data,
    write_subject_folder,
)

CHECKPOINT = "checkpoint.safetensors"
TUNING_FREE = "train-encoder (FastComposer, Subject-Diffusion)"
SAMPLE_LOG = "samples.jsonl"

# ---------------------------------------------------------------- data


def insert_markers(caption: str, subjects: list[Annotation]) -> tuple[str, list[Annotation]]:
    """Put an image marker after each subject's label; returns the prompt and the
    subjects in marker order (= image order)."""
    used, placed = [], []
    for s in subjects:
        spans = [sp for sp in find_word_spans(caption, s.label) if sp not in used]
        require(bool(spans), f"subject {s.label!r} is not (or not often enough) in the caption {caption!r}")
        used.append(spans[0])
        placed.append((spans[0][1], s))
    placed.sort(key=lambda p: p[0])
    prompt = caption
    for end, _ in reversed(placed):
        prompt = f"{prompt[:end]} {MARKER}{prompt[end:]}"
    return prompt, [s for _, s in placed]


def make_sample(record: Record, cfg: FastComposerConfig, tokenizer, size: int, crop_size: int, rng: random.Random) -> dict:
    """One training sample: caption with markers, subject crops, masks, loss mask."""
    if rng.random() < cfg.caption_dropout:
        prompt, subjects = "", []
    else:
        kept = [s for s in record.subjects if rng.random() < cfg.subject_keep][: cfg.max_subjects]
        prompt, subjects = insert_markers(record.caption, kept)
    parsed = parse_subject_prompt(tokenizer, prompt, len(subjects), truncate=True)
    subjects = [subjects[i] for i in parsed.kept]
    noise_rng = np.random.default_rng(rng.getrandbits(63))
    crops = [augment_crop(subject_crop(record.image, s.mask, s.box, crop_size, noise_rng), noise_rng, cfg)
             for s in subjects]
    masks = [mask_tensor(Image.fromarray(s.mask.astype(np.uint8) * 255), size)[0] for s in subjects]
    masks = torch.stack(masks) if masks else torch.zeros(0, size, size)
    masked = bool(subjects) and rng.random() < cfg.mask_loss_p
    return {
        "prompt": parsed,
        "pixels": to_tensor(Image.fromarray(record.image), size),
        "crops": torch.stack(crops) if crops else torch.zeros(0, 3, crop_size, crop_size),
        "masks": masks,
        "loss_mask": masks.amax(0, keepdim=True) if masked else torch.ones(1, size, size),
    }


def collate(samples: list[dict]) -> dict:
    k = max(len(s["crops"]) for s in samples)
    b, size = len(samples), samples[0]["pixels"].shape[-1]
    tokens = torch.zeros(b, max(k, 1), dtype=torch.long)
    valid = torch.zeros(b, max(k, 1), dtype=torch.bool)
    masks = torch.zeros(b, max(k, 1), size, size)
    for i, s in enumerate(samples):
        n = len(s["crops"])
        tokens[i, :n] = torch.tensor(s["prompt"].positions, dtype=torch.long)
        valid[i, :n] = True
        masks[i, :n] = s["masks"]
    return {
        "prompts": [s["prompt"] for s in samples],
        "pixels": torch.stack([s["pixels"] for s in samples]),
        "crops": [s["crops"] for s in samples],
        "loss_mask": torch.stack([s["loss_mask"] for s in samples]),
        "subject_tokens": tokens, "subject_valid": valid, "subject_masks": masks, "max_subjects": k,
    }


# ---------------------------------------------------------------- the loss


def middle_resolutions(latent_size: int) -> list[int]:
    """Every UNet level but the outermost: the paper's middle blocks (see module doc)."""
    sizes, s = [], latent_size
    while s > 1:
        s = (s + 1) // 2  # stride-2 conv, pad 1
        sizes.append(s)
    return sizes


class EncoderJob:
    """FastComposer's (and Subject-Diffusion's) training as a job of the training loop; `graph` is the
    trainer, or accelerate's wrapper of it where that wrapper shards and syncs gradients (DeepSpeed, FSDP)."""

    def __init__(self, trainer: "EncoderTrainer", graph, trainables: dict[str, torch.Tensor], acc):
        self.trainer, self.graph, self.trainables, self.acc = trainer, graph, trainables, acc
        self.stream = trainer.data if isinstance(trainer.data, StreamSubjects) else None

    def loss(self, step: int, micro: int, gen: torch.Generator):
        return self.graph(self.trainer.batch(step, micro), gen)

    def state(self) -> dict[str, torch.Tensor]:
        return {**self.trainables, **(self.stream.state() if self.stream else {})}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self.trainables.items():
                p.copy_(tensors[k])
        if self.stream:
            self.stream.load_state(tensors)

    def after_step(self, step: int, extra: dict) -> dict | None:
        """A streamed run's position, and its count of damaged samples skipped (over every process) in the log."""
        if not self.stream:
            return None
        self.stream.steps_done = step
        found = torch.tensor(len(self.stream.skipped), device=self.acc.device)
        self.stream.skipped.clear()
        if self.acc.num_processes > 1:
            found = self.acc.reduce(found, "sum")
        extra["skipped"] = extra.get("skipped", 0) + int(found)
        return {"skipped": extra["skipped"]}


@dataclass
class MicroBatchMaker:
    """(records, step, micro) -> a micro-batch, every random choice from the generator of (seed, step, micro)
    as the loop seeds everything else; a plain object, so DataLoader workers can run it."""

    make_sample: Callable
    collate: Callable
    cfg: object
    tokenizer: object
    size: int
    crop_size: int

    def __call__(self, records: list[Record], step: int, micro: int) -> dict:
        rng = random.Random(step_seed(self.cfg.seed, step, micro))
        return self.collate([self.make_sample(r, self.cfg, self.tokenizer, self.size, self.crop_size, rng) for r in records])


class EncoderTrainer(nn.Module):
    """Data sampling and the loss; a module, so accelerate can wrap it (DeepSpeed, FSDP)."""

    def __init__(self, model: FastComposer, data, cfg: FastComposerConfig):
        super().__init__()
        from diffusers import DDPMScheduler

        self.model = model  # registers the image encoder and fusion MLP
        self.unet = model.base.unet
        self.data, self.cfg = data, cfg
        base = model.base
        self.size = cfg.resolution or base.resolution
        self.loc_resolutions = list(cfg.loc_resolutions) or middle_resolutions(self.size // base.pipe.vae_scale_factor)
        self.scheduler = DDPMScheduler.from_config(base.pipe.scheduler.config)  # the paper trains with DDPM's 1000 steps
        self.latent_mode: str | None = None  # chosen on the first batch (see choose_latent_mode)
        self.prepare = MicroBatchMaker(self.make_sample, self.collate, cfg, model.tokenizer, self.size,
                                       model.encoder.image_size)

    def batch(self, step: int, micro: int = 0) -> dict:
        """`micro` counts micro-batches over every process (the loop's numbering)."""
        if isinstance(self.data, StreamSubjects):
            return self.data.micro_batch(step, micro)
        return self.prepare(self.data.draw(self.cfg.batch_size, step_seed(self.cfg.seed, step, micro)), step, micro)

    # what a batch is made of: another encoder's trainer (Subject-Diffusion's) gives its own
    make_sample = staticmethod(make_sample)
    collate = staticmethod(collate)

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        vae = self.model.base.vae
        pixels = pixels.to(vae.device, vae.dtype)
        if self.latent_mode is None:
            self.latent_mode = main_process_value(choose_latent_mode(self.cfg.latents, vae, pixels[:1]))
        return latents_from_moments(vae, vae.encode(pixels).latent_dist.parameters, self.latent_mode, gen)

    def forward(self, batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        cfg, dev = self.cfg, self.model.base.device
        z0 = self.latents(batch["pixels"], gen)
        _, cond = self.model.condition(batch["prompts"], batch["crops"])
        store = None
        if batch["max_subjects"]:
            store = AttentionStore(self.loc_resolutions, token_indices=batch["subject_tokens"].to(dev),
                                   with_grad=cfg.loc_weight > 0)
        noise_loss = denoising_loss(self.unet, self.scheduler, z0, cond, gen, batch["loss_mask"], store)
        logs = {"noise": noise_loss.item()}
        total = noise_loss
        if store is not None:
            loc, inside = localisation(store, batch["subject_masks"].to(dev), batch["subject_valid"].to(dev))
            logs.update(loc=loc.item(), mass_in_mask=inside.item())
            if cfg.loc_weight > 0:
                total = total + cfg.loc_weight * loc
        logs["loss"] = total.item()
        return total, logs


def localisation(store: AttentionStore, masks: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_loc, share of each subject token's attention inside its mask), both
    averaged over subjects, batch and layers (each layer's heads averaged first)."""
    losses, inside = [], []
    for maps in store.layer_maps().values():  # batch heads subject h w
        maps = maps.mean(1)
        losses.append(balanced_l1_loc_loss(maps, masks, valid))
        m = resize_mask(masks, maps.shape[-2:]).to(maps.dtype)
        share = (maps * m).sum(dim=(-2, -1)) / maps.sum(dim=(-2, -1)).clamp_min(1e-12)
        inside.append((share * valid).sum() / valid.sum().clamp_min(1))
    require(bool(losses), "no cross-attention layer matched the localisation resolutions: check loc_resolutions")
    return torch.stack(losses).mean(), torch.stack(inside).mean().detach()


# ---------------------------------------------------------------- the loop


def train_encoder(
    data: str,
    out: str | Path,
    *,
    base: Base | str | SingleFile | None = None,
    cfg: FastComposerConfig | None = None,
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
    """Train FastComposer and write the model folder `out`. Returns it, or
    None when `stop_after` ended the run early (the checkpoint in `out` holds
    the state; `resume=True` continues). `max_minutes` stops at the first step
    past the budget and writes the model as trained so far (and a checkpoint).
    Streamed data: `workers` DataLoader processes make the micro-batches;
    `sample_log` appends each micro-batch's sample keys to out/samples.jsonl."""
    cfg = cfg or FastComposerConfig()
    source, out, acc, base = start(data, out, base, cfg, device, dtype)
    torch.manual_seed(cfg.seed)
    model = FastComposer(base, load_image_encoder(image_encoder, base))
    trainables = model.set_trainable(cfg)
    require(bool(trainables), "nothing trains: enable train_unet, train_fusion or vision_layers")
    optimizer = adamw(trainables.values(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
    trainer = EncoderTrainer(model, source, cfg)
    digest = config_digest(cfg, f"fastcomposer|{source.name}|{image_encoder}", base.fingerprint)
    outcome = fit(trainer, trainables, optimizer, cfg, acc, out, name="fastcomposer", digest=digest, resume=resume,
                  progress=progress, stop_after=stop_after, max_minutes=max_minutes, on_step=on_step, cancel=cancel,
                  log_file=str(out / "train_log.jsonl"), workers=workers, sample_log=sample_log)
    if outcome is None:
        return None
    if acc.is_main_process:
        meta = {"method": "fastcomposer", "data": source.name, "image_encoder_source": image_encoder,
                "settings": config_dict(cfg), "steps_done": outcome.steps_done, "loc_resolutions": trainer.loc_resolutions,
                "stopped_for_time": outcome.reason == "time", "train_seconds": round(outcome.seconds, 1)}
        model.save(out, meta, unet=cfg.train_unet)
        if outcome.finished:  # a run stopped for time keeps its checkpoint: --resume continues
            discard_checkpoint(out / CHECKPOINT)
    return out


def start(data: str, out, base, cfg, device: str, dtype: str):
    """A tuning-free model's training inputs: (data source, out folder, accelerator, base). The data and
    the folder are checked before any model loads."""
    source = open_data(data, seed=cfg.seed)
    out = Path(out)
    require(not (out.exists() and not out.is_dir()), f"--out {out} is a file: give a folder")
    # subjects dropped from a caption leave the image encoder without gradient on some steps
    acc = make_accelerator(cfg.mixed_precision, device=device, find_unused_parameters=True)
    refuse_flow_base(base, TUNING_FREE)
    if not isinstance(base, Base):
        base = load_base(base, device=str(acc.device) if device == "auto" else device, dtype=dtype)
    refuse_flow_base(base, TUNING_FREE)  # a hub id is known only once loaded
    return source, out, acc, base


def fit(trainer, trainables: dict, optimizer, cfg, acc, out: Path, *, name: str, digest: str, resume: bool,
        progress: bool, stop_after: int | None, max_minutes: float | None, on_step=None, cancel=None, lr_at=None,
        log_file: str = "", workers: int = 0, sample_log: bool = False):
    """A tuning-free model's training on the one loop, its checkpoint in `out`: the loop's outcome, or None
    when `stop_after` or `cancel` ended it (the checkpoint holds the state). Every process returns together."""
    if wrapper_syncs_gradients(acc):
        graph, optimizer = acc.prepare(trainer, optimizer)
    else:  # the loop averages the gradients over the processes itself
        graph, optimizer = trainer, acc.prepare(optimizer)
    stream = trainer.data if isinstance(trainer.data, StreamSubjects) else None
    out.mkdir(parents=True, exist_ok=True)  # the per-step log opens before the first checkpoint
    if stream:
        stream.start(trainer.prepare, cfg.batch_size, cfg.grad_accum, acc.num_processes, acc.process_index, workers,
                     out / SAMPLE_LOG if sample_log else None)
    settings = LoopSettings(steps=cfg.steps, seed=cfg.seed, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                            mixed_precision=cfg.mixed_precision, checkpoint_every=cfg.checkpoint_every,
                            max_minutes=max_minutes, progress_bar=progress, name=name, log_file=log_file)
    uncompile = compile_denoiser(trainer.unet, cfg.compile)
    try:
        outcome = run(EncoderJob(trainer, graph, trainables, acc), optimizer, list(trainables.values()), settings,
                      checkpoint=out / CHECKPOINT, digest=digest, resume=resume, accelerator=acc, stop_after=stop_after,
                      lr_at=lr_at, on_step=on_step, cancel=cancel)
    finally:
        uncompile()
        if stream:
            stream.close()
    if outcome.reason in ("stopped", "cancelled"):
        return None
    acc.wait_for_everyone()
    return outcome


__all__ = ["MANIFEST", "Annotation", "EncoderTrainer", "FolderSubjects", "Record", "StreamSubjects", "ToyWorldSubjects",
           "collate", "make_sample", "open_data", "train_encoder", "write_subject_folder"]
