"""Exports of bundles learned on a flow transformer (FLUX.1, FLUX.2 [klein], SD3).

- tokens: one file per token holding its row in each text encoder, named as diffusers' advanced FLUX script
  names them (`clip_l`, `t5`; SD3 adds `clip_g`; FLUX.2 [klein]'s Qwen row is `qwen3`). FluxPipeline loads
  them with `load_textual_inversion` (each row into its encoder); StableDiffusion3Pipeline and
  Flux2KleinPipeline have no such loader (diffusers 0.42), so the README adds each token with the tokenizer's
  `add_tokens` and the encoder's `resize_token_embeddings`, then sets its row;
- `--format diffusers`: a LoRA bundle as diffusers' `pytorch_lora_weights.safetensors` (`load_lora_weights`);
  Custom Diffusion / DisenDiff deltas, which diffusers has no processor for on a transformer, as the same kind
  of file, each delta by truncated SVD at `--rank` (full: exact);
- `a1111|comfyui|kohya`: the LoRA in kohya's layout (kohya_flow.py), which ComfyUI and Forge load;
  AUTOMATIC1111 itself runs none of these models, and its README says so.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..bundle import Bundle, delta_prefix
from ..errors import UserError, require
from ..models import ARCHITECTURES, Base
from .files import token_file, write_all
from .kohya_flow import fuse_deltas, fuse_lora, text_encoder_lora
from .loading import pipeline_lines

EMBEDDING_KEYS = {"flux1": ("clip_l", "t5"), "sd3": ("clip_l", "clip_g", "t5"), "flux2": ("qwen3",)}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# kohya's `ss_base_model_version` for these models
MODEL_VERSIONS = {"flux1": "flux1", "sd3": "sd3", "flux2": "flux2"}
ADD_TOKEN = ["def add_token(tokenizer, text_encoder, token, row):",
             "    # this pipeline has no load_textual_inversion: the token goes in by hand",
             "    tokenizer.add_tokens([token])",
             "    text_encoder.resize_token_embeddings(len(tokenizer))",
             "    with torch.no_grad():",
             "        text_encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)] = row", ""]


def embedding_keys(base: Base) -> tuple[str, ...]:
    """The file's key of each text encoder's row, in the base's encoder order (SD3 without T5: two)."""
    return EMBEDDING_KEYS[base.architecture][: len(base.text_encoders)]


def embedding_tensors(rows: list[torch.Tensor], base: Base) -> dict[str, torch.Tensor]:
    return {key: row.detach().float().reshape(1, -1).contiguous() for key, row in zip(embedding_keys(base), rows)}


def embedding_loading_code(path: str, token: str, base: Base) -> list[str]:
    """The diffusers lines that put a token file's rows into a flow pipeline (ADD_TOKEN defined before them when the
    pipeline has no `load_textual_inversion`)."""
    names = [("", ""), ("_2", "_2"), ("_3", "_3")]
    lines = [f'rows = load_file("{path}")']
    for key, (te, tok) in zip(embedding_keys(base), names):
        if base.architecture == "flux1":
            lines.append(f'pipe.load_textual_inversion(rows["{key}"], token="{token}", text_encoder=pipe.text_encoder{te}, '
                         f'tokenizer=pipe.tokenizer{tok})')
        else:
            lines.append(f'add_token(pipe.tokenizer{tok}, pipe.text_encoder{te}, "{token}", rows["{key}"][0])')
    return lines


def loading_preamble(base: Base, with_tokens: bool, checkpoint: str | None = None) -> list[str]:
    """The imports and the lines that make `pipe` (loading.pipeline_lines: the base's, or `checkpoint`'s), with
    ADD_TOKEN when tokens go in by hand."""
    classes, make = pipeline_lines(base, checkpoint)
    lines = ["import torch", "from safetensors.torch import load_file", f"from diffusers import {', '.join(classes)}",
             "", *make]
    if with_tokens and base.architecture != "flux1":
        lines += [""] + ADD_TOKEN
    return lines


def call_line(base: Base, prompt: str) -> list[str]:
    return ["", f'image = pipe("{prompt}", num_inference_steps=28, guidance_scale=3.5, '
                f'max_sequence_length={base.sequence_length},',
            "             generator=torch.Generator().manual_seed(0)).images[0]"]


def lora_factors(bundle: Bundle, parts: dict[str, dict]) -> dict[str, dict[str, tuple]]:
    """{component: {module: (down, up, alpha / r)}} of a LoRA bundle's checked parts (diffusers.lora_parts)."""
    scale = float(bundle.extra["alpha"]) / float(bundle.extra["rank"])
    out: dict[str, dict[str, tuple]] = {}
    for component, sd in parts.items():
        for key, down in sd.items():
            if key.endswith(".lora_A.weight"):
                module = key[: -len(".lora_A.weight")]
                out.setdefault(component, {})[module] = (down, sd[f"{module}.lora_B.weight"], scale)
    return out


def export_flow_diffusers(bundle_path, bundle: Bundle, base: Base, out: Path, rank: int | None) -> list[Path]:
    """Token files and a `pytorch_lora_weights.safetensors` (the LoRA, or the K/V deltas by SVD) with a README."""
    from .diffusers import lora_parts, token_rows
    from .tools import delta_lora

    files: dict[str, callable] = {}
    code_tokens: list[str] = []
    for token, rows in token_rows(bundle_path, bundle, base).items():
        name = token_file(token)
        require(name not in files, f"bundle {bundle_path} has two tokens that export to {name}: re-learn one under another name")
        tensors = embedding_tensors(rows, base)
        files[name] = lambda f, tensors=tensors: save_file(tensors, f)
        code_tokens += embedding_loading_code(f"{out}/{name}", token, base)
    lora, deltas = bundle.with_prefix("lora/"), bundle.with_prefix(delta_prefix(base.denoiser_name))
    meta = None
    if lora:
        parts = lora_parts(bundle_path, bundle, lora, base)
        x = bundle.extra
        meta = {"r": x["rank"], "lora_alpha": x["alpha"]}
        args = {"transformer_lora_layers": parts.get("transformer", {}),
                "transformer_lora_adapter_metadata": {**meta, "target_modules": x["transformer_targets"]}}
        for c, sd in parts.items():
            if c != "transformer":
                args[f"{c}_lora_layers"] = sd
                args[f"{c}_lora_adapter_metadata"] = {**meta, "target_modules": x.get("text_targets", [])}
    elif deltas:
        peft, alpha, svd = delta_lora(bundle_path, deltas, base, rank)
        require(bool(peft), f"bundle {bundle_path}'s weight deltas are all zero: there is nothing to export")
        modules = sorted({k[len("transformer."): k.rindex(".lora_")] for k in peft})
        args = {"transformer_lora_layers": {k[len("transformer."):]: v for k, v in peft.items()},
                "transformer_lora_adapter_metadata": {"r": int(alpha), "lora_alpha": alpha, "target_modules": modules}}
    if lora or deltas:
        pipeline = type(base.pipe)

        def write(f: Path) -> None:
            pipeline.save_lora_weights(Path(f).parent, weight_name=Path(f).name, safe_serialization=True, **args)
        files[LORA_WEIGHTS] = write
    if not files:
        raise UserError(f"bundle {bundle_path} ({bundle.method}) holds nothing diffusers can load: export supports "
                        "tokens, Custom Diffusion, DisenDiff and LoRA")
    prompt = "photo of a " + " and ".join(f"{t} {c}" for t, c in zip(bundle.tokens, bundle.class_words))
    lines = loading_preamble(base, bool(code_tokens)) + code_tokens
    if LORA_WEIGHTS in files:
        lines.append(f'pipe.load_lora_weights("{out}", weight_name="{LORA_WEIGHTS}")')
    lines += call_line(base, prompt)
    note = ("\nCustom Diffusion's K/V changes are in `pytorch_lora_weights.safetensors` as a LoRA (truncated SVD, "
            f"rank {'full' if rank is None else rank}): diffusers has no Custom Diffusion processor for "
            f"{ARCHITECTURES[base.architecture]}.\n" if deltas and not lora else "")
    text = (f"# {Path(bundle_path).name} exported for diffusers ({ARCHITECTURES[base.architecture]})\n{note}\n"
            "```python\n" + "\n".join(lines) + "\n```\n")
    files["README.md"] = lambda f: Path(f).write_text(text)
    return write_all(out, files)


def kohya_flow_lora(bundle_path, bundle: Bundle, base: Base, rank: int | None):
    """The bundle's LoRA or K/V deltas in kohya's layout: (state dict, metadata, Factorisation or None)."""
    from .diffusers import check_deltas, lora_parts

    lora, deltas = bundle.with_prefix("lora/"), bundle.with_prefix(delta_prefix(base.denoiser_name))
    meta = {"ss_network_module": "networks.lora", "multiconcept_bundle": Path(bundle_path).name,
            "multiconcept_method": bundle.method, "ss_base_model_version": MODEL_VERSIONS[base.architecture]}
    if lora:
        factors = lora_factors(bundle, lora_parts(bundle_path, bundle, lora, base))
        sd = fuse_lora(base.denoiser, base.architecture, factors.pop("transformer", {}))
        for component, f in factors.items():
            sd.update(text_encoder_lora(component, f))
        return sd, meta, None
    if deltas:
        check_deltas(bundle_path, deltas, base)
        sd, svd = fuse_deltas(base.denoiser, base.architecture, {n[: -len(".weight")]: d for n, d in deltas.items()}, rank)
        require(bool(sd), f"bundle {bundle_path}'s weight deltas are all zero: there is nothing to export as a LoRA")
        meta["multiconcept_svd_relative_error"] = f"{svd.relative_error:.6g}"
        return sd, meta, svd
    return None, meta, None


def flow_tools_readme(bundle_name: str, bundle: Bundle, base: Base, result) -> str:
    words, lora = result.embeddings, result.lora
    model = ARCHITECTURES[base.architecture]
    keys = embedding_keys(base)
    lines = [f"# {bundle_name} for ComfyUI and Forge ({model}, learned on `{base.name}`)", "",
             f"AUTOMATIC1111 itself does not run {model}: load these files in ComfyUI or in Forge (its fork that does). "
             "Generate with the base the bundle was learned on; on another the concepts do not hold.", "",
             "| file | what | in the prompt |", "|---|---|---|"]
    for token, w in words.items():
        lines.append(f"| `embeddings/{w}.safetensors` | the token `{token}`: its row in each text encoder "
                     f"({', '.join(f'`{k}`' for k in keys)}) | `{w}` (ComfyUI: `embedding:{w}`) |")
    if lora:
        what = ("LoRA in kohya's layout" if result.svd is None else
                f"the {bundle.method} K/V changes as a LoRA in kohya's layout (truncated SVD, rank "
                f"{'full' if result.rank is None else result.rank}, scale 1)")
        lines.append(f"| `loras/{lora}.safetensors` | {what} | Forge: `<lora:{lora}:1>`; ComfyUI: a LoraLoader node |")
    lines += ["", "## ComfyUI", "", "Copy `loras/*` into `ComfyUI/models/loras/` and `embeddings/*` into "
              "`ComfyUI/models/embeddings/`; put a **LoraLoader** node (strength 1.0) after the model loader.", "",
              "## Forge", "", "Copy `loras/*` into `models/Lora/` and `embeddings/*` into `embeddings/`.", "",
              "## diffusers", "", "```python"]
    code = loading_preamble(base, bool(words))
    for token, w in words.items():
        code += embedding_loading_code(f"embeddings/{w}.safetensors", token, base)
    if lora:
        code.append(f'pipe.load_lora_weights("loras", weight_name="{lora}.safetensors")  # kohya layout, converted by diffusers')
    prompt = "photo of a " + " and ".join(f"{t} {c}" for t, c in zip(bundle.tokens, bundle.class_words))
    lines += code + call_line(base, prompt) + ["```"]
    if result.svd is not None:
        lines += ["", "## How closely the LoRA carries the deltas", "",
                  f"Relative Frobenius error over all layers: **{result.svd.relative_error:.4g}** (0 is exact; "
                  "`--rank full` makes it so).", "", "| layer | rank kept / full | relative error |", "|---|---|---|"]
        lines += [f"| `{e.name}` | {e.rank} / {e.full_rank} | {e.relative_error:.4g} |" for e in result.svd.layers]
    return "\n".join(lines) + "\n"


def export_flow_tools(bundle_path, bundle: Bundle, base: Base, out: Path, rank: int | None):
    from .tools import ToolExport, add_embedding_files, write_tool_files

    files: dict[str, callable] = {}
    words: dict[str, str] = {}
    add_embedding_files(files, words, bundle_path, bundle, base)
    sd, meta, svd = kohya_flow_lora(bundle_path, bundle, base, rank)
    result = ToolExport([], words, None, svd=svd, rank=rank)
    return write_tool_files(out, files, result, bundle_path, bundle, sd, meta,
                            lambda: flow_tools_readme(Path(bundle_path).name, bundle, base, result))


# ComfyUI's loader of a baked checkpoint: all-in-one files as ComfyUI and Stability save them; klein's transformer alone
COMFYUI_LOADER = {
    "flux1": "**Load Checkpoint** (`ComfyUI/models/checkpoints/`): the transformer, VAE, CLIP-L and T5 in one file",
    "sd3": "**Load Checkpoint** (`ComfyUI/models/checkpoints/`): the transformer, VAE, CLIP-L, CLIP-G (and T5) in one file",
    "flux2": "**Load Diffusion Model** (`ComfyUI/models/diffusion_models/`): the transformer alone, as BFL ships klein; "
             "its VAE and Qwen3 are the base's",
}


def flow_baked_readme(checkpoint: str, bundles: list[Bundle], words: dict[str, str], base: Base) -> str:
    """The README beside a checkpoint baked from a flow base (export/checkpoint.py)."""
    model = ARCHITECTURES[base.architecture]
    keys = ", ".join(f"`{k}`" for k in embedding_keys(base))
    concepts = [(t, c) for b in bundles for t, c in zip(b.tokens, b.class_words)]
    prompt = "photo of a " + " and ".join(f"{t} {c}" for t, c in concepts)
    typed = "photo of a " + " and ".join(f"<{words[t]}> {c}" if t in words else f"{t} {c}" for t, c in concepts)
    emb = [f"embeddings/{w}.safetensors" for w in words.values()]
    # the configs (and klein's other parts) come from a diffusers pipeline: the base's folder, or its --base-config
    config = base.base_config or base.name
    methods = ", ".join(sorted({b.method for b in bundles}))
    lines = [f"# {checkpoint}: the base `{base.name}` with {methods} concepts baked in", "",
             f"A single-file {model} checkpoint in the original layout, the concepts' weight changes added; a "
             "checkpoint's vocabulary cannot grow, so each learned token is an embedding file beside it (its row in "
             f"each text encoder: {keys}), named after the word the prompt types.", "",
             "| file | what |", "|---|---|", f"| `{checkpoint}` | the checkpoint |"]
    lines += [f"| `embeddings/{w}.safetensors` | the token `{t}` |" for t, w in words.items()]
    lines += ["", "## ComfyUI", "", f"Load it with {COMFYUI_LOADER[base.architecture]}. AUTOMATIC1111 itself does not "
              f"run {model}.", "",
              "## multiconcept", "", "```bash",
              f"multiconcept generate '{typed}' --base {checkpoint} --base-config {config}"
              + "".join(f" --embedding {e}" for e in emb), "```", "", "## diffusers", "", "```python"]
    code = loading_preamble(base, bool(words), checkpoint)
    for token, w in words.items():
        code += embedding_loading_code(f"embeddings/{w}.safetensors", token, base)
    return "\n".join(lines + code + call_line(base, prompt) + ["```"]) + "\n"
