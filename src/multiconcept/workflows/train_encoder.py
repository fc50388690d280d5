"""train-encoder: FastComposer's training. Subject-annotated images in, a model folder out.

    multiconcept train-encoder --method fastcomposer --data toyworld --base toyworld --out fc --lr 1e-4
    accelerate launch --multi_gpu $(which multiconcept) train-encoder --method fastcomposer --data DIR ...
    torchrun --nproc_per_node 2 $(which multiconcept) train-encoder ...   (checked: 2 CPU processes, gloo)

The same command runs in one process or under `accelerate launch`: every
process draws its own samples (seeded by step and process index), gradients
are averaged by accelerate, and only the main process writes files.

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

Data: `--data toyworld` draws fresh `toyworld.subject_dataset` records every
step; `--data DIR` reads a folder:

    DIR/subjects.jsonl    one JSON object per line (paths relative to DIR):
      {"image": "000001.png",
       "caption": "a red star on the left and a blue circle on a gray background",
       "subjects": [{"label": "star",   "mask": "000001_0.png", "box": [x0, y0, x1, y1]},
                    {"label": "circle", "mask": "000001_1.png"}]}

`label` is the subject's noun as written in the caption (its first unused
whole-word occurrence gets the image marker); `mask` is white-on-black at the
image's size; `box` (x1/y1 exclusive) is optional, default the mask's extent.
`write_subject_folder` writes this format.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..attention import AttentionStore, resize_mask
from ..bundle import atomic_write
from ..data import load_image, load_mask, mask_tensor, to_tensor
from ..errors import UserError, require
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
from ..prompts import find_word_spans
from ..training import LoopSettings, Progress, discard_checkpoint, make_accelerator, run, step_seed

MANIFEST = "subjects.jsonl"
CHECKPOINT = "checkpoint.safetensors"

# ---------------------------------------------------------------- data


@dataclass
class Annotation:
    label: str  # the subject's noun in the caption
    mask: np.ndarray  # bool H W
    box: tuple[int, int, int, int] | None = None


@dataclass
class Record:
    image: np.ndarray  # uint8 H W 3
    caption: str
    subjects: list[Annotation]


class ToyWorldSubjects:
    """Fresh `toyworld.subject_dataset` records on every draw (never a repeat), laid
    out as the ToyWorld base's training scenes are (one centred subject or a
    left/right pair), so the tuned UNet does not have to learn new layouts.
    Captions name each subject's noun, size and place but not its colour or
    pattern: on ToyWorld those are the identity, and a caption that says them
    lets the model ignore the subject crops (the first encoders, trained on
    full captions, carried almost no colour)."""

    def __init__(self, layout: str = "fixed"):
        self.layout = layout  # "free": the world's five places and two sizes (location control must see them)
        # in the checkpoint digest: older runs drew full captions
        self.name = "toyworld (captions without colour or pattern)" + ("" if layout == "fixed" else f", {layout} layout")

    def draw(self, n: int, seed: int) -> list[Record]:
        from ..toyworld import subject_dataset

        return [Record(r.image, r.caption, [Annotation(s.label, s.mask, tuple(s.box)) for s in r.subjects])
                for r in subject_dataset(n, seed, layout=self.layout, appearance=False)]


class CreatureSubjects:
    """Fresh ToyWorld creature scenes on every draw (`toyworld.creatures.subject_scene`): one or two
    subjects, of one kind in a good share of pairs, placed freely in half the scenes (the base's layouts
    otherwise, overlaps included); captions name kinds, and places in only part of the base-layout scenes,
    never a part: whose robot it is, only the subject images can say."""

    name = "toyworld creatures (captions name kinds only)"

    def draw(self, n: int, seed: int) -> list[Record]:
        from ..toyworld import creatures

        rng = np.random.default_rng(seed)
        records = []
        for _ in range(n):
            scene, order = creatures.subject_scene(rng)
            subjects = [scene.subjects[i] for i in order]
            records.append(Record(scene.image, scene.caption,
                                  [Annotation(s.creature.kind, s.mask, tuple(s.box)) for s in subjects]))
        return records


class FolderSubjects:
    """The `subjects.jsonl` folder format (module docstring); images load when drawn."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.name = str(self.folder.resolve())
        path = self.folder / MANIFEST
        require(path.is_file(), f"{self.folder} has no {MANIFEST}: write one JSON record per line "
                                "(see `multiconcept train-encoder --help`), or pass --data toyworld")
        self.rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                self.rows.append(self._check(line, n, path))
        require(bool(self.rows), f"{path} holds no records: add one JSON object per line")

    def _check(self, line: str, n: int, path: Path) -> dict:
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not JSON ({e.msg}): write one JSON object per line") from e
        require(isinstance(row, dict) and isinstance(row.get("image"), str) and isinstance(row.get("caption"), str)
                and isinstance(row.get("subjects"), list),
                f"{where} needs \"image\", \"caption\" and a \"subjects\" list")
        require((self.folder / row["image"]).is_file(), f"{where}: image {row['image']} does not exist in {self.folder}")
        for s in row["subjects"]:
            require(isinstance(s, dict) and isinstance(s.get("label"), str) and isinstance(s.get("mask"), str),
                    f"{where}: each subject needs a \"label\" and a \"mask\"")
            require((self.folder / s["mask"]).is_file(), f"{where}: mask {s['mask']} does not exist in {self.folder}")
            require(bool(find_word_spans(row["caption"], s["label"])),
                    f"{where}: label {s['label']!r} is not a word of the caption {row['caption']!r}: use the caption's noun")
            box = s.get("box")
            require(box is None or (isinstance(box, list) and len(box) == 4), f"{where}: box must be [x0, y0, x1, y1]")
        return row

    def load(self, i: int) -> Record:
        row = self.rows[i]
        img = load_image(self.folder / row["image"])
        subjects = [Annotation(s["label"], np.asarray(load_mask(self.folder / s["mask"], img.size)) > 127,
                               tuple(s["box"]) if s.get("box") else None) for s in row["subjects"]]
        return Record(np.asarray(img), row["caption"], subjects)

    def draw(self, n: int, seed: int) -> list[Record]:
        rng = random.Random(seed)
        return [self.load(rng.randrange(len(self.rows))) for _ in range(n)]


class ShardSubjects:
    """A folder `multiconcept dataset build` wrote: its finished shards' samples that hold
    subjects with masks, read once and kept in memory (images decoded when drawn)."""

    def __init__(self, folder: str | Path):
        from ..datasets.shards import read_shards

        self.folder = Path(folder)
        self.name = f"shards {self.folder.resolve()}"
        self.samples = [s for s in read_shards(self.folder) if any(e.mask is not None for e in s.entities)]
        require(bool(self.samples), f"{self.folder} holds no finished shard with masked subjects: build it with "
                                    "`multiconcept dataset build`, or re-run that command to finish it")

    def load(self, i: int) -> Record:
        s = self.samples[i]
        subjects = [Annotation(e.label, e.mask, tuple(e.box)) for e in s.entities if e.mask is not None]
        return Record(np.asarray(s.image().convert("RGB")), s.caption, subjects)

    def draw(self, n: int, seed: int) -> list[Record]:
        rng = random.Random(seed)
        return [self.load(rng.randrange(len(self.samples))) for _ in range(n)]


def open_data(spec: str, toyworld_layout: str = "fixed"):
    """'toyworld', 'toyworld:creatures', a folder `multiconcept dataset build` wrote (shards/), or a
    subjects.jsonl folder."""
    if spec == "toyworld":
        return ToyWorldSubjects(toyworld_layout)
    if spec == "toyworld:creatures":
        return CreatureSubjects()
    return ShardSubjects(spec) if (Path(spec) / "shards").is_dir() else FolderSubjects(spec)


def write_subject_folder(records, folder: str | Path) -> Path:
    """Records (ours or `toyworld.SubjectRecord`) → the folder format."""
    from ..toyworld.scenes import save_png

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, r in enumerate(records):
        save_png(np.asarray(r.image), folder / f"{i:06d}.png")
        subs = []
        for j, s in enumerate(r.subjects):
            save_png(np.asarray(s.mask).astype(bool), folder / f"{i:06d}_{j}.png")
            subs.append({"label": s.label, "mask": f"{i:06d}_{j}.png", **({"box": list(s.box)} if s.box is not None else {})})
        lines.append(json.dumps({"image": f"{i:06d}.png", "caption": r.caption, "subjects": subs}))
    atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return folder


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
    """FastComposer's training as a job of the training loop; `graph` is the
    trainer as accelerate prepared it (DDP under `accelerate launch`)."""

    def __init__(self, trainer: "EncoderTrainer", graph, trainables: dict[str, torch.Tensor]):
        self.trainer, self.graph, self.trainables = trainer, graph, trainables

    def loss(self, step: int, micro: int, gen: torch.Generator):
        return self.graph(self.trainer.batch(step, micro), gen)

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.trainables)

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self.trainables.items():
                p.copy_(tensors[k])


class EncoderTrainer(nn.Module):
    """Data sampling and the loss; a module, so accelerate can wrap it (DDP)."""

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

    def batch(self, step: int, micro: int = 0) -> dict:
        """`micro` counts micro-batches over every process (the loop's numbering)."""
        seed = step_seed(self.cfg.seed, step, micro)
        rng = random.Random(seed)
        records = self.data.draw(self.cfg.batch_size, seed)
        crop = self.model.encoder.image_size
        return self.collate([self.make_sample(r, self.cfg, self.model.tokenizer, self.size, crop, rng) for r in records])

    # what a batch is made of: another encoder's trainer (Subject-Diffusion's) gives its own
    make_sample = staticmethod(make_sample)
    collate = staticmethod(collate)

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        vae = self.model.base.vae
        pixels = pixels.to(vae.device, vae.dtype)
        if self.latent_mode is None:
            self.latent_mode = choose_latent_mode(self.cfg.latents, vae, pixels[:1])
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
) -> Path | None:
    """Train FastComposer and write the model folder `out`. Returns it, or
    None when `stop_after` ended the run early (the checkpoint in `out` holds
    the state; `resume=True` continues). `max_minutes` stops at the first step
    past the budget and writes the model as trained so far (and a checkpoint)."""
    cfg = cfg or FastComposerConfig()
    source, out, acc, base = start(data, out, base, cfg, device, dtype)
    torch.manual_seed(cfg.seed)
    model = FastComposer(base, load_image_encoder(image_encoder, base))
    trainables = model.set_trainable(cfg)
    require(bool(trainables), "nothing trains: enable train_unet, train_fusion or vision_layers")
    optimizer = torch.optim.AdamW(list(trainables.values()), lr=cfg.lr, betas=(0.9, 0.999),
                                  weight_decay=cfg.weight_decay, eps=1e-8)
    trainer = EncoderTrainer(model, source, cfg)
    digest = config_digest(cfg, f"fastcomposer|{source.name}|{image_encoder}", base.fingerprint)
    outcome = fit(trainer, trainables, optimizer, cfg, acc, out, name="fastcomposer", digest=digest, resume=resume,
                  progress=progress, stop_after=stop_after, max_minutes=max_minutes, on_step=on_step, cancel=cancel)
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


def start(data: str, out, base, cfg, device: str, dtype: str, toyworld_layout: str = "fixed"):
    """A tuning-free model's training inputs: (data source, out folder, accelerator, base). The data and
    the folder are checked before any model loads."""
    source = open_data(data, toyworld_layout)
    out = Path(out)
    require(not (out.exists() and not out.is_dir()), f"--out {out} is a file: give a folder")
    # subjects dropped from a caption leave the image encoder without gradient on some steps
    acc = make_accelerator(cfg.mixed_precision, device=device, find_unused_parameters=True)
    if not isinstance(base, Base):
        base = load_base(base, device=str(acc.device) if device == "auto" else device, dtype=dtype)
    return source, out, acc, base


def fit(trainer, trainables: dict, optimizer, cfg, acc, out: Path, *, name: str, digest: str, resume: bool,
        progress: bool, stop_after: int | None, max_minutes: float | None, on_step=None, cancel=None, lr_at=None,
        log_file: str = ""):
    """A tuning-free model's training on the one loop, its checkpoint in `out`: the loop's outcome, or None
    when `stop_after` or `cancel` ended it (the checkpoint holds the state). Every process returns together."""
    graph, optimizer = acc.prepare(trainer, optimizer)
    settings = LoopSettings(steps=cfg.steps, seed=cfg.seed, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                            mixed_precision=cfg.mixed_precision, checkpoint_every=cfg.checkpoint_every,
                            max_minutes=max_minutes, progress_bar=progress, name=name, log_file=log_file)
    outcome = run(EncoderJob(trainer, graph, trainables), optimizer, list(trainables.values()), settings,
                  checkpoint=out / CHECKPOINT, digest=digest, resume=resume, accelerator=acc, stop_after=stop_after,
                  lr_at=lr_at, on_step=on_step, cancel=cancel)
    if outcome.reason in ("stopped", "cancelled"):
        return None
    acc.wait_for_everyone()
    return outcome
