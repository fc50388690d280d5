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

from .config import (
                     CLIP_MEAN,
                     CLIP_STD,
                     CONFIG_FILE,
                     MARKER,
                     MARKER_PATTERN,
                     MODEL_FORMAT,
                     MODEL_VERSION,
                     FastComposerConfig,
)
from .crops import augment_crop, subject_crop
from .encoder import (
                     MLP,
                     FusionMLP,
                     SubjectImageEncoder,
                     fuse_subjects,
                     load_image_encoder,
                     tiny_image_encoder,
                     vision_from_clip_model,
)
from .markers import SubjectPrompt, parse_subject_prompt
from .model import FastComposer, load_state_checked, read_tensors, save_model_folder

__all__ = ["CLIP_MEAN", "CLIP_STD", "CONFIG_FILE", "MARKER", "MARKER_PATTERN", "MLP", "MODEL_FORMAT", "MODEL_VERSION",
           "FastComposer", "FastComposerConfig", "FusionMLP", "SubjectImageEncoder", "SubjectPrompt",
           "augment_crop", "fuse_subjects", "load_image_encoder", "load_state_checked",
           "parse_subject_prompt", "read_tensors", "save_model_folder", "subject_crop", "tiny_image_encoder",
           "vision_from_clip_model"]
