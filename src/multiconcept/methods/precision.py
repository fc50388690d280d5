"""Frozen weights in bf16 or fp16, trained tensors in fp32.

A base loaded with ``--dtype bf16`` halves the memory of every frozen weight
(SDXL's UNet: 10.3 GB -> 5.1 GB). The tensors a method trains must stay fp32:
bf16 keeps 8 bits of mantissa, so an Adam update smaller than 1/256 of the
weight it changes rounds away, and Custom Diffusion's lr of 8e-5 on K/V
weights of magnitude ~0.05 is exactly that regime (Micikevicius et al., 2018,
keep an fp32 master copy for the same reason; diffusers' scripts call
``cast_training_params(..., torch.float32)``).
"""

from __future__ import annotations

import torch
from torch import nn


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


class TrainedInFp32:
    """Modules whose own weights are trained, made fp32 while the rest of the
    model keeps its dtype: inputs are cast to fp32 on the way in and the
    output back to the input's dtype on the way out. A no-op on an fp32 model.
    `restore()` puts the modules back in their dtype and removes the casts."""

    def __init__(self, modules: list[nn.Module]):
        self.entries = []
        for m in modules:
            dtype = next(m.parameters()).dtype
            if dtype == torch.float32:
                continue
            m.float()  # in place: the Parameter objects an optimiser may hold stay the same
            state: dict = {}

            def pre(_m, args, kwargs, state=state):
                first = next((a for a in args if isinstance(a, torch.Tensor)), None)
                state["dtype"] = first.dtype if first is not None else None
                return tuple(_cast(a, torch.float32) for a in args), {k: _cast(v, torch.float32) for k, v in kwargs.items()}

            def post(_m, _args, _kwargs, out, state=state):
                return _cast(out, state["dtype"]) if state.get("dtype") is not None else out

            handles = (m.register_forward_pre_hook(pre, with_kwargs=True),
                       m.register_forward_hook(post, with_kwargs=True))
            self.entries.append((m, dtype, handles))

    def restore(self) -> None:
        for m, dtype, handles in self.entries:
            for h in handles:
                h.remove()
            m.to(dtype)
        self.entries = []


def trained_params_to_fp32(params: list[nn.Parameter]) -> None:
    """Parameters a library adds beside frozen layers (peft's LoRA A and B), made fp32 in place;
    the library casts activations to the adapter's dtype and back itself."""
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()


def quantize_frozen_linears(model: nn.Module, keep: set[str] = frozenset()) -> int:
    """Every frozen nn.Linear of `model` (not named in `keep`, no trainable weight) replaced in place by
    bitsandbytes' 4-bit NormalFloat layer (Dettmers et al. 2023, QLoRA): its weight in NF4 (blocks of 64 with an
    absmax each, about 4.5 bits a weight), computed in the layer's dtype. What diffusers' FLUX.2 LoRA script does
    with `--bnb_quantization_config_path`, done here with bitsandbytes' own layers because diffusers' quantiser
    needs a GPU. Forward hooks registered on a replaced layer are lost: quantize before a method installs any.
    Returns how many layers were replaced."""
    import bitsandbytes as bnb

    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or full in keep or child.weight.requires_grad:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None, quant_type="nf4",
                                  compute_dtype=child.weight.dtype, device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data.to(torch.float32).cpu(), requires_grad=False,
                                         quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(module, child_name, q.to(child.weight.device))
            count += 1
    return count
