"""What a base's UNet is conditioned on: built here once, for training and for generation.

- SD 1.x / 2.x: the text encoder's last hidden state (after its final layer norm),
  as StableDiffusionPipeline encodes a prompt.
- SDXL (Podell et al. 2023, sections 2.1-2.2): both encoders' penultimate hidden
  states side by side (768 + 1280 wide on SDXL), the second encoder's pooled and
  projected output, and six micro-conditioning numbers (original size, crop
  top-left, target size) that join the timestep embedding with the pooled text.
  Training images here are resized whole and never cropped, so a sample's
  original size is the training size and its crop (0, 0); generation asks for
  the same thing: an uncropped image at the size drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextConditioning:
    hidden: torch.Tensor  # batch tokens width: the UNet's cross-attention input
    pooled: torch.Tensor | None = None  # batch width_2: SDXL's pooled text, None on SD


def token_ids(base, prompt: str) -> list[torch.Tensor]:
    """One prompt's padded ids (1 x max length), one row per tokenizer of the base."""
    return [tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids.to(base.device) for tok in base.tokenizers]


def encode_ids(base, ids: list[torch.Tensor]) -> TextConditioning:
    """The conditioning of tokenised prompts (`token_ids`, batched or not); gradients flow
    into the encoders' trainable tensors when grad is enabled."""
    if not base.is_sdxl:
        return TextConditioning(base.text_encoder(ids[0])[0])
    hidden, pooled = [], None
    for te, i in zip(base.text_encoders, ids):
        out = te(i, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds: the pooled output SDXL uses
            pooled = out[0]
    return TextConditioning(torch.cat(hidden, dim=-1), pooled)


def encode_flow(base, prompts: list[str]) -> TextConditioning:
    """A flow transformer base's conditioning, by its pipeline's own `encode_prompt` (models/flow.py); gradients
    flow into trained token rows when grad is enabled."""
    hidden, pooled = base.flow.encode(base.pipe, prompts, base.sequence_length)
    return TextConditioning(hidden, pooled)


def encode_prompts(base, prompts: list[str]) -> TextConditioning:
    if base.flow is not None:
        return encode_flow(base, prompts)
    rows = [token_ids(base, p) for p in prompts]
    return encode_ids(base, [torch.cat(parts) for parts in zip(*rows)])


def micro_conditioning(height: int, width: int) -> dict:
    """SDXL's size and crop conditions of an uncropped image drawn at height x width, as
    StableDiffusionXLPipeline's arguments."""
    return {"original_size": (height, width), "crops_coords_top_left": (0, 0), "target_size": (height, width)}


def added_conditioning(base, pooled: torch.Tensor | None, height: int, width: int) -> dict | None:
    """The UNet's `added_cond_kwargs` for a batch (None on SD): pooled text and the time ids
    (original size, crop top-left, target size, in that order, as SDXL was trained)."""
    if not base.is_sdxl:
        return None
    m = micro_conditioning(height, width)
    ids = torch.tensor([*m["original_size"], *m["crops_coords_top_left"], *m["target_size"]], dtype=pooled.dtype,
                       device=pooled.device)
    return {"text_embeds": pooled, "time_ids": ids.expand(pooled.shape[0], -1)}


def pipeline_conditioning(base, prompts: list[str], negative: str, height: int, width: int) -> dict:
    """The conditioning arguments of a pipeline call. SDXL's are built here, by the encoder
    training uses (an empty negative prompt is zeros when the pipeline's
    force_zeros_for_empty_prompt says so, as the SDXL pipeline does); SD's pipeline encodes the prompts itself, the same way."""
    if not base.is_sdxl:
        return {"prompt": prompts, "negative_prompt": [negative] * len(prompts) if negative else None}
    cond = encode_prompts(base, prompts)
    if base.infusion is not None:  # its class-word residuals find their rows by the prompts encoded
        base.infusion.saw_prompts(prompts, cond.hidden)
    if negative or not base.pipe.config.get("force_zeros_for_empty_prompt", True):
        neg = encode_prompts(base, [negative] * len(prompts))
    else:
        neg = TextConditioning(torch.zeros_like(cond.hidden), torch.zeros_like(cond.pooled))
    return {"prompt_embeds": cond.hidden, "pooled_prompt_embeds": cond.pooled, "negative_prompt_embeds": neg.hidden,
            "negative_pooled_prompt_embeds": neg.pooled, **micro_conditioning(height, width)}
