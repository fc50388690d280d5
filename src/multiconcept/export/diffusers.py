"""Export a bundle to files plain diffusers loads, with no multiconcept import.

- new tokens → one ``<name>.safetensors`` each, for ``pipe.load_textual_inversion(file, token=...)``;
- Custom Diffusion K/V → ``pytorch_custom_diffusion_weights.safetensors`` for
  ``pipe.unet.load_attn_procs(dir, weight_name=...)`` (full weights: base + delta);
- LoRA → ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(dir)``.
A ``README.md`` beside them shows the exact loading code. A bundle of a flow transformer
(FLUX, SD3) goes through flow.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..bundle import Bundle
from ..errors import UserError, require
from ..models import Base, text_encoder_component
from .files import token_file, write_all
from .flow import export_flow_diffusers
from .kohya import SDXL_EMBEDDING_KEYS, exportable_bundle, sdxl_embedding_file_tensors, sdxl_embedding_loading_code
from .loading import pipeline_lines

CD_WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def export_diffusers(bundle_path: str | Path, base: Base, out_dir: str | Path, rank: int | None = 16) -> list[Path]:
    """Every file is computed and checked before the first is written; they are written into a
    hidden staging folder and moved into `out_dir` last, so an error leaves nothing behind. `rank`: a flow
    transformer's Custom Diffusion deltas become a LoRA by truncated SVD at it (None: full, exact)."""
    out = Path(out_dir)
    bundle = exportable_bundle(bundle_path, base, out)
    if base.flow is not None:
        return export_flow_diffusers(bundle_path, bundle, base, out, rank)
    files: dict[str, callable] = {}  # file name -> write(path)
    classes, make = pipeline_lines(base)
    lines = ["import torch", f"from diffusers import {', '.join(classes)}", "", *make]

    for token, rows in token_rows(bundle_path, bundle, base).items():
        name = token_file(token)
        require(name not in files, f"bundle {bundle_path} has two tokens that export to {name}: re-learn one under another name")
        if base.is_sdxl:  # one file, both encoders' rows, as A1111, ComfyUI and kohya's SDXL scripts read it
            files[name] = lambda f, rows=rows: save_file(sdxl_embedding_file_tensors(rows), f)
            if "from safetensors.torch import load_file" not in lines:
                lines.insert(1, "from safetensors.torch import load_file")
            lines += sdxl_embedding_loading_code(f"{out}/{name}", token)
        else:
            files[name] = lambda f, token=token, row=rows[0]: save_file({token: row.contiguous()}, f)
            lines.append(f'pipe.load_textual_inversion("{out}/{name}", token="{token}")')

    deltas = bundle.with_prefix("unet_delta/")
    if deltas:
        sd = custom_diffusion_state_dict(bundle_path, deltas, base)
        files[CD_WEIGHTS] = lambda f: save_file(sd, f)
        lines.append(f'pipe.unet.load_attn_procs("{out}", weight_name="{CD_WEIGHTS}", _pipeline=pipe)  # _pipeline: see below')

    lora = bundle.with_prefix("lora/")
    if lora:
        files[LORA_WEIGHTS] = lora_writer(bundle_path, bundle, lora, base)
        lines.append(f'pipe.load_lora_weights("{out}", weight_name="{LORA_WEIGHTS}")')

    if not files:
        raise UserError(f"bundle {bundle_path} ({bundle.method}) holds nothing diffusers can load: "
                        "export supports tokens, Custom Diffusion and LoRA")
    prompt = "photo of a " + " and ".join(f"{t} {c}" for t, c in zip(bundle.tokens, bundle.class_words))
    if deltas:
        lines += ["# diffusers 0.42's load_attn_procs installs Custom Diffusion processors only when given _pipeline"]
    lines += ["", f'image = pipe("{prompt}", num_inference_steps=50, guidance_scale=6.0,',
              '             generator=torch.Generator().manual_seed(0)).images[0]']
    text = f"# {Path(bundle_path).name} exported for diffusers\n\n```python\n" + "\n".join(lines) + "\n```\n"
    files["README.md"] = lambda f: Path(f).write_text(text)
    return write_all(out, files)


def token_rows(bundle_path, bundle: Bundle, base: Base) -> dict[str, list[torch.Tensor]]:
    """The bundle's new tokens, {token: [its row in each of the base's text encoders]}, each checked
    against its encoder's width."""
    encoders = base.text_encoders
    rows = bundle.token_rows(len(encoders))
    for token, per_encoder in rows.items():
        for row, te in zip(per_encoder, encoders):
            width = te.get_input_embeddings().weight.shape[1]
            require(tuple(row.shape) == (width,),
                    f"bundle {bundle_path}'s embedding for {token} has shape {tuple(row.shape)} but this base's text "
                    f"encoder uses ({width},): export it with the base it was learned on")
    return rows


def check_deltas(bundle_path, deltas: dict[str, torch.Tensor], base: Base) -> dict[str, tuple[str, str]]:
    """{param name: (attention layer, projection)} for a bundle's denoiser deltas, each checked against the base:
    only the text-reading projections Custom Diffusion trains (models/text_attention.py) have an equivalent."""
    from ..models.text_attention import PROJECTIONS, text_attention_layers

    params = dict(base.denoiser.named_parameters())
    layers = text_attention_layers(base)
    projections = tuple(PROJECTIONS[base.denoiser_name].values())
    out = {}
    for name, d in deltas.items():
        require(name in params, f"bundle {bundle_path} changes {name}, which this base's {base.denoiser_label} does not "
                                f"have: export it with the base it was learned on")
        require(d.shape == params[name].shape,
                f"bundle {bundle_path}'s delta for {name} has shape {tuple(d.shape)} but the base's weight is "
                f"{tuple(params[name].shape)}: export it with the base it was learned on")
        layer, proj, _ = ("." + name).rsplit(".", 2)
        layer = layer[1:]
        require(proj in projections and name.endswith(".weight") and layer in layers,
                f"bundle tensor {name} has no Custom Diffusion equivalent: export supports the text-reading attention "
                f"projections' weights ({', '.join(projections)})")
        out[name] = (layer, proj)
    return out


def custom_diffusion_state_dict(bundle_path, deltas: dict[str, torch.Tensor], base: Base) -> dict[str, torch.Tensor]:
    """Full Custom Diffusion processor weights (base + delta), in diffusers' names."""
    params = dict(base.unet.named_parameters())
    sd = {}
    for name, (layer, proj) in check_deltas(bundle_path, deltas, base).items():
        # down_blocks.0....attn2.to_k.weight → ...attn2.processor.to_k_custom_diffusion.weight
        sd[f"{layer}.processor.{proj}_custom_diffusion.weight"] = (params[name].detach().float().cpu()
                                                                   + deltas[name].float()).contiguous()
    for key in [k for k in sd if k.endswith("to_q_custom_diffusion.weight")]:
        # diffusers' processor then also expects to_out; the trained Q stays, the output projection is the base's
        layer = key.rsplit(".processor.", 1)[0]
        for part in ("weight", "bias"):
            w = params[f"{layer}.to_out.0.{part}"].detach().float().cpu().contiguous()
            sd[f"{layer}.processor.to_out_custom_diffusion.0.{part}"] = w
    # every other attention layer is listed with an empty tensor: diffusers then gives it a
    # pass-through Custom Diffusion processor (its loader wants one entry per layer)
    trained_layers = {k.split(".processor.")[0] + ".processor" for k in sd}
    for name in base.unet.attn_processors:
        if name not in trained_layers:
            sd[name] = torch.zeros(0)
    return sd


def lora_parts(bundle_path, bundle: Bundle, lora: dict[str, torch.Tensor], base: Base) -> dict[str, dict]:
    """A LoRA bundle's factors checked against the base's layers: {component: peft state dict}, for the
    UNet and each text encoder the bundle has factors for."""
    targets = f"{base.denoiser_name}_targets"
    require(all(k in bundle.extra for k in ("rank", "alpha", targets)),
            f"LoRA bundle {bundle_path} lacks its LoRA settings (rank, alpha, {targets}) in the header: re-learn it")
    models = base.parts
    parts: dict[str, dict] = {}
    for key, t in lora.items():
        model_name, _, rest = key.partition(".")
        require(model_name in models and ".lora_" in rest,
                f"bundle {bundle_path} has a LoRA tensor {key} that names no part of this base "
                f"({', '.join(models)}): export it with the base it was learned on")
        module_name, _, factor = rest.rpartition(".lora_")
        layer = dict(models[model_name].named_modules()).get(module_name)
        want = None
        if isinstance(layer, torch.nn.Linear) and t.dim() == 2:
            want = {"A.weight": (t.shape[0], layer.in_features), "B.weight": (layer.out_features, t.shape[1])}.get(factor)
        require(want is not None and tuple(t.shape) == want,
                f"bundle {bundle_path}'s LoRA tensor {key} {tuple(t.shape)} does not fit this base's {model_name} "
                f"(no such linear layer, or another size): export it with the base it was learned on")
        parts.setdefault(model_name, {})[rest] = t
    return parts


def lora_writer(bundle_path, bundle: Bundle, lora: dict[str, torch.Tensor], base: Base):
    """Check a LoRA bundle's factors against the base's layers; return write(path) for diffusers' file."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    x = bundle.extra
    parts = lora_parts(bundle_path, bundle, lora, base)
    meta = {"r": x["rank"], "lora_alpha": x["alpha"]}
    args = {"unet_lora_layers": parts.get("unet", {}),
            "unet_lora_adapter_metadata": {**meta, "target_modules": x["unet_targets"]}}
    for k in range(len(base.text_encoders)):
        c = text_encoder_component(k)
        if parts.get(c):
            args[f"{c}_lora_layers"] = parts[c]
            args[f"{c}_lora_adapter_metadata"] = {**meta, "target_modules": x.get("text_targets", [])}
    pipeline = StableDiffusionXLPipeline if base.is_sdxl else StableDiffusionPipeline

    def write(f: Path) -> None:
        pipeline.save_lora_weights(Path(f).parent, weight_name=Path(f).name, safe_serialization=True, **args)

    return write


def load_exported_into(pipe, out_dir: str | Path, tokens: list[str]) -> None:
    """What the exported README does, as a function (used by tests)."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    for t in tokens:
        if sdxl:
            rows = load_file(str(out / token_file(t)))
            encoders = ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))
            for key, (te, tok) in zip(SDXL_EMBEDDING_KEYS, encoders):
                pipe.load_textual_inversion(rows[key], token=t, text_encoder=te, tokenizer=tok)
        else:
            pipe.load_textual_inversion(str(out / token_file(t)), token=t)
    if (out / CD_WEIGHTS).exists():
        # diffusers 0.42 only installs the processors when given the pipeline (_pipeline); plain calls load nothing
        pipe.unet.load_attn_procs(str(out), weight_name=CD_WEIGHTS, _pipeline=pipe)
    if (out / LORA_WEIGHTS).exists():
        pipe.load_lora_weights(str(out), weight_name=LORA_WEIGHTS)


