"""The optimisers a training run may pick.

``adamw`` is torch's, in its fused form where the parameters' device has one
(CPU and CUDA): one kernel over every tensor instead of a Python loop over them.
On CPU the loop form (torch's default there) took 16.7 ms for 120 tensors, the
fused one 7.4 ms, the foreach one 29.8 ms (docs/speed.md); the fused update
differs from the loop's in the last bit of some values, never between runs. ``adamw8bit`` is bitsandbytes' AdamW with its two
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
        return adamw(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise UserError("optimizer=adamw8bit needs bitsandbytes: pip install 'multiconcept[bnb]' "
                            "(or leave optimizer=adamw)") from e
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}: fix --param optimizer")


def adamw(params, **kw) -> torch.optim.AdamW:
    """torch's AdamW, fused where the parameters' device supports it (see the module's docstring)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, **kw)
