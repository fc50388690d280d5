"""The original single-file layouts of the flow transformers, and where a single file keeps each part of a pipeline.

FLUX.1 and FLUX.2 as Black Forest Labs' reference code names them, SD3 / 3.5 as Stability's MM-DiT does; diffusers'
`from_single_file` reads these names (single_file_utils' FLUX, FLUX.2 and SD3 converters). Where they differ from
diffusers' (layout.py says how a tensor is made):

- each stream's q, k and v are one projection: FLUX's ``double_blocks.N.img_attn.qkv`` / ``txt_attn.qkv``, SD3's
  ``joint_blocks.N.x_block.attn.qkv`` / ``context_block.attn.qkv`` (SD3.5's second, image-only attention
  ``x_block.attn2.qkv``); FLUX.1's single-stream ``linear1`` stacks q, k, v and the MLP input, in that order;
- FLUX's q/k RMS norms keep their weight as ``scale``;
- every continuous AdaLN (``final_layer.adaLN_modulation.1``, SD3's last context block, whose text stream ends
  there) projects to (shift, scale), diffusers' AdaLayerNormContinuous to (scale, shift).

A file's transformer sits under ``model.diffusion_model.`` (Stability's and ComfyUI's files, which also hold the VAE
and text encoders) or at the top (BFL's own files, the transformer alone: the other parts then come from
`--base-config`).
"""

from __future__ import annotations

import re

import torch

from ..errors import UserError, require
from .layout import Source, split

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")  # Stability's name; ComfyUI's checkpoints of FLUX.1 use the other
# where a single file keeps a pipeline's other parts, as ComfyUI saves a FLUX.1 checkpoint and Stability ships SD3.5
# with its text encoders (transformers' names under each prefix); BFL's FLUX.2 [klein] file is the transformer alone
FILE_PARTS = {
    "flux1": {"vae": "vae.", "text_encoder": "text_encoders.clip_l.transformer.",
              "text_encoder_2": "text_encoders.t5xxl.transformer."},
    "sd3": {"vae": "first_stage_model.", "text_encoder": "text_encoders.clip_l.transformer.",
            "text_encoder_2": "text_encoders.clip_g.transformer.", "text_encoder_3": "text_encoders.t5xxl.transformer."},
    "flux2": {},
}
# the prefix a writer gives the transformer: the all-in-one files', or none where the file is the transformer alone
WRITTEN_PREFIX = {"flux1": TRANSFORMER_PREFIX, "sd3": TRANSFORMER_PREFIX, "flux2": ""}

QKV = ("to_q", "to_k", "to_v")
ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")
# a diffusers module inside a block -> its original module; modules that share an original one are stacked in this
# order (the tables' order, not the models': SD3 registers add_k_proj before add_q_proj)
FLUX_DOUBLE_ATTENTION = {
    **{f"attn.{p}": "img_attn.qkv" for p in QKV}, **{f"attn.{p}": "txt_attn.qkv" for p in ADD_QKV},
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
}


def _mlp(diffusers: str, original: str, layers=("in_layer", "out_layer")) -> dict[str, str]:
    """An embedder's two linear layers (diffusers' linear_1 / linear_2) under their original names."""
    return {f"{diffusers}.linear_1": f"{original}.{layers[0]}", f"{diffusers}.linear_2": f"{original}.{layers[1]}"}


# FLUX.1's and FLUX.2's inputs and output layer
FLUX_ENDS = {"context_embedder": "txt_in", "x_embedder": "img_in", "norm_out.linear": "final_layer.adaLN_modulation.1",
             "proj_out": "final_layer.linear"}
LAYOUTS = {
    "flux1": {
        "top": {**_mlp("time_text_embed.timestep_embedder", "time_in"),
                **_mlp("time_text_embed.guidance_embedder", "guidance_in"),
                **_mlp("time_text_embed.text_embedder", "vector_in"), **FLUX_ENDS},
        "transformer_blocks": ("double_blocks", {
            **FLUX_DOUBLE_ATTENTION, "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
            "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
            "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}),
        "single_transformer_blocks": ("single_blocks", {
            **{f"attn.{p}": "linear1" for p in QKV}, "proj_mlp": "linear1", "proj_out": "linear2",
            "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm", "norm.linear": "modulation.lin"}),
    },
    "flux2": {
        # FLUX.2 modulates every block of a kind from one projection of the timestep embedding
        "top": {**_mlp("time_guidance_embed.timestep_embedder", "time_in"),
                **_mlp("time_guidance_embed.guidance_embedder", "guidance_in"),
                **{f"{m}.linear": f"{m}.lin" for m in ("double_stream_modulation_img", "double_stream_modulation_txt",
                                                        "single_stream_modulation")}, **FLUX_ENDS},
        "transformer_blocks": ("double_blocks", {
            **FLUX_DOUBLE_ATTENTION, "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
            "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}),
        # FLUX.2's single block keeps q, k, v and the MLP input fused in diffusers too
        "single_transformer_blocks": ("single_blocks", {
            "attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2",
            "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}),
    },
    "sd3": {
        "top": {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
                **_mlp("time_text_embed.timestep_embedder", "t_embedder.mlp", ("0", "2")),
                **_mlp("time_text_embed.text_embedder", "y_embedder.mlp", ("0", "2")),
                "context_embedder": "context_embedder",
                "norm_out.linear": "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear"},
        "transformer_blocks": ("joint_blocks", {
            **{f"attn.{p}": "x_block.attn.qkv" for p in QKV}, **{f"attn.{p}": "context_block.attn.qkv" for p in ADD_QKV},
            **{f"attn2.{p}": "x_block.attn2.qkv" for p in QKV},
            "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
            "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
            "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
            "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
            "attn2.to_out.0": "x_block.attn2.proj",
            "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
            "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
            "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}),
    },
}


def _original(layout: dict, name: str) -> tuple[str, int]:
    """(original key, the diffusers module's place in its table: the stacking order) of a transformer parameter."""
    top = layout["top"]
    if name in top:  # a parameter of its own (SD3's pos_embed)
        return top[name], 0
    module, _, param = name.rpartition(".")
    if module in top:
        return f"{top[module]}.{param}", 0
    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
    if m and m.group(1) in layout and m.group(3) in layout[m.group(1)][1]:
        blocks, table = layout[m.group(1)]
        inner = table[m.group(3)]
        # FLUX's q/k norms (RMSNorm) call their weight `scale`
        kind = "scale" if inner.endswith("_norm") and param == "weight" else param
        return f"{blocks}.{m.group(2)}.{inner}.{kind}", list(table).index(m.group(3))
    raise UserError(f"the transformer weight {name} has no place in the original single-file layout: "
                    "use a FLUX.1, FLUX.2 [klein] or SD3 base of diffusers' own classes")


def transformer_keys(architecture: str, transformer, prefix: str = "") -> dict[str, Source]:
    """{original key: Source} for every weight of a FLUX.1 / FLUX.2 / SD3 transformer (`transformer.`-named params),
    each key behind `prefix`."""
    layout = LAYOUTS[architecture]
    modules = dict(transformer.named_modules())
    parts: dict[str, list[tuple[int, str]]] = {}
    for name in transformer.state_dict():
        key, order = _original(layout, name)
        parts.setdefault(prefix + key, []).append((order, f"transformer.{name}"))
    keys = {}
    for key, found in parts.items():
        params = tuple(p for _, p in sorted(found))
        module = params[0].removeprefix("transformer.").rpartition(".")[0]
        continuous = type(modules.get(module.rpartition(".")[0])).__name__ == "AdaLayerNormContinuous"
        keys[key] = Source(params, "stack" if len(params) > 1 else "swap" if continuous else "copy")
    return keys


def read_transformer(architecture: str, transformer, tensors, path) -> dict[str, torch.Tensor]:
    """The transformer's state dict (diffusers' names) from a file's original tensors (`tensors[key]`, key with or
    without ``model.diffusion_model.``), every weight cut to the model's own widths. `transformer` may be on the
    meta device: only its names and shapes are read."""
    shapes = {f"transformer.{k}": v.shape for k, v in transformer.state_dict().items()}
    keys = transformer_keys(architecture, transformer)
    prefix = TRANSFORMER_PREFIX if any(k.startswith(TRANSFORMER_PREFIX) for k in tensors) else ""
    missing = [k for k in keys if prefix + k not in tensors]
    require(not missing, f"{path} lacks {len(missing)} of the transformer's weights (e.g. {prefix}"
                         f"{missing[0] if missing else ''}): it is incomplete, or --base-config describes another model")
    others = (*VAE_PREFIXES, "text_encoders.")
    unused = next((k for k in tensors if k.startswith(prefix) and not k.startswith(others) and k[len(prefix):] not in keys),
                  None)
    require(unused is None, f"{path} holds transformer weights that --base-config's transformer has no place for (e.g. "
                            f"{unused}): pass the configs of the model this file holds")
    out = {}
    for key, source in keys.items():
        t = tensors[prefix + key]
        stacked = sum(shapes[p][0] for p in source.params) if source.how == "stack" else t.shape[0]
        parts = split(source, t, shapes) if t.shape[0] == stacked else {}
        fits = bool(parts) and all(parts[p].shape == shapes[p] for p in source.params)
        want = ", ".join(f"{p.removeprefix('transformer.')} {tuple(shapes[p])}" for p in source.params)
        require(fits, f"{path}'s {prefix}{key} {tuple(t.shape)} does not fit --base-config's transformer ({want}): "
                      "pass the configs of the model this file holds")
        out.update({p.removeprefix("transformer."): v for p, v in parts.items()})
    return out
