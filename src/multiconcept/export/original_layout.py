"""The original single-file layout of SD 1.x, SD 2.x and SDXL checkpoints, from a diffusers pipeline.

A1111, ComfyUI, kohya's sd-scripts and diffusers' `from_single_file` read one `.safetensors` whose keys
are the original training code's (CompVis latent-diffusion for SD 1.x / 2.x, Stability's SGM for SDXL):

- UNet ``model.diffusion_model.``: blocks numbered in one row. ``input_blocks.0`` is conv_in, then per
  level `layers_per_block` layers and a downsampler (``.op``); ``middle_block`` 0 / 1 / 2 is resnet /
  transformer / resnet; ``output_blocks`` have one layer more per level, the upsampler behind the last
  layer (its ``.1`` on a level without attention, ``.2`` after a transformer). In a layer ``.0`` is the
  resnet (norm1 → in_layers.0, conv1 → in_layers.2, time_emb_proj → emb_layers.1, norm2 → out_layers.0,
  conv2 → out_layers.3, conv_shortcut → skip_connection) and ``.1`` the transformer (diffusers' names).
- VAE ``first_stage_model.``: encoder.down.i.block.j / .downsample; decoder.up numbered from the lowest
  resolution up, so diffusers' up_blocks.i is up.{n-1-i}; mid.block_1 / attn_1 / block_2; the mid
  attention's q, k, v, proj_out are 1x1 convolutions (diffusers: linear layers).
- Text encoders: OpenAI CLIP keeps transformers' names under ``cond_stage_model.transformer.text_model.``
  (SD 1.x) or ``conditioner.embedders.0.transformer.text_model.`` (SDXL's first); OpenCLIP (SD 2.x's
  ``cond_stage_model.model.``, SDXL's second ``conditioner.embedders.1.model.``) has its own: q, k, v
  stacked in one ``attn.in_proj_weight``, ``text_projection`` stored transposed (x @ P, not a Linear).

FLUX.1, FLUX.2 [klein] and SD3 / 3.5 files keep their transformer in BFL's or Stability's names
(models/flow_layout.py), SD3's and FLUX.1's VAE in the same layout as SD's (under ``first_stage_model.`` or ComfyUI's
``vae.``) and their text encoders in transformers' names under ``text_encoders.clip_l.transformer.``,
``text_encoders.clip_g.transformer.`` and ``text_encoders.t5xxl.transformer.``.

`original_keys` maps every weight of a pipeline to its key; `original_tensors` builds the tensors.
diffusers' single-file loader reads them back (the tests check the round trip).
"""

from __future__ import annotations

import re

import torch

from ..errors import UserError, require
from ..models.flow_layout import FILE_PARTS, WRITTEN_PREFIX, transformer_keys
from ..models.layout import Source, build

UNET = "model.diffusion_model."
VAE = "first_stage_model."
# text encoder component -> (prefix, OpenCLIP layout?) by architecture
TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", False)},
    "sd2": {"text_encoder": ("cond_stage_model.model.", True)},
    "sdxl": {"text_encoder": ("conditioner.embedders.0.transformer.", False),
             "text_encoder_2": ("conditioner.embedders.1.model.", True)},
}

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def unet_module(module: str, layers_per_block: int, up_has_attention: tuple[bool, ...] = ()) -> str:
    """diffusers' path of a UNet module (or parameter) -> the original's, without the `model.diffusion_model.` prefix.
    `up_has_attention[i]`: whether up block i has transformers (where its upsampler sits); needed for upsamplers only."""
    step = layers_per_block + 1
    for top, orig in UNET_TOP.items():
        if module == top or module.startswith(top + "."):
            return orig + module[len(top):]
    down = lambda b, j: f"input_blocks.{1 + b * step + j}"
    up = lambda b, j: f"output_blocks.{b * step + j}"
    rules = (
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.([^.]+)(.*)", lambda b, j, p, r: f"{down(b, j)}.0.{RESNET[p]}{r}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda b, j, r: f"{down(b, j)}.1.{r}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv(.*)", lambda b, r: f"{down(b, layers_per_block)}.0.op{r}"),
        (r"mid_block\.resnets\.(\d+)\.([^.]+)(.*)", lambda i, p, r: f"middle_block.{2 * i}.{RESNET[p]}{r}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda r: f"middle_block.1.{r}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.([^.]+)(.*)", lambda b, j, p, r: f"{up(b, j)}.0.{RESNET[p]}{r}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda b, j, r: f"{up(b, j)}.1.{r}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv(.*)",
         lambda b, r: f"{up(b, layers_per_block)}.{2 if up_has_attention[b] else 1}.conv{r}"),
    )
    for pattern, make in rules:
        m = re.fullmatch(pattern, module)
        if m:
            groups = [int(g) if g.isdigit() else g for g in m.groups()]
            try:
                return make(*groups)
            except (KeyError, IndexError):
                break
    raise UserError(f"the UNet weight {module} has no place in the original SD / SDXL layout: "
                    "use a StableDiffusionPipeline or StableDiffusionXLPipeline base")


def vae_key(name: str, up_blocks: int) -> tuple[str, str]:
    """(original key without `first_stage_model.`, how) for a diffusers AutoencoderKL weight."""
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", name)
    if m is None:
        return name, "copy"  # quant_conv, post_quant_conv
    part, rest = m.groups()
    rules = (
        (r"conv_norm_out\.(.+)", lambda r: f"norm_out.{r}"),
        (r"(conv_in|conv_out)\.(.+)", lambda c, r: f"{c}.{r}"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda i, j, r: f"down.{i}.block.{j}.{r}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda i, r: f"down.{i}.downsample.conv.{r}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda i, j, r: f"up.{up_blocks - 1 - int(i)}.block.{j}.{r}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", lambda i, r: f"up.{up_blocks - 1 - int(i)}.upsample.conv.{r}"),
        (r"mid_block\.resnets\.(\d+)\.(.+)", lambda i, r: f"mid.block_{int(i) + 1}.{r}"),
    )
    for pattern, make in rules:
        m = re.fullmatch(pattern, rest)
        if m:
            return f"{part}.{make(*m.groups()).replace('conv_shortcut', 'nin_shortcut')}", "copy"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", rest)
    if m:
        layer, kind = m.groups()
        # the original's attention projections are 1x1 convolutions; its norm stays a norm
        how = "conv1x1" if kind == "weight" and layer != "group_norm" else "copy"
        return f"{part}.mid.attn_1.{VAE_ATTENTION[layer]}.{kind}", how
    raise UserError(f"the VAE weight {name} has no place in the original SD / SDXL layout: use an AutoencoderKL base")


def open_clip_key(name: str) -> tuple[str, str, int]:
    """(original key, how, which of q/k/v it is in a stacked in_proj or -1) for a CLIP text model weight."""
    if name in OPEN_CLIP_TOP:
        return OPEN_CLIP_TOP[name], "copy", -1
    if name == "text_projection.weight":
        return "text_projection", "transpose", -1
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", name)
    if m:
        i, which, kind = m.groups()
        return f"transformer.resblocks.{i}.attn.in_proj_{kind}", "stack", "qkv".index(which)
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2|self_attn\.out_proj)\.(.+)", name)
    if m:
        i, part, rest = m.groups()
        return f"transformer.resblocks.{i}.{OPEN_CLIP_LAYER[part]}.{rest}", "copy", -1
    raise UserError(f"the text encoder weight {name} has no place in the OpenCLIP layout: use an SD 2.x or SDXL base")


def original_keys(pipe, architecture: str) -> dict[str, Source]:
    """{original key: Source} for every weight of an SD 1.x / 2.x / SDXL pipeline's UNet, VAE and text encoders, or of
    a FLUX.1 / FLUX.2 [klein] / SD3 pipeline's transformer and the parts its single file holds (FILE_PARTS)."""
    if architecture in FILE_PARTS:
        return _flow_keys(pipe, architecture)
    require(architecture in TEXT_ENCODERS, f"unknown architecture {architecture!r}: the original layout knows "
                                           f"{', '.join([*TEXT_ENCODERS, *FILE_PARTS])}")
    cfg = pipe.unet.config
    layers = cfg.layers_per_block
    require(isinstance(layers, int), f"the UNet has per-level layer counts {layers}, which the original layout cannot "
                                     "number: use a base with one layers_per_block")
    up_attention = tuple(t.startswith("CrossAttn") for t in cfg.up_block_types)
    keys: dict[str, Source] = {}
    for name in pipe.unet.state_dict():
        keys[UNET + unet_module(name, layers, up_attention)] = Source((f"unet.{name}",))
    keys.update(_vae_keys(pipe, VAE))
    for component, (prefix, open_clip) in TEXT_ENCODERS[architecture].items():
        keys.update(_text_encoder_keys(pipe, component, prefix, "open_clip" if open_clip else "clip"))
    return keys


def _flow_keys(pipe, architecture: str) -> dict[str, Source]:
    keys = transformer_keys(architecture, pipe.transformer, WRITTEN_PREFIX[architecture])
    for component, prefix in FILE_PARTS[architecture].items():
        if component == "vae":
            keys.update(_vae_keys(pipe, prefix))
        elif getattr(pipe, component, None) is not None:  # SD3 may come without its T5
            kind = "t5" if type(getattr(pipe, component)).__name__.startswith("T5") else "clip"
            keys.update(_text_encoder_keys(pipe, component, prefix, kind))
    if architecture == "sd3":
        # SD3's reference code pools CLIP-L without a projection; diffusers reads the file's as the identity
        proj = getattr(pipe.text_encoder, "text_projection", None)
        require(proj is None or torch.equal(proj.weight, torch.eye(*proj.weight.shape, dtype=proj.weight.dtype,
                                                                      device=proj.weight.device)),
                "the SD3 pipeline's CLIP-L has a text projection other than the identity, which SD3's single-file "
                "layout cannot hold (diffusers loads it as the identity): use a base whose CLIP-L projection is the "
                "identity, as SD3's is")
    return keys


def _vae_keys(pipe, prefix: str) -> dict[str, Source]:
    up_blocks = len(pipe.vae.config.up_block_types)
    keys = {}
    for name in pipe.vae.state_dict():
        key, how = vae_key(name, up_blocks)
        keys[prefix + key] = Source((f"vae.{name}",), how)
    return keys


def _text_encoder_keys(pipe, component: str, prefix: str, kind: str) -> dict[str, Source]:
    """A text encoder's keys: OpenAI CLIP and T5 in transformers' names (CLIP with transformers 4's `text_model.`
    level, its projection beside it), OpenCLIP in its own. A tied weight is stored once: T5's token table under
    `shared` (its encoder's embed_tokens is the same tensor, as ComfyUI's T5 has only `shared`)."""
    keys: dict[str, Source] = {}
    stacks: dict[str, list[str | None]] = {}
    seen: set[int] = set()
    for name, t in getattr(pipe, component).state_dict().items():
        if name.endswith("position_ids") or t.data_ptr() in seen:  # a buffer of 0..n-1, or a tied weight's alias
            continue
        seen.add(t.data_ptr())
        path = name.removeprefix("text_model.")  # transformers 5's CLIPTextModel has no text_model level
        if kind == "t5" or (kind == "clip" and path.startswith("text_projection.")):
            keys[prefix + path] = Source((f"{component}.{name}",))
        elif kind == "clip":
            keys[f"{prefix}text_model.{path}"] = Source((f"{component}.{name}",))
        else:
            key, how, which = open_clip_key(path)
            if how == "stack":
                stacks.setdefault(prefix + key, [None, None, None])[which] = f"{component}.{name}"
            else:
                keys[prefix + key] = Source((f"{component}.{name}",), how)
    for key, parts in stacks.items():
        require(None not in parts, f"{component} lacks q, k or v for {key}: the text encoder is incomplete")
        keys[key] = Source(tuple(parts), "stack")
    return keys


def layout_parts(pipe, architecture: str) -> list[str]:
    """The pipeline components the original layout holds."""
    if architecture in FILE_PARTS:
        return ["transformer", *(c for c in FILE_PARTS[architecture] if getattr(pipe, c, None) is not None)]
    return ["unet", "vae", *TEXT_ENCODERS[architecture]]


def pipeline_tensors(pipe, architecture: str) -> dict[str, torch.Tensor]:
    """{component.parameter: tensor} of the pipeline parts the original layout holds."""
    return {f"{c}.{k}": v for c in layout_parts(pipe, architecture) for k, v in getattr(pipe, c).state_dict().items()}


def original_tensors(pipe, architecture: str, keys: dict[str, Source] | None = None) -> dict[str, torch.Tensor]:
    """The pipeline's weights in the original layout (all of them, or those `keys` names), contiguous, on the CPU."""
    tensors = pipeline_tensors(pipe, architecture)
    keys = original_keys(pipe, architecture) if keys is None else keys
    return {key: build(source, tensors).detach().cpu().contiguous() for key, source in keys.items()}
