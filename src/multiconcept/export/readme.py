"""The READMEs of an export for A1111 / ComfyUI / kohya and of a baked checkpoint: where each file goes,
the prompt each tool types."""

from __future__ import annotations

from ..bundle import Bundle
from .kohya import sdxl_embedding_loading_code
from .loading import pipeline_lines

TOOL_NAMES = {"a1111": "AUTOMATIC1111", "comfyui": "ComfyUI", "kohya": "kohya's sd-scripts"}


def prompts(bundles: list[Bundle], words: dict[str, str], lora: str | None) -> dict[str, str]:
    """The bundles' concepts in one prompt, as each tool types them."""
    concepts = [(t, c) for b in bundles for t, c in zip(b.tokens, b.class_words)]

    def phrase(fmt: str) -> str:
        return "photo of a " + " and ".join(f"{fmt.format(words.get(t, t))} {c}" for t, c in concepts)
    return {"a1111": phrase("{}") + (f" <lora:{lora}:1>" if lora else ""), "comfyui": phrase("embedding:{}"),
            "kohya": phrase("{}"), "diffusers": "photo of a " + " and ".join(f"{t} {c}" for t, c in concepts)}


def diffusers_loading(base, words: dict[str, str], checkpoint: str | None = None) -> list[str]:
    """The diffusers lines that make the pipeline (loading.pipeline_lines: the base's, or `checkpoint`'s) and load
    every embedding file."""
    sdxl = base.is_sdxl
    classes, make = pipeline_lines(base, checkpoint)
    code = ["import torch", *(["from safetensors.torch import load_file"] if sdxl and words else []),
            f"from diffusers import {', '.join(classes)}", "", *make]
    for t, w in words.items():
        if sdxl:  # diffusers reads each encoder's row on its own
            code += sdxl_embedding_loading_code(f"embeddings/{w}.safetensors", t)
        else:
            code.append(f'pipe.load_textual_inversion("embeddings/{w}.safetensors", token="{t}")')
    return code


def tools_readme(bundle_name: str, bundle: Bundle, base, tool: str, result) -> str:
    words, lora = result.embeddings, result.lora
    sdxl = bundle.architecture == "sdxl"
    p = prompts([bundle], words, lora)
    emb = [f"embeddings/{w}.safetensors" for w in words.values()]
    lora_file = f"loras/{lora}.safetensors" if lora else None
    lines = [f"# {bundle_name} for {TOOL_NAMES[tool]} (the same files load in AUTOMATIC1111, ComfyUI and kohya's sd-scripts)",
             "", f"Learned on the base `{base.name}` ({bundle.method}): generate with that checkpoint; on another the "
             "concepts do not hold.", "", "| file | what | in the prompt |", "|---|---|---|"]
    for token, w in words.items():
        what = "`clip_l` and `clip_g`, SDXL's two encoders, 1 vector each" if sdxl else "`emb_params`, 1 vector"
        lines.append(f"| `embeddings/{w}.safetensors` | the token `{token}` ({what}) | `{w}` "
                     f"(ComfyUI: `embedding:{w}`) |")
    if lora:
        what = (f"LoRA, rank {bundle.extra.get('rank')}, alpha {bundle.extra.get('alpha')}" if result.svd is None
                else f"the {bundle.method} K/V deltas as a LoRA (truncated SVD, rank "
                     f"{'full' if result.rank is None else result.rank}, scale 1)")
        lines.append(f"| `{lora_file}` | {what} | A1111: `<lora:{lora}:1>`; ComfyUI: a LoraLoader node |")
    sections = {
        "a1111": ["## AUTOMATIC1111", "",
                  (f"Copy {_list(emb)} into `stable-diffusion-webui/embeddings/`" if emb else "")
                  + (f"{' and' if emb else 'Copy'} `{lora_file}` into `stable-diffusion-webui/models/Lora/`" if lora else "")
                  + ", then refresh (or restart). Prompt:", "", f"    {p['a1111']}"],
        "comfyui": ["## ComfyUI", "",
                    (f"Copy {_list(emb)} into `ComfyUI/models/embeddings/`" if emb else "")
                    + (f"{' and' if emb else 'Copy'} `{lora_file}` into `ComfyUI/models/loras/`" if lora else "") + ".",
                    *([f"Put a **LoraLoader** node (lora_name `{lora}.safetensors`, strength_model 1.0, strength_clip "
                       "1.0) between **Load Checkpoint** and the **CLIP Text Encode** / **KSampler** nodes."] if lora else []),
                    "Prompt in **CLIP Text Encode**:", "", f"    {p['comfyui']}"],
        "kohya": ["## kohya's sd-scripts", "", "```bash",
                  f"python {'sdxl_gen_img.py' if sdxl else 'gen_img.py'} --ckpt BASE_CHECKPOINT"
                  + (f" \\\n    --network_module networks.lora --network_weights {lora_file} --network_mul 1.0" if lora else "")
                  + (f" \\\n    --textual_inversion_embeddings {' '.join(emb)}" if emb else "")
                  + f" \\\n    --prompt \"{p['kohya']}\"", "```", "",
                  "kohya's scripts name an embedding's token after its file"
                  + ("." if sdxl else " (add `--v2` for an SD 2.x base).")],
    }
    order = [tool] + [t for t in sections if t != tool]
    for t in order:
        lines += [""] + sections[t]
    code = diffusers_loading(base, words)
    if lora:
        code.append(f'pipe.load_lora_weights("loras", weight_name="{lora}.safetensors")')
    code += [f'image = pipe("{p["diffusers"]}", num_inference_steps=50, guidance_scale=6.0).images[0]']
    lines += ["", "## diffusers", "", "```python", *code, "```"]
    if result.svd is not None:
        lines += ["", "## How closely the LoRA carries the deltas", "",
                  f"Relative Frobenius error ‖ΔW − up·down‖ / ‖ΔW‖ over all layers: **{result.svd.relative_error:.4g}** "
                  "(0 is exact; export again with a higher `--rank`, or `--rank full`, to lower it).", "",
                  "| layer | rank kept / full | relative error |", "|---|---|---|"]
        lines += [f"| `{e.name}` | {e.rank} / {e.full_rank} | {e.relative_error:.4g} |" for e in result.svd.layers]
    return "\n".join(lines) + "\n"


def _list(files: list[str]) -> str:
    return ", ".join(f"`{f}`" for f in files)


def baked_readme(checkpoint: str, bundles: list[Bundle], words: dict[str, str], base) -> str:
    """The README beside a baked checkpoint (export/checkpoint.py)."""
    sdxl = base.is_sdxl
    p = prompts(bundles, words, None)
    emb = [f"embeddings/{w}.safetensors" for w in words.values()]
    methods = ", ".join(sorted({b.method for b in bundles}))
    lines = [f"# {checkpoint}: the base `{base.name}` with {methods} concepts baked in", "",
             f"A single-file {'SDXL' if sdxl else 'Stable Diffusion'} checkpoint in the original layout, the concepts' "
             "weight changes added; a checkpoint's vocabulary cannot grow, so each learned token is an embedding file "
             "beside it, named after the word the prompt types.", "", "| file | what | in the prompt |", "|---|---|---|",
             f"| `{checkpoint}` | the checkpoint | (select it as the model) |"]
    lines += [f"| `embeddings/{w}.safetensors` | the token `{t}` | `{w}` (ComfyUI: `embedding:{w}`) |" for t, w in words.items()]
    lines += ["", "## AUTOMATIC1111", "", f"Copy `{checkpoint}` into `stable-diffusion-webui/models/Stable-diffusion/`"
              + (f" and {_list(emb)} into `stable-diffusion-webui/embeddings/`" if emb else "")
              + ", refresh, select the checkpoint. Prompt:", "", f"    {p['a1111']}",
              "", "## ComfyUI", "", f"Copy `{checkpoint}` into `ComfyUI/models/checkpoints/`"
              + (f" and {_list(emb)} into `ComfyUI/models/embeddings/`" if emb else "")
              + "; pick it in **Load Checkpoint**. Prompt in **CLIP Text Encode**:", "", f"    {p['comfyui']}",
              "", "## kohya's sd-scripts", "", "```bash",
              f"python {'sdxl_gen_img.py' if sdxl else 'gen_img.py'} --ckpt {checkpoint}"
              + (f" \\\n    --textual_inversion_embeddings {' '.join(emb)}" if emb else "")
              + f" \\\n    --prompt \"{p['kohya']}\"", "```", "", "## multiconcept", "", "```bash",
              f"multiconcept generate '{p['diffusers']}' --base {checkpoint}"
              + "".join(f" --embedding {e}" for e in emb), "```"]
    code = diffusers_loading(base, words, checkpoint)
    code += [f'image = pipe("{p["diffusers"]}", num_inference_steps=50, guidance_scale=6.0).images[0]']
    return "\n".join(lines + ["", "## diffusers", "", "```python", *code, "```"]) + "\n"
