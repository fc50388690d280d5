"""kohya's file layouts, which AUTOMATIC1111 and ComfyUI read too: LoRA keys and embedding files.

LoRA (kohya sd-scripts, networks/lora.py): one module per key stem, the module's path in the
pipeline component with '.' -> '_' behind the component's prefix, then `.lora_down.weight` [r, in],
`.lora_up.weight` [out, r] and `.alpha` (a scalar; the update is up @ down * alpha / r), e.g.
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight`.
Textual inversion (kohya's train_textual_inversion.py): {"emb_params": [n_vectors, dim]}; SDXL
(sdxl_train_textual_inversion.py): {"clip_l": [n, 768], "clip_g": [n, 1280]}, the two encoders' rows.
SDXL LoRAs name the UNet's modules as the original (SGM) model does, as kohya's SDXL scripts write them
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k`); A1111, ComfyUI and diffusers map those.
"""

from __future__ import annotations

import torch

from ..bundle import Bundle, check_base, load_bundle
from ..errors import UserError, require
from .files import check_out_dir
from .original_layout import unet_module

# component -> key prefix, by how many text encoders the base has. SD 1.x and 2.x: one, `lora_te`.
# SDXL (two) is `lora_te1` / `lora_te2`, which is what diffusers' converter writes for every base.
PREFIXES = {
    1: {"unet": "lora_unet", "text_encoder": "lora_te"},
    2: {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
# what diffusers' converter (0.42) writes for each component, whatever the base
DIFFUSERS_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
EMBEDDING_KEY = "emb_params"
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # the first (CLIP ViT-L) and second (OpenCLIP ViT-bigG) encoder's rows


def kohya_path(key: str) -> str:
    """transformers 5's CLIPTextModel has no `text_model` level; kohya's names (and A1111's and ComfyUI's
    mappings) are transformers 4's: text_encoder.encoder.layers.0... -> text_encoder.text_model.encoder.layers.0...
    (diffusers' loader drops the level again when the model lacks it)."""
    component, _, path = key.partition(".")
    if component.startswith("text_encoder") and not path.startswith("text_model."):
        return f"{component}.text_model.{path}"
    return key


def sgm_module(module: str, layers_per_block: int) -> str:
    """diffusers' path of an SDXL UNet attention module -> the original model's (original_layout.unet_module
    numbers the blocks). Only attention modules are mapped: those are what LoRA and Custom Diffusion train."""
    if ".attentions." not in module:
        raise UserError(f"the UNet module {module} is not in an attention block, which the SDXL LoRA names cannot place: "
                        f"export to diffusers' layout instead (--format diffusers)")
    return unet_module(module, layers_per_block)


def kohya_lora(peft: dict[str, torch.Tensor], alpha: float | None, text_encoders: int = 1,
               sgm_layers: int | None = None) -> dict[str, torch.Tensor]:
    """peft factors {'<component>.<module>.lora_A.weight' / '.lora_B.weight'} -> kohya's layout.

    diffusers' `convert_state_dict_to_kohya` renames the factors and the module paths; two things
    are corrected after it: it names the text encoder `lora_te1` on every base (kohya, A1111 and
    ComfyUI say `lora_te` for SD 1.x/2.x; A1111 maps `lora_te1` on SD 2.x to no layer), and it sets
    every alpha to the rank (scale 1) as an int64 tensor. `alpha`: the LoRA's alpha (kept, so the
    scale alpha / r is the bundle's), or None for scale 1 (alpha = each module's rank). `sgm_layers`:
    the UNet's layers per block when its modules take the original model's names (SDXL), else None."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    require(bool(peft), "no LoRA factors to export")
    if sgm_layers is not None:
        peft = {(f"unet.{sgm_module(k[len('unet.'):k.rindex('.lora_')], sgm_layers)}{k[k.rindex('.lora_'):]}"
                 if k.startswith("unet.") else k): v for k, v in peft.items()}
    converted = convert_state_dict_to_kohya({kohya_path(k): v for k, v in peft.items()})
    out: dict[str, torch.Tensor] = {}
    for key, t in converted.items():
        stem, _, part = key.partition(".")
        component = next(c for c, p in DIFFUSERS_PREFIXES.items() if stem.startswith(p + "_"))
        stem = PREFIXES[text_encoders][component] + stem[len(DIFFUSERS_PREFIXES[component]):]
        if part == "alpha":
            rank = converted[key[: -len("alpha")] + "lora_down.weight"].shape[0]
            t = torch.tensor(float(rank if alpha is None else alpha), dtype=torch.float32)
        out[f"{stem}.{part}"] = t.contiguous()
    return out


def embedding_file_tensors(row: torch.Tensor) -> dict[str, torch.Tensor]:
    """One token's embedding as kohya writes it and A1111, ComfyUI and diffusers read it."""
    return {EMBEDDING_KEY: row.detach().reshape(1, -1).contiguous()}


def sdxl_embedding_loading_code(path: str, token: str) -> list[str]:
    """The diffusers lines that load an SDXL embedding file: each encoder's rows into its own encoder."""
    return [f'rows = load_file("{path}")'] + [
        f'pipe.load_textual_inversion(rows["{key}"], token="{token}", text_encoder=pipe.text_encoder{n}, '
        f'tokenizer=pipe.tokenizer{n})' for key, n in zip(SDXL_EMBEDDING_KEYS, ("", "_2"))]


def sdxl_embedding_file_tensors(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One token's two rows (first encoder, second encoder) as kohya's SDXL script writes them."""
    return {key: row.detach().reshape(1, -1).contiguous() for key, row in zip(SDXL_EMBEDDING_KEYS, rows)}


def refuse_infusion(method: str, path) -> None:
    if method == "infusion":
        raise UserError(f"bundle {path} is Infusion: its value residuals are added only at the class word's positions, "
                        f"so they depend on the prompt's tokens and no weight delta or LoRA can carry them; "
                        f"generate with `multiconcept generate -b {path}`")


def exportable_bundle(bundle_path, base, out) -> Bundle:
    """The bundle, once the output folder, its base and what the writers can carry are checked: every
    export's first step, before anything is computed or written."""
    check_out_dir(out)
    bundle = load_bundle(bundle_path)
    check_base(bundle, base, str(bundle_path))
    refuse_infusion(bundle.method, bundle_path)
    return bundle
