"""The optimisers a training run may pick.

``adamw`` is torch's. ``adamw8bit`` is bitsandbytes' AdamW with its two
moments stored as 8-bit blocks (Dettmers et al., 2022): 2 bytes of optimiser
state per trained value instead of 8, which is what lets SDXL's LoRA and
Custom Diffusion runs fit common GPUs (diffusers' scripts: --use_8bit_adam).
bitsandbytes runs it on the CPU too, which is where it is tested here; its
paged variants and GPU kernels are not exercised on these machines.
"""

from __future__ import annotations

import torch

from ..errors import UserError

OPTIMIZERS = ("adamw", "adamw8bit")


def make_optimizer(kind: str, groups: list[dict], *, lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise UserError("optimizer=adamw8bit needs bitsandbytes: pip install 'multiconcept[bnb]' "
                            "(or leave optimizer=adamw)") from e
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}: fix --param optimizer")
