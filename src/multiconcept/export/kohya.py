"""kohya's file layouts, which AUTOMATIC1111 and ComfyUI read too: LoRA keys and embedding files.

LoRA (kohya sd-scripts, networks/lora.py): one module per key stem, the module's path in the
pipeline component with '.' -> '_' behind the component's prefix, then `.lora_down.weight` [r, in],
`.lora_up.weight` [out, r] and `.alpha` (a scalar; the update is up @ down * alpha / r), e.g.
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight`.
Textual inversion (kohya's train_textual_inversion.py): {"emb_params": [n_vectors, dim]}.
"""

from __future__ import annotations

import torch

from ..bundle import Bundle, check_base, load_bundle
from ..errors import UserError, require
from .files import check_out_dir

# component -> key prefix, by how many text encoders the base has. SD 1.x and 2.x: one, `lora_te`.
# SDXL (two) is `lora_te1` / `lora_te2`, which is what diffusers' converter writes for every base.
PREFIXES = {
    1: {"unet": "lora_unet", "text_encoder": "lora_te"},
    2: {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
# what diffusers' converter (0.42) writes for each component, whatever the base
DIFFUSERS_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
EMBEDDING_KEY = "emb_params"


def module_key(component: str, module: str, text_encoders: int = 1) -> str:
    """kohya's key stem of a module: ('unet', 'down_blocks.0.attentions.0...attn2.to_k') ->
    'lora_unet_down_blocks_0_attentions_0_..._attn2_to_k'."""
    return f"{PREFIXES[text_encoders][component]}_{module.replace('.', '_')}"


def kohya_path(key: str) -> str:
    """transformers 5's CLIPTextModel has no `text_model` level; kohya's names (and A1111's and ComfyUI's
    mappings) are transformers 4's: text_encoder.encoder.layers.0... -> text_encoder.text_model.encoder.layers.0...
    (diffusers' loader drops the level again when the model lacks it)."""
    component, _, path = key.partition(".")
    if component.startswith("text_encoder") and not path.startswith("text_model."):
        return f"{component}.text_model.{path}"
    return key


def kohya_lora(peft: dict[str, torch.Tensor], alpha: float | None, text_encoders: int = 1) -> dict[str, torch.Tensor]:
    """peft factors {'<component>.<module>.lora_A.weight' / '.lora_B.weight'} -> kohya's layout.

    diffusers' `convert_state_dict_to_kohya` renames the factors and the module paths; two things
    are corrected after it: it names the text encoder `lora_te1` on every base (kohya, A1111 and
    ComfyUI say `lora_te` for SD 1.x/2.x; A1111 maps `lora_te1` on SD 2.x to no layer), and it sets
    every alpha to the rank (scale 1) as an int64 tensor. `alpha`: the LoRA's alpha (kept, so the
    scale alpha / r is the bundle's), or None for scale 1 (alpha = each module's rank)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    require(bool(peft), "no LoRA factors to export")
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


def expected_keys(modules: dict[str, list[str]], text_encoders: int = 1) -> set[str]:
    """Every key a kohya LoRA on these modules ({component: [module path]}) holds."""
    return {f"{module_key(c, m, text_encoders)}.{part}" for c, ms in modules.items() for m in ms
            for part in ("lora_down.weight", "lora_up.weight", "alpha")}


def embedding_file_tensors(row: torch.Tensor) -> dict[str, torch.Tensor]:
    """One token's embedding as kohya writes it and A1111, ComfyUI and diffusers read it."""
    return {EMBEDDING_KEY: row.detach().reshape(1, -1).contiguous()}


def refuse_sdxl(base, path) -> None:
    # SDXL exports need each token's two rows (clip_l / clip_g) and the second encoder's LoRA names
    if base.is_sdxl:
        raise UserError(f"bundle {path} is for an SDXL base, which export does not write yet: "
                        f"generate with `multiconcept generate -b {path}`")


def refuse_infusion(bundle: Bundle, path) -> None:
    if bundle.method == "infusion":
        raise UserError(f"bundle {path} is Infusion: its value residuals are added only at the class word's positions, "
                        f"so they depend on the prompt's tokens and no weight delta or LoRA can carry them; "
                        f"generate with `multiconcept generate -b {path}`")


def exportable_bundle(bundle_path, base, out) -> Bundle:
    """The bundle, once the output folder, its base and what the writers can carry are checked: every
    export's first step, before anything is computed or written."""
    check_out_dir(out)
    bundle = load_bundle(bundle_path)
    check_base(bundle, base, str(bundle_path))
    refuse_sdxl(base, bundle_path)
    refuse_infusion(bundle, bundle_path)
    return bundle
