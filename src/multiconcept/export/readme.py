"""The README of an export for A1111 / ComfyUI / kohya: where each file goes, the prompt each tool types."""

from __future__ import annotations

from ..bundle import Bundle
from .kohya import sdxl_embedding_loading_code

TOOL_NAMES = {"a1111": "AUTOMATIC1111", "comfyui": "ComfyUI", "kohya": "kohya's sd-scripts"}


def prompts(bundle: Bundle, words: dict[str, str], lora: str | None) -> dict[str, str]:
    """The bundle's concepts in one prompt, as each tool types them."""
    def phrase(fmt: str) -> str:
        return "photo of a " + " and ".join(f"{fmt.format(words.get(t, t))} {c}"
                                            for t, c in zip(bundle.tokens, bundle.class_words))
    return {"a1111": phrase("{}") + (f" <lora:{lora}:1>" if lora else ""), "comfyui": phrase("embedding:{}"),
            "kohya": phrase("{}"),
            "diffusers": "photo of a " + " and ".join(f"{t} {c}" for t, c in zip(bundle.tokens, bundle.class_words))}


def tools_readme(bundle_name: str, bundle: Bundle, base_name: str, tool: str, result) -> str:
    words, lora = result.embeddings, result.lora
    sdxl = bundle.architecture == "sdxl"
    p = prompts(bundle, words, lora)
    emb = [f"embeddings/{w}.safetensors" for w in words.values()]
    lora_file = f"loras/{lora}.safetensors" if lora else None
    lines = [f"# {bundle_name} for {TOOL_NAMES[tool]} (the same files load in AUTOMATIC1111, ComfyUI and kohya's sd-scripts)",
             "", f"Learned on the base `{base_name}` ({bundle.method}): generate with that checkpoint; on another the "
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
    pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    code = ["import torch", *(["from safetensors.torch import load_file"] if sdxl and words else []),
            f"from diffusers import {pipeline}", "", f'pipe = {pipeline}.from_pretrained("{base_name}")']
    for t, w in words.items():
        if sdxl:  # diffusers reads each encoder's row on its own
            code += sdxl_embedding_loading_code(f"embeddings/{w}.safetensors", t)
        else:
            code.append(f'pipe.load_textual_inversion("embeddings/{w}.safetensors", token="{t}")')
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
