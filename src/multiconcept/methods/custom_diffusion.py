"""Custom Diffusion (Kumari et al., CVPR 2023).

Trains every cross-attention K and V projection (attn2.to_k / to_v) plus one
modifier token per concept; several concepts are trained jointly. The
start-of-text token's keys and values are kept out of the gradient, as in the
reference implementation. Stored as deltas W − W_base so bundles sum.

On a transformer base (FLUX, SD3) the K and V that read only the text are the
text stream's (add_k_proj / add_v_proj) in the joint blocks
(models/text_attention.py); the single-stream blocks stay frozen. FLUX.1's T5
sequence has no start token, so nothing is detached there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..bundle import delta_prefix
from ..models.text_attention import first_text_token_is_constant, projection_kinds, text_projections
from .base import Method, TrainConfig
from .precision import TrainedInFp32
from .settings import hp


@dataclass
class CustomDiffusionConfig(TrainConfig):
    # Custom Diffusion paper / DisenDiff paper's setup: lr 1e-5 x batch 2 x 4 = 8e-5, 250 steps
    steps: int = hp(250, "optimiser steps (paper: 250 single, 500 multi-concept)")
    lr: float = hp(1e-5, "learning rate before scaling (paper: 1e-5, scaled to 8e-5)")
    scale_lr: bool = hp(True, "multiply lr by batch x accumulation x processes")
    batch_size: int = hp(2, "images per micro-batch (paper: 2)")
    grad_accum: int = hp(4, "micro-batches per step (stands in for the paper's 4 GPUs)")
    weight_decay: float = hp(1e-2, "AdamW weight decay")
    train_projections: tuple = hp(("to_k", "to_v"), "attn2 projections to train; add to_q for the Q/K/V ablation")
    detach_start_token: bool = hp(True, "keep the start-of-text token's K/V out of the gradient")
    initializers: tuple = hp(("ktn", "pll", "ucd"), "rare words whose embeddings start the modifier tokens, in concept order")


def cross_attention_weights(base, projections=("to_k", "to_v")) -> dict[str, torch.nn.Parameter]:
    """{name in the denoiser: weight} of the projections where the image reads the text (attn2's on a UNet)."""
    return {f"{name}.weight": m.weight for name, m in text_projections(base, projection_kinds(projections)).items()}


def detach_start_token(base, projections=("to_k", "to_v")) -> list:
    """Forward hooks making position 0 of the text K/V constant for autograd (where it is a start token)."""

    def hook(_module, _inputs, out):
        return torch.cat([out[:, :1].detach(), out[:, 1:]], dim=1)

    if not first_text_token_is_constant(base):
        return []
    # only text-side projections: to_q reads image tokens, where position 0 means nothing
    kinds = [k for k in projection_kinds(projections) if k in ("key", "value")]
    return [m.register_forward_hook(hook) for m in text_projections(base, kinds).values()]


class CustomDiffusion(Method):
    name = "custom-diffusion"
    Config = CustomDiffusionConfig

    def setup(self):
        for i, c in enumerate(self.concepts):
            if not c.initializer and i < len(self.cfg.initializers):
                c.initializer = self.cfg.initializers[i]
        self.add_trainable_tokens()
        self.kv = cross_attention_weights(self.base, self.cfg.train_projections)
        modules = dict(self.base.denoiser.named_modules())
        self.fp32 = TrainedInFp32([modules[n.rsplit(".", 1)[0]] for n in self.kv])  # same Parameters, now fp32
        self.kv_base = {k: p.detach().clone() for k, p in self.kv.items()}
        for p in self.kv.values():
            p.requires_grad_(True)
        self.hooks = detach_start_token(self.base, self.cfg.train_projections) if self.cfg.detach_start_token else []
        return [{"params": list(self.kv.values()) + self.token_params()}]

    def full_precision_modules(self) -> set[str]:
        return set(text_projections(self.base, projection_kinds(self.cfg.train_projections)))

    def named_trainables(self):
        return {**self.token_trainables(), **self.kv}

    def trainable_state(self):
        return {k: v.detach().clone() for k, v in self.named_trainables().items()}

    def bundle_tensors(self):
        prefix = delta_prefix(self.base.denoiser_name)
        deltas = {f"{prefix}{k}": (p.detach() - self.kv_base[k]).clone() for k, p in self.kv.items()}
        return {**self.token_rows(), **deltas}

    def teardown(self):
        for h in self.hooks:
            h.remove()
        self.fp32.restore()
