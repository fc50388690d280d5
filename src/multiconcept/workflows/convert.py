"""Official FastComposer checkpoint → a multiconcept FastComposer model folder.

The release (mit-han-lab/fastcomposer, MIT licence, 4.5 GB) is one
`torch.save`d `state_dict()` of its whole model. It is read with
`torch.load(path, map_location="cpu", weights_only=True)` only: a file that
needs any other unpickling is refused, never executed.

Assumed original key layout (diffusers 0.16 / transformers 4.2x era; the
model held `unet`, `image_encoder` — a wrapper around a CLIPVisionModel's
`vision_model` and the CLIP `visual_projection` —, `postfuse_module`,
`text_encoder` and `vae`), and where each key goes:

    unet.<key>                               → unet.safetensors  <key>  (UNet2DConditionModel
                                                names are unchanged since 0.16; checked by shape)
    image_encoder.vision_model.<key>         → image_encoder.safetensors  vision_model.<key>
    image_encoder.visual_projection.weight   → image_encoder.safetensors  visual_projection.weight
    postfuse_module.mlp{1,2}.layernorm.*     → fusion.safetensors  mlp{1,2}.norm.*
    postfuse_module.mlp{1,2}.fc{1,2}.*       → fusion.safetensors  mlp{1,2}.fc{1,2}.*
    postfuse_module.layer_norm.*             → fusion.safetensors  norm.*
    text_encoder.*, vae.*                    → dropped: frozen in training, identical to the base's
    image_encoder.vision_model.embeddings.position_ids
                                             → dropped: a buffer transformers 5 does not save

A leading "module." (DDP / accelerate wrapping) is stripped. The vision
config is read off the tensor shapes; the head count is not in any shape, so
it defaults to hidden / 64 (every OpenAI CLIP vision tower, ViT-L/14's 16
heads included, uses 64-d heads) unless given.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import torch

from ..errors import UserError, require
from ..methods.fastcomposer import CLIP_MEAN, CLIP_STD, save_model_folder

PAPER_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the runwayml id left the hub in 2024
FUSION_RENAMES = (("layernorm.", "norm."), ("layer_norm.", "norm."))
DROPPED_PREFIXES = ("text_encoder.", "vae.")
DROPPED_KEYS = ("image_encoder.vision_model.embeddings.position_ids",)


def load_official(path: str | Path) -> dict[str, torch.Tensor]:
    """The released state dict, weights-only; one-line errors for anything else."""
    path = Path(path)
    require(path.is_file(), f"checkpoint {path} does not exist: pass the released FastComposer .bin/.pt file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} is not a weights-only state dict (it pickles Python objects, which could run code), "
                        "so it is refused: re-save it as a plain state dict of tensors, or convert it to safetensors") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path} is not a readable torch checkpoint ({first}): pass the released FastComposer weights") from e
    for key in ("state_dict", "model", "module"):  # a wrapped state dict
        if isinstance(sd, dict) and len(sd) == 1 and isinstance(sd.get(key), dict):
            sd = sd[key]
    require(isinstance(sd, dict) and sd and all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()),
            f"{path} does not hold a state dict of tensors: pass the released FastComposer weights")
    if all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def split_official(sd: dict[str, torch.Tensor]) -> tuple[dict, dict, dict, dict[str, int]]:
    """(unet, image_encoder, fusion) state dicts under current names, and dropped-key counts."""
    unet, vision, fusion, dropped = {}, {}, {}, {"text_encoder": 0, "vae": 0, "buffers": 0}
    unknown = []
    for k, v in sd.items():
        if k.startswith("unet."):
            unet[k.removeprefix("unet.")] = v
        elif k in DROPPED_KEYS:
            dropped["buffers"] += 1
        elif k.startswith("image_encoder.vision_model.") or k == "image_encoder.visual_projection.weight":
            vision[k.removeprefix("image_encoder.")] = v
        elif k.startswith("postfuse_module."):
            name = k.removeprefix("postfuse_module.")
            for old, new in FUSION_RENAMES:
                name = re.sub(rf"(^|\.){re.escape(old)}", rf"\g<1>{new}", name)
            fusion[name] = v
        elif k.startswith(DROPPED_PREFIXES):
            dropped[k.split(".", 1)[0]] += 1
        else:
            unknown.append(k)
    require(not unknown, f"the checkpoint has {len(unknown)} key(s) of no known FastComposer part, e.g. "
                         f"{', '.join(sorted(unknown)[:3])}: is it a FastComposer checkpoint?")
    for part, got in (("unet.", unet), ("image_encoder.", vision), ("postfuse_module.", fusion)):
        require(bool(got), f"the checkpoint has no {part}* weights: is it a FastComposer checkpoint?")
    return unet, vision, fusion, dropped


def vision_config_from_shapes(vision: dict[str, torch.Tensor], heads: int | None = None) -> dict:
    """A CLIPVisionConfig's fields read off the weights (see module doc for heads)."""
    def get(name):
        require(name in vision, f"the image encoder lacks {name}: is it a CLIP vision tower?")
        return vision[name]

    hidden = get("vision_model.embeddings.class_embedding").shape[0]
    patch = get("vision_model.embeddings.patch_embedding.weight").shape[-1]
    positions = get("vision_model.embeddings.position_embedding.weight").shape[0]
    grid = math.isqrt(positions - 1)
    require(grid * grid == positions - 1, f"the vision tower has {positions} positions, not a square grid + CLS")
    layers = 1 + max(int(m.group(1)) for k in vision if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k)))
    heads = heads or max(1, hidden // 64)
    require(hidden % heads == 0, f"{heads} attention heads do not divide the vision width {hidden}: pass --vision-heads")
    return {
        "hidden_size": hidden, "intermediate_size": get("vision_model.encoder.layers.0.mlp.fc1.weight").shape[0],
        "num_hidden_layers": layers, "num_attention_heads": heads, "image_size": grid * patch, "patch_size": patch,
        "projection_dim": get("visual_projection.weight").shape[0], "num_channels": 3, "hidden_act": "quick_gelu",
    }


def convert_fastcomposer(ckpt: str | Path, out: str | Path, base: str | None = None, vision_heads: int | None = None,
                         device: str = "cpu") -> Path:
    """Write the model folder `out` from the released checkpoint.

    With `base` (e.g. a local SD 1.5 folder) the UNet is checked against it and
    its fingerprint recorded; without, the paper's base name is recorded and
    `compose --base` must point at a copy of it."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ..methods.fastcomposer import FusionMLP, load_state_checked

    unet, vision, fusion, dropped = split_official(load_official(ckpt))
    vcfg = vision_config_from_shapes(vision, vision_heads)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**vcfg))
    load_state_checked(model, vision, "image encoder", Path(ckpt), "is this a FastComposer checkpoint? "
                       "its image encoder is not a CLIP vision tower")
    d = fusion.get("mlp2.fc1.weight", torch.empty(0, 0)).shape[0]
    require(d > 0 and "mlp1.fc1.weight" in fusion and fusion["mlp1.fc1.weight"].shape[1] == 2 * d,
            "the fusion MLP's first layer does not read [text ; image] of equal widths: not the FastComposer layout")
    load_state_checked(FusionMLP(d, d), fusion, "fusion MLP", Path(ckpt), "not the FastComposer postfuse layout")
    require(vcfg["projection_dim"] == d, f"the image embedding is {vcfg['projection_dim']}-d but the fusion MLP reads {d}-d")
    base_name, fingerprint, weights = PAPER_BASE, None, {}
    if base is not None:
        from ..models import load_base

        b = load_base(base, device=device)
        require(b.text_encoder.config.hidden_size == d,
                f"base {base!r} has a {b.text_encoder.config.hidden_size}-d text encoder but the checkpoint's fusion MLP is "
                f"{d}-d: pass the base it was trained on (SD 1.5)")
        load_state_checked(b.unet, unet, "UNet", Path(ckpt), f"base {base!r} is not the one it was trained on (SD 1.5)")
        base_name, fingerprint, weights = b.name, b.fingerprint, b.weights
    out = Path(out)
    save_model_folder(out, fusion=fusion, image_encoder=vision, unet=unet, config={
        "base_name": base_name, "base_fingerprint": fingerprint, "base_weights": weights, "text_dim": d, "image_dim": d,
        "vision_config": vcfg, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "method": "fastcomposer", "converted_from": Path(ckpt).name, "dropped": dropped,
    })
    return out
