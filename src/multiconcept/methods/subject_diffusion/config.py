"""Subject-Diffusion's settings (the paper's defaults) and the names its files and prompts use."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import require
from ..settings import PROBABILITY, Settings, compile_setting, hp

# The placeholder whose input embedding the subject's image embedding replaces: one token in CLIP's
# vocabulary and in ToyWorld's ("*", as textual inversion writes its pseudo-word).
PLACEHOLDER = "*"
MODEL_FORMAT = "multiconcept-subject-diffusion"
MODEL_VERSION = 1
CONFIG_FILE = "subject_diffusion.json"


@dataclass
class SubjectDiffusionConfig(Settings):
    """What trains and how; defaults are the paper's (Subject-Diffusion §3-4, its released code)."""

    # the paper's parts; turning one off removes exactly that part (its ablation table)
    location_map: bool = hp(True, "location control: the union of subject masks as a 5th UNet input channel "
                                  "(ablation 'no location map': the UNet keeps its input)")
    location_from: str = hp("mask", "what the location map is drawn from: mask (paper) | box (released code)",
                             choices=("mask", "box"))
    boxes: bool = hp(True, "Fourier embedding of each subject's box in its object tokens "
                           "(ablation 'no boxes': the learned null position feature instead)")
    adapter: bool = hp(True, "dense image control: gated self-attention over [x; object tokens] in every transformer "
                             "block (ablation 'no adapter')")
    attention_control: bool = hp(True, "localisation loss on the entity word's and the placeholder's cross-attention "
                                       "(ablation 'no attention control')")
    cls_embedding: bool = hp(True, "fusion text encoder: the image's pooled embedding replaces the placeholder's input "
                                   "embedding (ablation 'no CLS embedding': the placeholder stays a plain token)")
    # which parts train (paper: attn2 to_k/to_v, adapters, conv_in, text encoder, both MLPs; image encoder frozen)
    train_text_encoder: bool = hp(True, "train the whole text encoder (paper: yes)")
    train_cross_kv: bool = hp(True, "train the cross-attention key/value projections (paper: yes)")
    vision_layers: int = hp(0, "last N image-encoder layers that train (paper: 0, frozen); -1 trains every layer",
                            at_least=-1)
    # losses
    loc_weight: float = hp(0.01, "λ of the localisation loss (the released code: 0.01, FastComposer's balanced L1)",
                           at_least=0)
    loc_resolutions: tuple = hp((), "map sizes whose attn2 layers the localisation loss reads; () = every level but "
                                    "the outermost (the middle blocks)", items=int)
    # classifier-free guidance dropout (paper: text 5%, text+mask 5%, mask 5%)
    text_dropout: float = hp(0.05, "probability that only the text is dropped (prompt '')", **PROBABILITY)
    text_mask_dropout: float = hp(0.05, "probability that the text and the image condition are both dropped",
                                **PROBABILITY)
    mask_dropout: float = hp(0.05, "probability that only the image condition is dropped", **PROBABILITY)
    drop_objects: bool = hp(True, "a dropped image condition also nulls the object tokens, so the unconditional branch "
                                  "of guidance was seen in training (the released code drops only the map and feeds "
                                  "zero objects at inference); False drops the map alone")
    max_subjects: int = hp(2, "at most this many subjects per image (paper: 2)", at_least=1)
    augment: bool = hp(True, "augment subject crops (FastComposer's augmentations at their defaults, "
                                 "grayscale left out: on ToyWorld colours are the subject's identity)")
    # optimiser (paper: AdamW lr 3e-5, 1000 warm-up steps, global batch 256, ~450k steps)
    steps: int = hp(450_000, "optimiser steps (paper: ~450k)", at_least=1)
    lr: float = hp(3e-5, "AdamW learning rate after warm-up (paper: 3e-5)", above=0)
    warmup_steps: int = hp(1000, "linear warm-up steps (paper: 1000)", at_least=0)
    weight_decay: float = hp(1e-2, "AdamW weight decay", at_least=0)
    max_grad_norm: float = hp(1.0, "gradient clipping", at_least=0)
    batch_size: int = hp(8, "images per micro-batch and process (paper: 256 over 32 GPUs)", at_least=1)
    grad_accum: int = hp(1, "micro-batches per optimiser step", at_least=1)
    mixed_precision: str = hp("no", "no | fp16 | bf16 (accelerate; paper: fp16)", choices=("no", "fp16", "bf16"))
    compile: str = compile_setting()
    resolution: int = hp(0, "training image size; 0 = the base's native size", at_least=0)
    seed: int = hp(0, "seed for data, crops, dropout, noise and timesteps")
    latents: str = hp("auto", "VAE posterior: sample | mean | auto (see FastComposer's setting)",
                      choices=("auto", "sample", "mean"))
    checkpoint_every: int = hp(500, "steps between resumable checkpoints", at_least=0)

    def __post_init__(self):
        super().__post_init__()
        total = self.text_dropout + self.text_mask_dropout + self.mask_dropout
        require(total <= 1.0, f"the three dropout probabilities add up to {total:g}: they must add up to at most 1")

    @property
    def ablation(self) -> str:
        """The paper's name for what this config leaves out ('full' when nothing)."""
        off = [name for name, on in (("no location map", self.location_map), ("no boxes", self.boxes),
                                     ("no adapter", self.adapter), ("no attention control", self.attention_control),
                                     ("no CLS embedding", self.cls_embedding)) if not on]
        return ", ".join(off) or "full"
