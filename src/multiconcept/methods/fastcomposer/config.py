"""FastComposer's settings (the paper's defaults) and the names its files and prompts use."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..settings import PROBABILITY, Settings, compile_setting, hp

# "<img>" is ours; "<|image|>" is what the reference release writes.
MARKER = "<img>"
MARKER_PATTERN = re.compile(r"<img>|<\|image\|>")
MODEL_FORMAT = "multiconcept-fastcomposer"
MODEL_VERSION = 1
CONFIG_FILE = "fastcomposer.json"
# OpenAI CLIP's pixel statistics (the paper's ViT-L/14).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)




@dataclass
class FastComposerConfig(Settings):
    """What trains and how; defaults are the paper's (FastComposer §4, reference release)."""

    # which parts train (paper: full UNet, fusion MLP, last 2 vision layers; text encoder and VAE frozen)
    train_unet: bool = hp(True, "train every UNet weight (paper: yes)")
    train_fusion: bool = hp(True, "train the fusion MLP (paper: yes)")
    vision_layers: int = hp(2, "last N vision-tower layers that train (paper: 2); 0 freezes the tower, -1 trains every layer",
                             at_least=-1)
    # losses
    loc_weight: float = hp(1e-3, "λ of the localisation loss (paper: 1e-3; the reference code's default differs); 0 turns it off")
    loc_resolutions: tuple = hp((), "map sizes whose attn2 layers the localisation loss reads; () = every level but the "
                                    "outermost (SD 1.5: down 1, down 2, mid, up 1, up 2)", items=int)
    mask_loss_p: float = hp(0.5, "probability that a sample's noise loss is masked to the union of its subject masks",
                            **PROBABILITY)
    caption_dropout: float = hp(0.1, "probability that a caption is dropped to '' (classifier-free guidance)", **PROBABILITY)
    subject_keep: float = hp(0.9, "probability that each subject of a caption is kept (marker + image)", **PROBABILITY)
    max_subjects: int = hp(4, "at most this many subjects per caption (paper: 4)", at_least=1)
    # subject-crop augmentations (paper: zoom, rotation ±30°, colour jitter, blur, grayscale, flip)
    augment: bool = hp(True, "augment subject crops during training (the settings below); False turns all off")
    aug_zoom: float = hp(0.2, "zoom factor drawn from [1 - z, 1 + z] (out: the subject shrinks into noise)",
                         at_least=0, below=1)
    aug_rotation: float = hp(30.0, "rotation in degrees drawn from [-r, r] (paper: 30)", at_least=0, at_most=180)
    aug_flip_p: float = hp(0.5, "probability of a horizontal flip", **PROBABILITY)
    aug_jitter: float = hp(0.2, "brightness, contrast and saturation factors drawn from [1 - j, 1 + j]; "
                                "hue is never shifted (on ToyWorld colours are identity)", at_least=0, below=1)
    aug_blur_p: float = hp(0.2, "probability of a Gaussian blur (sigma 0.1-2 px at 224 px, scaled with the crop)",
                           **PROBABILITY)
    aug_grayscale_p: float = hp(0.1, "probability of converting the crop to grayscale", **PROBABILITY)
    # optimiser (paper: AdamW lr 1e-5, wd 1e-2, clip 1.0, constant lr, global batch 128 = 16 x 8 GPUs)
    steps: int = hp(150_000, "optimiser steps (paper: 150k)", at_least=1)
    lr: float = hp(1e-5, "AdamW learning rate, constant (paper: 1e-5; ToyWorld needs more, see the benchmark)",
                   above=0)
    weight_decay: float = hp(1e-2, "AdamW weight decay (paper: 1e-2)", at_least=0)
    max_grad_norm: float = hp(1.0, "gradient clipping (paper: 1.0)", at_least=0)
    batch_size: int = hp(16, "images per micro-batch and process (paper: 16 per GPU x 8 GPUs)", at_least=1)
    grad_accum: int = hp(1, "micro-batches per optimiser step", at_least=1)
    mixed_precision: str = hp("no", "no | fp16 | bf16 (accelerate; paper: bf16)", choices=("no", "fp16", "bf16"))
    compile: str = compile_setting()
    resolution: int = hp(0, "training image size; 0 = the base's native size", at_least=0)
    seed: int = hp(0, "seed for data, crops, noise and timesteps")
    latents: str = hp("auto", "VAE posterior: sample | mean | auto (mean when a channel's posterior std > 0.5, "
                      "as on ToyWorld's VAE; else sample)", choices=("auto", "sample", "mean"))
    checkpoint_every: int = hp(500, "steps between resumable checkpoints", at_least=0)


def jsonable(x):
    if isinstance(x, tuple):
        return list(x)
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    return str(x)

