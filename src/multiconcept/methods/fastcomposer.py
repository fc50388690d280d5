"""FastComposer (Xiao et al., 2023): tuning-free multi-subject generation.

A subject is given by a reference image, not learned: a CLIP vision tower
turns each subject crop into one embedding, and a fusion MLP writes it into
the text encoder's output at the subject's noun ("a star <img> and a circle
<img> ..."):

    h  = MLP1([t ; v]) + t        MLP1: LN(2d) → Linear(2d, d) → GELU → Linear(d, d)
    h  = MLP2(h) + h              MLP2: LN(d)  → Linear(d, d)  → GELU → Linear(d, d)
    c' = LayerNorm(h)

t is the text hidden state at the flagged token, v the image embedding
(projected to d first when the vision tower's projection size differs; the
paper's ViT-L/14 and SD 1.5 both use 768, so no projection there). Other
positions keep the plain text encoding.

This is a model with its own training (workflows/train_encoder.py) and
sampling (workflows/compose.py), not a per-concept `Method`: it is not in
the method registry. A trained model is a folder:

    fastcomposer.json          base name + fingerprint, vision config, settings
    fusion.safetensors         the fusion MLP
    image_encoder.safetensors  the whole CLIPVisionModelWithProjection (transformers names)
    unet.safetensors           the whole UNet (diffusers names), when it was trained
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..bundle import atomic_write
from ..errors import UserError, require
from ..models import TOYWORLD_DIR, Base, load_base
from ..prompts import Encoded, tokenize_checked
from .base import hp

# "<img>" is ours; "<|image|>" is what the reference release writes.
MARKER = "<img>"
MARKER_PATTERN = re.compile(r"<img>|<\|image\|>")
MODEL_FORMAT = "multiconcept-fastcomposer"
MODEL_VERSION = 1
CONFIG_FILE = "fastcomposer.json"
# OpenAI CLIP's pixel statistics (the paper's ViT-L/14).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------- config


@dataclass
class FastComposerConfig:
    """What trains and how; defaults are the paper's (FastComposer §4, reference release)."""

    # which parts train (paper: full UNet, fusion MLP, last 2 vision layers; text encoder and VAE frozen)
    train_unet: bool = hp(True, "train every UNet weight (paper: yes)")
    train_fusion: bool = hp(True, "train the fusion MLP (paper: yes)")
    vision_layers: int = hp(2, "last N vision-tower layers that train (paper: 2); 0 freezes the tower, -1 trains every layer")
    # losses
    loc_weight: float = hp(1e-3, "λ of the localisation loss (paper: 1e-3; the reference code's default differs); 0 turns it off")
    loc_resolutions: tuple = hp((), "map sizes whose attn2 layers the localisation loss reads; () = every level but the "
                                    "outermost (SD 1.5: down 1, down 2, mid, up 1, up 2)")
    mask_loss_p: float = hp(0.5, "probability that a sample's noise loss is masked to the union of its subject masks")
    caption_dropout: float = hp(0.1, "probability that a caption is dropped to '' (classifier-free guidance)")
    subject_keep: float = hp(0.9, "probability that each subject of a caption is kept (marker + image)")
    max_subjects: int = hp(4, "at most this many subjects per caption (paper: 4)")
    # subject-crop augmentations (paper: zoom, rotation ±30°, colour jitter, blur, grayscale, flip)
    augment: bool = hp(True, "augment subject crops during training (the settings below); False turns all off")
    aug_zoom: float = hp(0.2, "zoom factor drawn from [1 - z, 1 + z] (out: the subject shrinks into noise)")
    aug_rotation: float = hp(30.0, "rotation in degrees drawn from [-r, r] (paper: 30)")
    aug_flip_p: float = hp(0.5, "probability of a horizontal flip")
    aug_jitter: float = hp(0.2, "brightness, contrast and saturation factors drawn from [1 - j, 1 + j]; "
                                "hue is never shifted (on ToyWorld colour is identity)")
    aug_blur_p: float = hp(0.2, "probability of a Gaussian blur (sigma 0.1-2 px at 224 px, scaled with the crop)")
    aug_grayscale_p: float = hp(0.1, "probability of converting the crop to grayscale")
    # optimiser (paper: AdamW lr 1e-5, wd 1e-2, clip 1.0, constant lr, global batch 128 = 16 x 8 GPUs)
    steps: int = hp(150_000, "optimiser steps (paper: 150k)")
    lr: float = hp(1e-5, "AdamW learning rate, constant (paper: 1e-5; ToyWorld needs more, see the benchmark)")
    weight_decay: float = hp(1e-2, "AdamW weight decay (paper: 1e-2)")
    max_grad_norm: float = hp(1.0, "gradient clipping (paper: 1.0)")
    batch_size: int = hp(16, "images per micro-batch and process (paper: 16 per GPU x 8 GPUs)")
    grad_accum: int = hp(1, "micro-batches per optimiser step")
    mixed_precision: str = hp("no", "no | fp16 | bf16 (accelerate; paper: bf16)")
    resolution: int = hp(0, "training image size; 0 = the base's native size")
    seed: int = hp(0, "seed for data, crops, noise and timesteps")
    latents: str = hp("auto", "VAE posterior: sample | mean | auto (mean when a channel's posterior std > 0.5, "
                      "as on ToyWorld's VAE; else sample)")
    checkpoint_every: int = hp(500, "steps between resumable checkpoints")


def apply_settings(cfg: FastComposerConfig, overrides: dict[str, str]) -> FastComposerConfig:
    from .base import apply_overrides

    cfg = apply_overrides(cfg, overrides)
    require(cfg.steps >= 1, f"steps must be at least 1, got {cfg.steps}")
    require(cfg.batch_size >= 1 and cfg.grad_accum >= 1, "batch_size and grad_accum must be at least 1")
    for name in ("mask_loss_p", "caption_dropout", "subject_keep", "aug_flip_p", "aug_blur_p", "aug_grayscale_p"):
        v = getattr(cfg, name)
        require(0.0 <= v <= 1.0, f"{name}={v} is not a probability: give a value in [0, 1]")
    require(0.0 <= cfg.aug_zoom < 1.0 and 0.0 <= cfg.aug_jitter < 1.0,
            f"aug_zoom={cfg.aug_zoom} and aug_jitter={cfg.aug_jitter} must lie in [0, 1)")
    require(0.0 <= cfg.aug_rotation <= 180.0, f"aug_rotation={cfg.aug_rotation} must be degrees in [0, 180]")
    require(cfg.max_subjects >= 1, f"max_subjects must be at least 1, got {cfg.max_subjects}")
    try:
        cfg.loc_resolutions = tuple(int(r) for r in cfg.loc_resolutions if str(r).strip())
    except ValueError as e:
        raise UserError(f"loc_resolutions={cfg.loc_resolutions!r} must be map sizes separated by |, e.g. 8|4") from e
    return cfg


# ---------------------------------------------------------------- image encoder


class SubjectImageEncoder(nn.Module):
    """One embedding per subject crop: CLIP's pooled CLS (after post-layernorm)
    through visual_projection. Crops come in [0, 1]; normalised here."""

    def __init__(self, vision, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.vision = vision  # transformers CLIPVisionModelWithProjection
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        return self.vision.config.image_size

    @property
    def embed_dim(self) -> int:
        return self.vision.config.projection_dim

    @property
    def layers(self) -> nn.ModuleList:
        return self.vision.vision_model.encoder.layers

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """crops ``n 3 S S`` in [0, 1] → ``n embed_dim``."""
        x = (crops.float() - self.mean) / self.std
        dtype = next(self.vision.parameters()).dtype
        return self.vision(pixel_values=x.to(dtype)).image_embeds.float()


def vision_from_clip_model(clip) -> "CLIPVisionModelWithProjection":  # noqa: F821
    """vision_model + visual_projection of a transformers CLIPModel, as one model."""
    from transformers import CLIPVisionModelWithProjection

    vcfg = clip.config.vision_config
    vcfg.projection_dim = clip.config.projection_dim  # lives on the outer config in CLIPModel
    vision = CLIPVisionModelWithProjection(vcfg)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return vision.eval()


def tiny_image_encoder(projection_dim: int = 32, seed: int = 0) -> SubjectImageEncoder:
    """A random CLIP vision tower for tests: 32 px, 3 layers, built from a config."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, projection_dim=projection_dim)
    return SubjectImageEncoder(CLIPVisionModelWithProjection(cfg).eval())


def load_image_encoder(spec: str | None, base: Base) -> SubjectImageEncoder:
    """'tiny', a folder (a CLIPModel, e.g. the ToyWorld evaluator, or a
    CLIPVisionModelWithProjection), a hub id, or None = the base's natural one
    (ToyWorld: its evaluator's vision tower; tiny: the tiny tower)."""
    if spec is None:
        if base.name == "toyworld":
            spec = str(TOYWORLD_DIR / "evaluator")
            require(Path(spec, "config.json").is_file(),
                    "the ToyWorld evaluator is not built yet: run `multiconcept toyworld build`, or pass --image-encoder PATH")
        elif base.name == "tiny":
            spec = "tiny"
        else:
            raise UserError(f"base {base.name!r} has no default image encoder: pass --image-encoder "
                            "(a CLIP folder or hub id, e.g. openai/clip-vit-large-patch14 as in the paper)")
    if spec == "tiny":
        enc = tiny_image_encoder(base.text_encoder.config.hidden_size)
        return enc.to(base.device)
    from transformers import AutoConfig, CLIPModel, CLIPVisionModelWithProjection

    try:
        kind = AutoConfig.from_pretrained(spec).model_type
        if kind == "clip":
            vision = vision_from_clip_model(CLIPModel.from_pretrained(spec, dtype=torch.float32))
        elif kind == "clip_vision_model":
            vision = CLIPVisionModelWithProjection.from_pretrained(spec, dtype=torch.float32)
        else:
            raise UserError(f"image encoder {spec} is a {kind!r} model: pass a CLIP model or CLIP vision model")
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"could not load image encoder {spec!r} ({first}): "
                        "pass a local CLIP folder, or a hub id with network access") from e
    mean, std = CLIP_MEAN, CLIP_STD
    pre = Path(spec) / "preprocessor_config.json"
    if pre.is_file():  # e.g. the ToyWorld evaluator normalises to [-1, 1]
        p = json.loads(pre.read_text())
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
    return SubjectImageEncoder(vision.eval(), mean, std).to(base.device)


# ---------------------------------------------------------------- fusion


class MLP(nn.Module):
    """LN → Linear → GELU → Linear (the paper's MLP1 / MLP2)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class FusionMLP(nn.Module):
    """c' = LN(h2), h2 = MLP2(h1) + h1, h1 = MLP1([t ; v]) + t (≈2.96 M params at d = 768)."""

    def __init__(self, text_dim: int, image_dim: int):
        super().__init__()
        self.text_dim, self.image_dim = text_dim, image_dim
        self.image_proj = nn.Linear(image_dim, text_dim) if image_dim != text_dim else None
        self.mlp1 = MLP(2 * text_dim, text_dim)
        self.mlp2 = MLP(text_dim, text_dim)
        self.norm = nn.LayerNorm(text_dim)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """text ``... d``, image ``... e`` → ``... d``."""
        v = image if self.image_proj is None else self.image_proj(image)
        h = self.mlp1(torch.cat([text, v], dim=-1)) + text
        h = self.mlp2(h) + h
        return self.norm(h)


def fuse_subjects(fusion: FusionMLP, text: torch.Tensor, embeds: torch.Tensor, where: list[tuple[int, int]]) -> torch.Tensor:
    """Replace text ``batch token d`` at each (sample, token) of `where` by its
    fusion with the matching row of `embeds` ``n e``; other positions unchanged."""
    if not where:
        return text
    b = torch.tensor([w[0] for w in where], device=text.device)
    t = torch.tensor([w[1] for w in where], device=text.device)
    fused = fusion(text[b, t].float(), embeds.float()).to(text.dtype)
    return text.index_put((b, t), fused)


# ---------------------------------------------------------------- prompts


@dataclass
class SubjectPrompt:
    """A prompt with its image markers removed and each subject's token found."""

    prompt: str  # as written, markers included
    text: str  # markers removed: what the text encoder reads
    input_ids: list[int]  # BOS ... EOS, unpadded
    positions: list[int]  # flagged token index per subject, in marker order
    kept: list[int] = field(default_factory=list)  # which subjects survived truncation (training only)

    def padded_ids(self, tokenizer) -> torch.Tensor:
        n = tokenizer.model_max_length
        return torch.tensor(self.input_ids + [tokenizer.pad_token_id] * (n - len(self.input_ids)))


def parse_subject_prompt(tokenizer, prompt: str, n_subjects: int | None = None, truncate: bool = False) -> SubjectPrompt:
    """'a star <img> and a circle <img> on a gray background': remove the
    markers and flag the token right before each (the last token of the noun
    phrase, the last piece of a multi-token word), found from character
    offsets. Image order = marker order.

    A prompt longer than the text encoder's limit is an error, unless
    `truncate` (training captions): then it is cut as SD training cuts
    captions, and subjects whose token falls past the cut are left out
    (`kept` lists the surviving subjects' indices)."""
    pieces = MARKER_PATTERN.split(prompt)
    text, ends = pieces[0], []
    for i, piece in enumerate(pieces[1:], 1):
        text = text.rstrip()
        require(bool(text), f"image marker {i} in {prompt!r} has no word before it: write the subject's noun first, "
                            f"e.g. 'a star {MARKER}'")
        require(not ends or len(text) > ends[-1],
                f"image markers {i - 1} and {i} in {prompt!r} follow the same word: put each marker after its own subject")
        ends.append(len(text))
        text += (" " if piece[:1].isalnum() else "") + piece
    if n_subjects is not None:
        require(len(ends) == n_subjects,
                f"the prompt has {len(ends)} image marker(s) but {n_subjects} subject image(s) were given: "
                f"put one {MARKER} after each subject's noun, in the order of the images")
    if truncate:
        raw = tokenizer(text, return_offsets_mapping=True, truncation=False, verbose=False)
        limit = tokenizer.model_max_length
        ids, offsets = list(raw["input_ids"]), [tuple(o) for o in raw["offset_mapping"]]
        if len(ids) > limit:
            ids, offsets = ids[: limit - 1] + ids[-1:], offsets[: limit - 1] + offsets[-1:]
        enc = Encoded(text, ids, offsets)
    else:
        enc = tokenize_checked(tokenizer, text)
    positions, kept = [], []
    for i, end in enumerate(ends, 1):
        before = [j for j, (s, e) in enumerate(enc.offsets) if s < e <= end]
        require(bool(before), f"image marker {i} in {prompt!r} has no token before it: put it after the subject's noun")
        j = before[-1]
        s, e = enc.offsets[j]
        if truncate and e < end:  # the subject's word was cut off
            continue
        require(bool(re.search(r"\w", text[s:e])),
                f"image marker {i} in {prompt!r} follows {text[s:e]!r}, not a word: put it right after the subject's noun")
        positions.append(j)
        kept.append(i - 1)
    return SubjectPrompt(prompt, text, enc.input_ids, positions, kept)


# ---------------------------------------------------------------- crops


def subject_crop(image, mask=None, box=None, size: int = 224, rng: np.random.Generator | None = None) -> torch.Tensor:
    """The paper's subject crop: cut to the box, pixels outside the segment
    replaced by uniform random noise, padded square (with noise too: nothing
    but the subject carries signal), resized to `size`. → ``3 size size`` in [0, 1].

    image: PIL image or uint8 ``H W 3``; mask: bool ``H W`` (None = keep every
    pixel); box: (x0, y0, x1, y1), x1/y1 exclusive (None = the mask's extent,
    or the whole image)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    img = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    require(img.ndim == 3 and img.shape[2] == 3, f"a subject image must be RGB, got shape {img.shape}")
    H, W = img.shape[:2]
    if mask is not None:
        mask = np.asarray(mask).astype(bool)
        require(mask.shape == (H, W), f"a subject mask is {mask.shape[1]}x{mask.shape[0]} but its image is {W}x{H}: "
                                      "make them the same size")
        require(bool(mask.any()), "a subject mask is empty: paint the subject white on black")
    if box is None:
        if mask is None:
            box = (0, 0, W, H)
        else:
            ys, xs = np.nonzero(mask)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    x0, y0, x1, y1 = (int(v) for v in box)
    require(0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H, f"subject box {tuple(box)} is outside the {W}x{H} image")
    crop = img[y0:y1, x0:x1]
    if mask is not None:
        noise = rng.integers(0, 256, crop.shape, dtype=np.uint8)
        crop = np.where(mask[y0:y1, x0:x1, None], crop, noise)
    h, w = crop.shape[:2]
    side = max(h, w)
    square = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = crop
    x = torch.from_numpy(square).permute(2, 0, 1).float()[None] / 255.0
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)
    return x[0].clamp(0, 1)


def augment_crop(x: torch.Tensor, rng: np.random.Generator, cfg: FastComposerConfig) -> torch.Tensor:
    """The paper's subject-crop augmentations on one ``3 S S`` crop in [0, 1],
    drawn from `rng` (seeded per sample, so a resumed run sees the same crops):
    one affine warp (zoom, rotation, flip; uncovered corners filled with
    uniform noise like the crop's own background), brightness/contrast/
    saturation jitter, blur and grayscale. Without torchvision: grid_sample
    and a separable Gaussian conv."""
    if not cfg.augment:
        return x
    size = x.shape[-1]
    scale = 1.0 + rng.uniform(-cfg.aug_zoom, cfg.aug_zoom)
    angle = np.deg2rad(rng.uniform(-cfg.aug_rotation, cfg.aug_rotation))
    flip = -1.0 if rng.random() < cfg.aug_flip_p else 1.0
    if scale != 1.0 or angle != 0.0 or flip < 0:
        c, s_ = np.cos(angle) / scale, np.sin(angle) / scale
        theta = torch.tensor([[c * flip, -s_, 0.0], [s_ * flip, c, 0.0]], dtype=x.dtype)[None]
        grid = F.affine_grid(theta, (1, 3, size, size), align_corners=False)
        warped = F.grid_sample(torch.cat([x, torch.ones_like(x[:1])])[None], grid, mode="bilinear",
                               padding_mode="zeros", align_corners=False)[0]
        noise = torch.from_numpy(rng.random((3, size, size), dtype=np.float32)).to(x.dtype)
        x = warped[:3] + (1 - warped[3:]) * noise
    if cfg.aug_jitter > 0:
        b, c, s_ = (1.0 + rng.uniform(-cfg.aug_jitter, cfg.aug_jitter) for _ in range(3))
        x = x * b
        x = (x - x.mean()) * c + x.mean()
        grey = _luma(x)
        x = (x - grey) * s_ + grey
    if rng.random() < cfg.aug_blur_p:
        sigma = rng.uniform(0.1, 2.0) * size / 224
        r = max(1, int(np.ceil(3 * sigma)))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
        k = (k / k.sum()).expand(3, 1, 1, -1)
        x = F.conv2d(F.pad(x[None], (r, r, 0, 0), mode="reflect"), k, groups=3)
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.transpose(2, 3), groups=3)[0]
    if rng.random() < cfg.aug_grayscale_p:
        x = _luma(x).expand(3, -1, -1)
    return x.clamp(0, 1).contiguous()


def _luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of a ``3 H W`` image, ``1 H W``."""
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]


# ---------------------------------------------------------------- the model


class FastComposer(nn.Module):
    """Image encoder + fusion MLP on a base pipeline (whose UNet it may train)."""

    def __init__(self, base: Base, encoder: SubjectImageEncoder, fusion: FusionMLP | None = None):
        super().__init__()
        self.base = base
        self.encoder = encoder
        d = base.text_encoder.config.hidden_size
        require(base.unet.config.cross_attention_dim == d,
                f"the UNet reads {base.unet.config.cross_attention_dim}-d text but the text encoder writes {d}-d: "
                "not a usable base")
        self.fusion = (fusion if fusion is not None else FusionMLP(d, encoder.embed_dim)).to(base.device)

    @property
    def tokenizer(self):
        return self.base.tokenizer

    # -- conditioning

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Frozen text encoder: ``batch 77`` → ``batch 77 d``."""
        te = self.base.text_encoder
        return te(ids.to(self.base.device))[0].float()

    def condition(self, prompts: list[SubjectPrompt], crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text-only, subject-augmented) embeddings ``batch 77 d``.

        crops[i] holds sample i's subject crops ``n_i 3 S S`` in marker order."""
        require(len(prompts) == len(crops), "one crop stack per prompt")
        ids = torch.stack([p.padded_ids(self.tokenizer) for p in prompts])
        text = self.encode_text(ids)
        where = [(i, pos) for i, p in enumerate(prompts) for pos in p.positions]
        for p, c in zip(prompts, crops):
            require(len(p.positions) == len(c), f"{len(p.positions)} marker(s) but {len(c)} crop(s) for {p.prompt!r}")
        if not where:
            return text, text
        embeds = self.encoder(torch.cat([c for c in crops if len(c)]).to(self.base.device))
        return text, fuse_subjects(self.fusion, text, embeds, where)

    # -- training

    def set_trainable(self, cfg: FastComposerConfig) -> dict[str, nn.Parameter]:
        """Freeze everything, unfreeze what `cfg` trains; return those by name."""
        for part in (self.base.unet, self.base.text_encoder, self.base.vae, self.encoder, self.fusion):
            part.requires_grad_(False)
        if cfg.train_unet:
            self.base.unet.requires_grad_(True)
        if cfg.train_fusion:
            self.fusion.requires_grad_(True)
        n = len(self.encoder.layers) if cfg.vision_layers < 0 else min(cfg.vision_layers, len(self.encoder.layers))
        for layer in list(self.encoder.layers)[len(self.encoder.layers) - n:]:
            layer.requires_grad_(True)
        return {name: p for name, p in self.named_parts() if p.requires_grad}

    def named_parts(self):
        yield from ((f"unet.{k}", p) for k, p in self.base.unet.named_parameters())
        yield from ((f"image_encoder.{k}", p) for k, p in self.encoder.vision.named_parameters())
        yield from ((f"fusion.{k}", p) for k, p in self.fusion.named_parameters())

    def named_trainables(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self.named_parts() if p.requires_grad}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.named_trainables().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.named_trainables()
        missing = sorted(set(params) - set(state))
        if missing:
            raise UserError(f"the checkpoint lacks {len(missing)} trained tensor(s), e.g. {missing[0]}: "
                            "it was made with other settings; delete it to start over")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    # -- files

    def save(self, out: str | Path, meta: dict, unet: bool = True) -> Path:
        """Write the model folder; the JSON goes last, so its presence means complete."""
        out = Path(out)
        enc = self.encoder
        save_model_folder(
            out,
            fusion=self.fusion.state_dict(),
            image_encoder=enc.vision.state_dict(),
            unet=self.base.unet.state_dict() if unet else None,
            config={
                "base_name": self.base.name, "base_fingerprint": self.base.fingerprint,
                "text_dim": self.fusion.text_dim, "image_dim": self.fusion.image_dim,
                "vision_config": enc.vision.config.to_dict(),
                "image_mean": enc.mean.flatten().tolist(), "image_std": enc.std.flatten().tolist(),
                **meta,
            },
        )
        return out

    @classmethod
    def load(cls, folder: str | Path, base: Base | str | None = None, device: str = "auto",
             dtype: str = "fp32") -> "FastComposer":
        """A model folder on its base; the base's fingerprint must match the recorded one."""
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        folder = Path(folder)
        cfg_path = folder / CONFIG_FILE
        require(cfg_path.is_file(), f"{folder} is not a FastComposer model folder (no {CONFIG_FILE}): pass a folder written by "
                                    "`multiconcept train-encoder` or `multiconcept convert-fastcomposer`")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{cfg_path} is damaged ({e}): re-run training or conversion") from e
        require(config.get("format") == MODEL_FORMAT and config.get("version") == MODEL_VERSION,
                f"{cfg_path} is format {config.get('format')} v{config.get('version')}; this multiconcept reads "
                f"{MODEL_FORMAT} v{MODEL_VERSION}: re-convert or upgrade")
        if not isinstance(base, Base):
            base = load_base(base if base is not None else config["base_name"], device=device, dtype=dtype)
        want = config.get("base_fingerprint")
        require(want is None or want == base.fingerprint,
                f"model {folder} was trained on base {config['base_name']!r} (fingerprint {want}) but the loaded base is "
                f"{base.name!r} ({base.fingerprint}): pass --base {config['base_name']}")
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**_vision_kwargs(config["vision_config"])))
        load_state_checked(vision, read_tensors(folder / "image_encoder.safetensors"), "image encoder", folder)
        encoder = SubjectImageEncoder(vision.eval(), config["image_mean"], config["image_std"])
        encoder = encoder.to(base.device, base.unet.dtype)
        fusion = FusionMLP(config["text_dim"], config["image_dim"])
        load_state_checked(fusion, read_tensors(folder / "fusion.safetensors"), "fusion MLP", folder)
        if (folder / "unet.safetensors").is_file():
            load_state_checked(base.unet, read_tensors(folder / "unet.safetensors"), "UNet", folder)
        model = cls(base, encoder, fusion.to(base.device))
        model.config = config
        return model.eval()


def _vision_kwargs(d: dict) -> dict:
    skip = {"transformers_version", "model_type", "architectures", "torch_dtype", "dtype"}
    return {k: v for k, v in d.items() if k not in skip and not k.startswith("_")}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    require(path.is_file(), f"{path} is missing: the model folder is incomplete; re-run training or conversion")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}): re-run training or conversion") from e


def load_state_checked(module: nn.Module, state: dict, what: str, where: Path,
                       fix: str = "pass the base it was made for with --base") -> None:
    """Copy `state` into `module` if every name and shape fits, else one clear error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    bad = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    problems = [f"missing e.g. {missing[0]}" if missing else "", f"unexpected e.g. {extra[0]}" if extra else "",
                f"shape {tuple(state[bad[0]].shape)} instead of {tuple(own[bad[0]].shape)} for {bad[0]}" if bad else ""]
    require(not (missing or extra or bad),
            f"the {what} weights in {where} do not fit ({'; '.join(p for p in problems if p)}): {fix}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))


def save_model_folder(out: Path, fusion: dict, image_encoder: dict, unet: dict | None, config: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)

    def put(name: str, tensors: dict) -> None:
        cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        atomic_write(out / name, lambda tmp: save_file(cpu, tmp))

    put("fusion.safetensors", fusion)
    put("image_encoder.safetensors", image_encoder)
    if unet is not None:
        put("unet.safetensors", unet)
    elif (out / "unet.safetensors").exists():
        (out / "unet.safetensors").unlink()
    body = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "marker": MARKER, **config}
    text = json.dumps(body, indent=1, sort_keys=True, default=_jsonable)
    atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))


def _jsonable(x):
    if isinstance(x, tuple):
        return list(x)
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    return str(x)


def config_dict(cfg: FastComposerConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
