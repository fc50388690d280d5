"""Export a bundle to files plain diffusers loads, with no multiconcept import.

- new tokens → one ``<name>.safetensors`` each, for ``pipe.load_textual_inversion(file, token=...)``;
- Custom Diffusion K/V → ``pytorch_custom_diffusion_weights.safetensors`` for
  ``pipe.unet.load_attn_procs(dir, weight_name=...)`` (full weights: base + delta);
- LoRA → ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(dir)``.
A ``README.md`` beside them shows the exact loading code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..bundle import Bundle
from ..errors import UserError, require
from ..models import Base
from .files import token_file, write_all
from .kohya import exportable_bundle

CD_WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def export_diffusers(bundle_path: str | Path, base: Base, out_dir: str | Path) -> list[Path]:
    """Every file is computed and checked before the first is written; they are written into a
    hidden staging folder and moved into `out_dir` last, so an error leaves nothing behind."""
    out = Path(out_dir)
    bundle = exportable_bundle(bundle_path, base, out)
    files: dict[str, callable] = {}  # file name -> write(path)
    lines = ["import torch", "from diffusers import StableDiffusionPipeline", "",
             f'pipe = StableDiffusionPipeline.from_pretrained("{base.name}")']

    rows = bundle.with_prefix("token_embedding/")
    width = base.text_encoder.get_input_embeddings().weight.shape[1]
    for token, row in rows.items():
        name = token_file(token)
        require(tuple(row.shape) == (width,),
                f"bundle {bundle_path}'s embedding for {token} has shape {tuple(row.shape)} but this base's text "
                f"encoder uses ({width},): export it with the base it was learned on")
        require(name not in files, f"bundle {bundle_path} has two tokens that export to {name}: re-learn one under another name")
        files[name] = lambda f, token=token, row=row: save_file({token: row.contiguous()}, f)
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


def check_deltas(bundle_path, deltas: dict[str, torch.Tensor], base: Base) -> dict[str, tuple[str, str]]:
    """{param name: (attention layer, projection)} for a bundle's UNet deltas, each checked against the base."""
    params = dict(base.unet.named_parameters())
    out = {}
    for name, d in deltas.items():
        require(name in params, f"bundle {bundle_path} changes {name}, which this base's UNet does not have: "
                                f"export it with the base it was learned on")
        require(d.shape == params[name].shape,
                f"bundle {bundle_path}'s delta for {name} has shape {tuple(d.shape)} but the base's weight is "
                f"{tuple(params[name].shape)}: export it with the base it was learned on")
        layer, proj, _ = ("." + name).rsplit(".", 2)
        layer = layer[1:]
        require(proj in ("to_k", "to_v", "to_q") and name.endswith(".weight")
                and f"{layer}.processor" in base.unet.attn_processors,
                f"bundle tensor {name} has no Custom Diffusion equivalent: export supports attention to_q/to_k/to_v weights")
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


def lora_parts(bundle_path, bundle: Bundle, lora: dict[str, torch.Tensor], base: Base) -> tuple[dict, dict]:
    """A LoRA bundle's factors checked against the base's layers: (unet's, text encoder's) peft state dicts."""
    require(all(k in bundle.extra for k in ("rank", "alpha", "unet_targets")),
            f"LoRA bundle {bundle_path} lacks its LoRA settings (rank, alpha, unet_targets) in the header: re-learn it")
    parts = {"unet": (base.unet, {}), "text_encoder": (base.text_encoder, {})}
    for key, t in lora.items():
        model_name, _, rest = key.partition(".")
        require(model_name in parts and ".lora_" in rest,
                f"bundle {bundle_path} has a LoRA tensor {key} that is neither unet.* nor text_encoder.*: re-learn it")
        model, sd = parts[model_name]
        module_name, _, factor = rest.rpartition(".lora_")
        layer = dict(model.named_modules()).get(module_name)
        want = None
        if isinstance(layer, torch.nn.Linear) and t.dim() == 2:
            want = {"A.weight": (t.shape[0], layer.in_features), "B.weight": (layer.out_features, t.shape[1])}.get(factor)
        require(want is not None and tuple(t.shape) == want,
                f"bundle {bundle_path}'s LoRA tensor {key} {tuple(t.shape)} does not fit this base's {model_name} "
                f"(no such linear layer, or another size): export it with the base it was learned on")
        sd[rest] = t
    return parts["unet"][1], parts["text_encoder"][1]


def lora_writer(bundle_path, bundle: Bundle, lora: dict[str, torch.Tensor], base: Base):
    """Check a LoRA bundle's factors against the base's layers; return write(path) for diffusers' file."""
    from diffusers import StableDiffusionPipeline

    x = bundle.extra
    unet_sd, te_sd = lora_parts(bundle_path, bundle, lora, base)
    meta = {"r": x["rank"], "lora_alpha": x["alpha"], "target_modules": x["unet_targets"]}
    te_meta = {"r": x["rank"], "lora_alpha": x["alpha"], "target_modules": x.get("text_targets", [])} if te_sd else None

    def write(f: Path) -> None:
        StableDiffusionPipeline.save_lora_weights(
            Path(f).parent, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd or None,
            weight_name=Path(f).name, safe_serialization=True,
            unet_lora_adapter_metadata=meta, text_encoder_lora_adapter_metadata=te_meta,
        )

    return write


def load_exported_into(pipe, out_dir: str | Path, tokens: list[str]) -> None:
    """What the exported README does, as a function (used by tests)."""
    out = Path(out_dir)
    for t in tokens:
        pipe.load_textual_inversion(str(out / token_file(t)), token=t)
    if (out / CD_WEIGHTS).exists():
        # diffusers 0.42 only installs the processors when given the pipeline (_pipeline); plain calls load nothing
        pipe.unet.load_attn_procs(str(out), weight_name=CD_WEIGHTS, _pipeline=pipe)
    if (out / LORA_WEIGHTS).exists():
        pipe.load_lora_weights(str(out), weight_name=LORA_WEIGHTS)


