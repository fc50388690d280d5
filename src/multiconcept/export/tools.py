"""Export for AUTOMATIC1111, ComfyUI and kohya's sd-scripts: the same files serve all three.

- every new token → ``embeddings/<name>.safetensors`` ({"emb_params": [1, dim]}); the file name is the
  word the prompt types;
- a LoRA bundle → ``loras/<bundle>.safetensors`` in kohya's layout, with the bundle's alpha;
- Custom Diffusion / DisenDiff K/V (and Q) deltas → the same LoRA file, each delta factorised by
  truncated SVD to a rank (the error per layer and in total is reported);
- ``README.md``: per tool, where each file goes and the prompt to type.
Infusion is refused: its residuals depend on the prompt's tokens, so no weight delta carries them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..bundle import Bundle
from ..errors import UserError, require
from ..models import Base
from .diffusers import check_deltas, lora_parts, token_rows
from .files import token_name, write_all
from .flow import embedding_tensors as flow_embedding_tensors
from .flow import export_flow_tools
from .kohya import embedding_file_tensors, exportable_bundle, kohya_lora, sdxl_embedding_file_tensors
from .readme import tools_readme
from .svd import Factorisation, factorise

TOOLS = ("a1111", "comfyui", "kohya")
# on ToyWorld's trained Custom Diffusion and DisenDiff bundles: relative error < 0.08, images within 0.1 of a level
# on average (docs/evidence.md, "Export to A1111 / ComfyUI / kohya"); full rank is larger than the dense delta
DEFAULT_RANK = 16
# kohya's `ss_base_model_version` (A1111 files LoRAs under the base they fit by it)
MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


@dataclass
class ToolExport:
    paths: list[Path]
    embeddings: dict[str, str]  # token -> the word the prompt types in A1111 / kohya (ComfyUI: embedding:WORD)
    lora: str | None  # the LoRA's name (its file's stem), if any
    svd: Factorisation | None = None  # Custom Diffusion / DisenDiff: how well the LoRA carries the deltas
    rank: int | None = None
    notes: list[str] = field(default_factory=list)


def add_embedding_files(files: dict, words: dict[str, str], bundle_path, bundle: Bundle, base: Base) -> None:
    """Add `embeddings/<word>.safetensors` writers to `files` for the bundle's tokens, and each token's word to
    `words`; a word already taken (by this bundle or one added before) is refused."""
    for token, rows in token_rows(bundle_path, bundle, base).items():
        word = token_name(token)
        require(word and word not in words.values(),
                f"bundle {bundle_path}'s token {token} exports to the file name {word!r}, which another token takes: "
                "re-learn one of them under another name")
        words[token] = word
        if base.flow is not None:
            tensors = flow_embedding_tensors(rows, base)
        else:
            tensors = sdxl_embedding_file_tensors(rows) if base.is_sdxl else embedding_file_tensors(rows[0])
        files[f"embeddings/{word}.safetensors"] = lambda f, tensors=tensors: save_file(tensors, f)


def delta_lora(bundle_path, deltas: dict[str, torch.Tensor], base: Base,
               rank: int | None) -> tuple[dict, float, Factorisation]:
    """UNet weight deltas as peft-named LoRA factors of rank `rank` (None: full, exact), and their alpha.

    One alpha for every module, the largest rank kept: a layer narrower than that (kept rank r_l < alpha)
    has its up factor multiplied by r_l / alpha, so alpha / r_l · up · down is still its delta. diffusers'
    kohya loader drops per-module alphas that differ from the most common one (0.42: its alpha_pattern
    keys name no module), which would scale those layers wrongly."""
    check_deltas(bundle_path, deltas, base)
    svd = factorise({name[: -len(".weight")]: d for name, d in deltas.items()}, rank)
    alpha = max((e.rank for e in svd.layers), default=1)
    peft = {}
    d = base.denoiser_name
    for module, (up, down) in svd.factors.items():
        peft[f"{d}.{module}.lora_A.weight"] = down
        peft[f"{d}.{module}.lora_B.weight"] = up * (down.shape[0] / alpha) if down.shape[0] != alpha else up
    return peft, float(alpha), svd


def export_for_tools(bundle_path: str | Path, base: Base, out_dir: str | Path, tool: str = "a1111",
                     rank: int | None = DEFAULT_RANK) -> ToolExport:
    """Every file is computed and checked before the first is written (see files.write_all)."""
    require(tool in TOOLS, f"unknown tool {tool!r}: choose one of {', '.join(TOOLS)}")
    require(rank is None or rank >= 1, f"--rank must be at least 1 or 'full', got {rank}")
    out = Path(out_dir)
    bundle = exportable_bundle(bundle_path, base, out)
    if base.flow is not None:
        return export_flow_tools(bundle_path, bundle, base, out, rank)
    n_te = len(base.text_encoders)
    # SDXL's UNet modules take the original model's names, as kohya's SDXL scripts write them
    sgm = base.unet.config.layers_per_block if base.is_sdxl else None
    require(sgm is None or isinstance(sgm, int),
            f"base {base.name}'s UNet has per-level layer counts {sgm}, which the original SDXL names cannot number: "
            "export to diffusers' layout instead (--format diffusers)")
    files: dict[str, callable] = {}
    words: dict[str, str] = {}
    add_embedding_files(files, words, bundle_path, bundle, base)

    lora, deltas = bundle.with_prefix("lora/"), bundle.with_prefix("unet_delta/")
    require(not (lora and deltas), f"bundle {bundle_path} holds both LoRA factors and weight deltas: re-learn it")
    result = ToolExport([], words, None, rank=rank)
    sd, meta = None, {"ss_network_module": "networks.lora", "multiconcept_bundle": Path(bundle_path).name,
                      "multiconcept_method": bundle.method,
                      "ss_base_model_version": MODEL_VERSIONS.get(base.architecture, "sd_v1")}
    if lora:
        peft = {f"{c}.{k}": v for c, sd in lora_parts(bundle_path, bundle, lora, base).items() for k, v in sd.items()}
        alpha = float(bundle.extra["alpha"])
        sd = kohya_lora(peft, alpha, n_te, sgm)
        meta.update(ss_network_dim=str(bundle.extra["rank"]), ss_network_alpha=f"{alpha:g}")
    elif deltas:
        peft, alpha, result.svd = delta_lora(bundle_path, deltas, base, rank)
        require(bool(peft), f"bundle {bundle_path}'s weight deltas are all zero: there is nothing to export as a LoRA")
        sd = kohya_lora(peft, alpha, n_te, sgm)
        meta.update(ss_network_dim=f"{alpha:g}", ss_network_alpha=f"{alpha:g}",
                    multiconcept_svd_relative_error=f"{result.svd.relative_error:.6g}")
    return write_tool_files(out, files, result, bundle_path, bundle, sd, meta,
                            lambda: tools_readme(Path(bundle_path).name, bundle, base, tool, result))


def write_tool_files(out: Path, files: dict, result: ToolExport, bundle_path, bundle: Bundle, sd: dict | None,
                     meta: dict, readme) -> ToolExport:
    """Add the LoRA file (`sd`, when there is one) and the README (`readme()`, once the result knows the LoRA's
    name) to `files`, write them all into `out`; a bundle that gave nothing to write is refused."""
    if sd is not None:
        result.lora = token_name(Path(bundle_path).stem)
        files[f"loras/{result.lora}.safetensors"] = lambda f: save_file(sd, f, metadata=meta)
    if not files:
        raise UserError(f"bundle {bundle_path} ({bundle.method}) holds nothing these tools load: "
                        "export supports tokens, Custom Diffusion, DisenDiff and LoRA")
    text = readme()
    files["README.md"] = lambda f: Path(f).write_text(text)
    result.paths = write_all(out, files)
    return result
