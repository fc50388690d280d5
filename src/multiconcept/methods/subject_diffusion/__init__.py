"""Subject-Diffusion (Ma et al., SIGGRAPH 2024, arXiv 2307.11410): open-domain,
tuning-free generation of one or two given subjects, with location control.

Three ingredients on a Stable Diffusion base, one module each:
- location control (unet.py): the union of the subjects' masks on the canvas
  as an extra UNet input channel, its conv_in weights zero at the start;
- dense image control (objects.py, unet.py): each subject's image patch tokens
  with a Fourier embedding of its box, through an MLP, read by a gated
  self-attention adapter (GLIGEN's, diffusers' `GatedSelfAttentionDense`) in
  every transformer block, gates zero at the start;
- the fusion text encoder (fusion.py): "[caption], the [label] is *" with the
  subject image's pooled embedding, through an MLP, as the input embedding of
  each "*";
plus attention control in training (FastComposer's localisation loss on the
label's and the placeholder's cross-attention) and three-branch guidance in
sampling (guidance.py).

Like FastComposer it is a model with its own training
(workflows/train_subject_diffusion.py) and sampling
(workflows/compose_subject_diffusion.py), not a per-concept `Method`.
"""

from __future__ import annotations

from .config import CONFIG_FILE, MODEL_FORMAT, PLACEHOLDER, SubjectDiffusionConfig
from .fusion import ClsMLP, FusionPrompt, encode_fused, fusion_prompt, parse_marked_prompt, placeholder_embeddings
from .guidance import IMAGE_GUIDANCE, TEXT_GUIDANCE, three_branch
from .model import SubjectDiffusion, read_config
from .objects import ObjectTokens
from .unet import adapter_gates, box_of, latent_map, location_map, place_mask, subject_unet

__all__ = ["CONFIG_FILE", "IMAGE_GUIDANCE", "MODEL_FORMAT", "PLACEHOLDER", "TEXT_GUIDANCE", "ClsMLP", "FusionPrompt",
           "ObjectTokens", "SubjectDiffusion", "SubjectDiffusionConfig", "adapter_gates", "box_of",
           "encode_fused", "fusion_prompt", "latent_map", "location_map", "parse_marked_prompt",
           "place_mask", "placeholder_embeddings", "read_config", "subject_unet", "three_branch"]
