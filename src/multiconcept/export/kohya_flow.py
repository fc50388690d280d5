"""LoRAs of flow transformers (FLUX.1, FLUX.2 [klein], SD3) in kohya's layout, which ComfyUI and Forge load.

kohya names a transformer module as the original (BFL / Stability) model does, where one projection often
does several diffusers modules' work at once: the image and text streams' Q, K and V are one `qkv` Linear
each (`double_blocks_3_img_attn_qkv`, SD3's `joint_blocks_3_x_block_attn_qkv`), and FLUX.1's single-stream
block computes Q, K, V and the MLP input in one `linear1`. A fused module's LoRA must then give every part:

- a LoRA's factors (A_j, B_j at scale s_j = alpha / r_j per diffusers module j) fuse exactly: the down factors
  stacked, the up factors block-diagonal (each B_j·s_j in its part's rows), alpha the total rank (scale 1); a
  part without a LoRA gets a zero block of the same rank, so every part has its own equal share of the rank
  (what diffusers' kohya loaders recognise as a split LoRA and take apart again);
- a weight delta (Custom Diffusion's K/V) is the fused ΔW with zero rows for the untouched parts (Q): its
  truncated SVD (svd.py) is the LoRA, exact at full rank.

diffusers reads FLUX.1's and FLUX.2's files back (`_convert_kohya_flux_lora_to_diffusers`,
`_convert_kohya_flux2_lora_to_diffusers`, behind `load_lora_weights`); it has no kohya SD3 reader, so the SD3
names follow kohya's `lora_sd3` (`lora_unet_joint_blocks_N_x_block_attn_qkv`, `..._context_block_...`, SD3.5's
`x_block_attn2_qkv`). Text-encoder factors (FLUX.1's CLIP-L, SD3's CLIP-L and CLIP-G) take `lora_te1_` /
`lora_te2_` and transformers 4's module paths, as kohya's scripts write them.
"""

from __future__ import annotations

import re

import torch

from ..errors import UserError
from .kohya import kohya_path
from .svd import Factorisation, factorise

QKV = ("to_q", "to_k", "to_v")
ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")
FLUX_DOUBLE = {  # diffusers module in a double-stream block -> (kohya module, its parts in output order)
    **{p: ("img_attn_qkv", QKV) for p in QKV}, "to_out.0": ("img_attn_proj", ("to_out.0",)),
    **{p: ("txt_attn_qkv", ADD_QKV) for p in ADD_QKV}, "to_add_out": ("txt_attn_proj", ("to_add_out",)),
}
FLUX1_SINGLE = {**{p: ("linear1", QKV + ("proj_mlp",)) for p in QKV + ("proj_mlp",)}, "proj_out": ("linear2", ("proj_out",))}
FLUX2_SINGLE = {"to_qkv_mlp_proj": ("linear1", ("to_qkv_mlp_proj",)), "to_out": ("linear2", ("to_out",))}
SD3_JOINT = {
    **{p: ("x_block_attn_qkv", QKV) for p in QKV}, "to_out.0": ("x_block_attn_proj", ("to_out.0",)),
    **{p: ("context_block_attn_qkv", ADD_QKV) for p in ADD_QKV}, "to_add_out": ("context_block_attn_proj", ("to_add_out",)),
}
SD3_DUAL = {**{p: ("x_block_attn2_qkv", QKV) for p in QKV}, "to_out.0": ("x_block_attn2_proj", ("to_out.0",))}
TEXT_PREFIXES = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def kohya_module(architecture: str, module: str) -> tuple[str, tuple[str, ...]]:
    """(kohya module name, the diffusers modules of its parts in output order) of a transformer module (its path
    in the transformer)."""
    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
    if m is not None:
        kind, i, rest = m.groups()
        if kind == "single_transformer_blocks" and architecture == "flux1":
            leaf = rest.removeprefix("attn.")  # Q, K, V are attn's; the MLP input and the output the block's own
            if leaf in FLUX1_SINGLE:
                name, parts = FLUX1_SINGLE[leaf]
                return (f"lora_unet_single_blocks_{i}_{name}",
                        tuple(f"{kind}.{i}.{'attn.' if p in QKV else ''}{p}" for p in parts))
        elif kind == "single_transformer_blocks" and architecture == "flux2" and rest.startswith("attn."):
            if rest[5:] in FLUX2_SINGLE:
                name, parts = FLUX2_SINGLE[rest[5:]]
                return f"lora_unet_single_blocks_{i}_{name}", tuple(f"{kind}.{i}.attn.{p}" for p in parts)
        elif kind == "transformer_blocks":
            attn, _, leaf = rest.partition(".")
            table = {("flux1", "attn"): FLUX_DOUBLE, ("flux2", "attn"): FLUX_DOUBLE, ("sd3", "attn"): SD3_JOINT,
                     ("sd3", "attn2"): SD3_DUAL}.get((architecture, attn), {})
            if leaf in table:
                name, parts = table[leaf]
                blocks = "joint_blocks" if architecture == "sd3" else "double_blocks"
                return f"lora_unet_{blocks}_{i}_{name}", tuple(f"{kind}.{i}.{attn}.{p}" for p in parts)
    raise UserError(f"the transformer module {module} has no name in kohya's {architecture} LoRA layout: export to "
                    "diffusers' layout instead (--format diffusers)")


def _group(architecture: str, modules) -> dict[str, tuple[str, ...]]:
    """{kohya module: its parts} for every fused module one of `modules` belongs to."""
    groups = {}
    for module in modules:
        name, parts = kohya_module(architecture, module)
        groups[name] = parts
    return groups


def _widths(transformer, parts) -> list[int]:
    named = dict(transformer.named_modules())
    return [named[p].out_features for p in parts]


def fuse_lora(transformer, architecture: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> dict:
    """{diffusers module: (down [r, in], up [out, r], scale)} -> kohya's {name.lora_down.weight, .lora_up.weight,
    .alpha} with each fused module's parts side by side (see the module's docstring)."""
    out = {}
    for name, parts in _group(architecture, factors).items():
        rank = max(factors[p][0].shape[0] for p in parts if p in factors)
        fan_in = next(factors[p][0].shape[1] for p in parts if p in factors)
        widths = _widths(transformer, parts)
        down = torch.zeros(rank * len(parts), fan_in)
        up = torch.zeros(sum(widths), rank * len(parts))
        row = 0
        for j, (part, width) in enumerate(zip(parts, widths)):
            if part in factors:
                a, b, scale = factors[part]
                r = a.shape[0]
                down[j * rank: j * rank + r] = a.float()
                up[row: row + width, j * rank: j * rank + r] = b.float() * scale
            row += width
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(rank * len(parts)))
    return out


def fuse_deltas(transformer, architecture: str, deltas: dict[str, torch.Tensor],
                rank: int | None) -> tuple[dict, Factorisation]:
    """{diffusers module: ΔW} -> kohya's LoRA of each fused module's ΔW (zero rows for untouched parts) by truncated
    SVD at `rank` (None: full, exact), scale 1; and the factorisation's errors."""
    fused = {}
    for name, parts in _group(architecture, deltas).items():
        widths = _widths(transformer, parts)
        fan_in = next(deltas[p].shape[1] for p in parts if p in deltas)
        fused[name] = torch.cat([deltas[p].float() if p in deltas else torch.zeros(w, fan_in)
                                 for p, w in zip(parts, widths)])
    svd = factorise(fused, rank)
    out = {}
    for name, (up, down) in svd.factors.items():
        out.update({f"{name}.lora_down.weight": down.contiguous(), f"{name}.lora_up.weight": up.contiguous(),
                    f"{name}.alpha": torch.tensor(float(down.shape[0]))})
    return out, svd


def text_encoder_lora(component: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> dict:
    """A text encoder's factors {module: (down, up, scale)} in kohya's names (`lora_te1_text_model_encoder_...`)."""
    prefix = TEXT_PREFIXES[component]
    out = {}
    for module, (down, up, scale) in factors.items():
        stem = prefix + "_" + kohya_path(f"{component}.{module}").partition(".")[2].replace(".", "_")
        out.update({f"{stem}.lora_down.weight": down.contiguous(), f"{stem}.lora_up.weight": (up * scale).contiguous(),
                    f"{stem}.alpha": torch.tensor(float(down.shape[0]))})
    return out
