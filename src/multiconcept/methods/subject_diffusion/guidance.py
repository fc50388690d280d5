"""Three-branch classifier-free guidance (Subject-Diffusion §3.5, after InstructPix2Pix):

    ε = ε_u + s_T · (ε_full − ε_img) + s_I · (ε_img − ε_u)

ε_full: text and subjects; ε_img: subjects without text (the empty prompt, the
location map and object tokens kept); ε_u: neither. s_T = 7.5, s_I = 1.5 by
default. With s_T = s_I = s the ε_img terms cancel and this is ordinary
classifier-free guidance of ε_full against ε_u with scale s."""

from __future__ import annotations

import torch

TEXT_GUIDANCE = 7.5
IMAGE_GUIDANCE = 1.5


def three_branch(eps_full: torch.Tensor, eps_img: torch.Tensor, eps_u: torch.Tensor,
                 s_text: float = TEXT_GUIDANCE, s_image: float = IMAGE_GUIDANCE) -> torch.Tensor:
    return eps_u + s_text * (eps_full - eps_img) + s_image * (eps_img - eps_u)
