"""Dense image control's object tokens (Subject-Diffusion §3.2): every patch token
of a subject's image, joined with a Fourier embedding of the subject's box,
through an MLP into the UNet's context width; GLIGEN's grounding tokens with
image patches in place of phrases.

    h_e = MLP([patch ; Fourier(x0, y0, x1, y1)])   8 frequencies, sin and cos → 64-d

A missing subject (fewer than the batch's most, or none) gets learned null
features for both its patches and its box, and so does every box when boxes
are ablated: then the tokens say what the subject looks like but not where.

The module stands where diffusers' GLIGEN UNet keeps its grounding network
(`unet.position_net`): the UNet calls it with the `gligen` entry of
`cross_attention_kwargs` and hands its tokens to every block's gated
self-attention (`GatedSelfAttentionDense`)."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_fourier_embeds_from_boundingbox
from torch import nn

FOURIER_FREQS = 8  # paper and GLIGEN: 8 frequencies per coordinate


class ObjectTokens(nn.Module):
    def __init__(self, patch_dim: int, out_dim: int, hidden: int = 512, use_boxes: bool = True):
        super().__init__()
        self.patch_dim, self.out_dim, self.use_boxes = patch_dim, out_dim, use_boxes
        self.position_dim = FOURIER_FREQS * 2 * 4
        self.mlp = nn.Sequential(nn.Linear(patch_dim + self.position_dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))
        self.null_patch = nn.Parameter(torch.zeros(patch_dim))
        self.null_position = nn.Parameter(torch.zeros(self.position_dim))

    def forward(self, patches: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """patches ``b n p c``, boxes ``b n 4`` (x0 y0 x1 y1 in [0, 1] of the canvas),
        valid ``b n`` bool → object tokens ``b (n p) out_dim``."""
        b, n, p, _ = patches.shape
        keep = valid.to(patches.dtype)[..., None]
        pos = get_fourier_embeds_from_boundingbox(FOURIER_FREQS, boxes.to(patches.dtype))  # b n 64
        box_keep = keep if self.use_boxes else torch.zeros_like(keep)
        pos = pos * box_keep + (1 - box_keep) * self.null_position.to(pos.dtype)
        patches = patches * keep[..., None] + (1 - keep[..., None]) * self.null_patch.to(patches.dtype)
        x = torch.cat([patches, pos[:, :, None].expand(b, n, p, self.position_dim)], dim=-1)
        return self.mlp(x).reshape(b, n * p, self.out_dim)
