"""Bake bundles into a single-file checkpoint that AUTOMATIC1111, ComfyUI, kohya's sd-scripts and
diffusers' `from_single_file` load: the base's weights in the original layout (original_layout.py) with
the bundles' weight changes added, the learned tokens beside it as embedding files, and a README.

A weight change is what generation adds to the base: Custom Diffusion's and DisenDiff's UNet (or transformer)
deltas (ΔW, added as they are), and a LoRA bundle's alpha / r · B A on each layer it trains (peft's merge, at the
weight 1 generation gives it). Several bundles' changes to one weight add up, as they do when loaded
together. The changes are added in diffusers' names, before the original layout fuses anything: a delta of
FLUX's or SD3's text-stream `add_k_proj` lands in the K rows of the fused `txt_attn.qkv` / `context_block.attn.qkv`
because that tensor is stacked from the changed parts (and a LoRA of FLUX.2's fused single-block projection is a
change of `linear1` itself). A standard checkpoint's vocabulary cannot grow, so new tokens travel as embedding files
(A1111 and ComfyUI name the token after the file); Infusion is refused (its value residuals are added only
at the class word's positions: no weight change carries them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..bundle import Bundle, delta_prefix
from ..errors import require
from ..models import Base
from ..models.layout import build
from .diffusers import lora_parts
from .files import write_all
from .flow import flow_baked_readme
from .kohya import exportable_bundle
from .original_layout import original_keys, pipeline_tensors
from .readme import baked_readme
from .tools import add_embedding_files

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Baked:
    paths: list[Path]
    embeddings: dict[str, str]  # token -> the word the prompt types (the embedding file's name)
    changed: int  # how many of the base's weight tensors the bundles change


def weight_changes(bundle_path, bundle: Bundle, base: Base) -> dict[str, torch.Tensor]:
    """{component.parameter: ΔW in fp32} that a bundle adds to the base's weights (see the module's docstring)."""
    changes: dict[str, torch.Tensor] = {}
    denoiser = dict(base.denoiser.named_parameters())
    for name, d in bundle.with_prefix(delta_prefix(base.denoiser_name)).items():
        require(name in denoiser and denoiser[name].shape == d.shape,
                f"bundle {bundle_path} changes the {base.denoiser_label}'s {name} {tuple(d.shape)}, which this base does "
                "not have in that shape: bake it into the base it was learned on")
        changes[f"{base.denoiser_name}.{name}"] = d.float()
    lora = bundle.with_prefix("lora/")
    if lora:
        scale = float(bundle.extra["alpha"]) / float(bundle.extra["rank"])
        for component, factors in lora_parts(bundle_path, bundle, lora, base).items():
            for key, down in factors.items():
                if key.endswith(".lora_A.weight"):
                    module = key[: -len(".lora_A.weight")]
                    up = factors[f"{module}.lora_B.weight"]
                    changes[f"{component}.{module}.weight"] = scale * (up.float() @ down.float())
    return changes


def bake_checkpoint(bundle_paths: list[str | Path], base: Base, out: str | Path, dtype: str | None = None,
                    overwrite: bool = False) -> Baked:
    """Write `out` (a .safetensors checkpoint), `embeddings/<word>.safetensors` beside it for every learned
    token and `<out's stem>.README.md`. `dtype`: fp32 | fp16 | bf16 for every floating tensor (None: the
    base's). Everything is computed and checked before the first file is written (files.write_all)."""
    out = Path(out)
    require(out.suffix == ".safetensors", f"-o {out} must name a .safetensors file (the checkpoint to write)")
    require(dtype is None or dtype in DTYPES, f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    bundles = [(str(p), exportable_bundle(p, base, out.parent)) for p in bundle_paths]
    changes: dict[str, torch.Tensor] = {}
    files: dict[str, callable] = {}
    words: dict[str, str] = {}
    for path, bundle in bundles:
        add_embedding_files(files, words, path, bundle, base)
        for name, d in weight_changes(path, bundle, base).items():
            changes[name] = changes[name] + d if name in changes else d
    weights = pipeline_tensors(base.pipe, base.architecture)
    for name, d in changes.items():
        weights[name] = (weights[name].float() + d.to(weights[name].device)).to(weights[name].dtype)
    cast = DTYPES.get(dtype)
    tensors = {}
    for key, source in original_keys(base.pipe, base.architecture).items():
        t = build(source, weights).detach().cpu()
        tensors[key] = (t.to(cast) if cast is not None and t.is_floating_point() else t).contiguous()
    names = [out.name, f"{out.stem}.README.md", *files]
    clash = [n for n in names if (out.parent / n).exists()]
    require(overwrite or not clash, f"{out.parent / clash[0] if clash else ''} already exists: pass --overwrite to "
                                    "replace it, or choose another -o")
    meta = {"multiconcept_baked": json.dumps([Path(p).name for p, _ in bundles]), "multiconcept_base": base.name}
    files[out.name] = lambda f: save_file(tensors, f, metadata=meta)
    read = [b for _, b in bundles]
    text = (flow_baked_readme(out.name, read, words, base) if base.flow is not None
            else baked_readme(out.name, read, words, base))
    files[f"{out.stem}.README.md"] = lambda f: Path(f).write_text(text)
    return Baked(write_all(out.parent, files), words, len(changes))
