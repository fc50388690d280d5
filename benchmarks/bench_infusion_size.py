"""Infusion bundle size: SD 1.5 and SDXL geometry, the tiny base and (when built) ToyWorld.

    .venv/bin/python benchmarks/bench_infusion_size.py

SD 1.5's UNet is built from its config (written inline, no download; SDXL's is
benchmarks/sdxl_full_geometry.py's) on the `meta` device, so it costs no memory. For each geometry the script counts
Σ d_l over the attn2.to_v projections, writes a real Infusion bundle of that
geometry (zero residuals, the names and dtypes `learn` writes) and measures
its tensor bytes and file bytes. References measured in the same script:
a Custom Diffusion bundle's attn2 K/V deltas (fp32, as it stores them) and a
Textual Inversion token (fp32) of the same geometry.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from sdxl_full_geometry import SDXL_UNET  # this folder's SDXL script: its configs are written once

from multiconcept.bundle import Bundle, describe, save_bundle
from multiconcept.methods.infusion import STORE_DTYPES, bundle_token, cross_attention_layers
from multiconcept.models import TOYWORLD_DIR
from multiconcept.models.tiny import tiny_pipeline

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
PAPER_CLAIM_BYTES = 11 * 1024  # "a mere 11KB" (abstract)


def meta_unet(config: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def infusion_bundle_bytes(unet, folder: Path, dtype: str = "fp16", key: bool = False) -> dict:
    layers = cross_attention_layers(unet)
    tensors = {f"value_residual/cat/{n}": torch.zeros(a.to_v.out_features, dtype=STORE_DTYPES[dtype]) for n, a in layers.items()}
    if key:
        tensors.update({f"key_residual/cat/{n}": torch.zeros(a.to_k.out_features, dtype=STORE_DTYPES[dtype])
                        for n, a in layers.items()})
    path = save_bundle(Bundle("infusion", [bundle_token("cat")], ["cat"], "geometry", "0" * 16, {}, {}, tensors),
                       folder / f"infusion_{dtype}_{'kv' if key else 'v'}.safetensors")
    d = describe(path)
    return {"layers": len(layers), "sum_d": sum(a.to_v.out_features for a in layers.values()),
            "tensor_bytes": d["tensor_bytes"], "file_bytes": d["file_bytes"]}


def custom_diffusion_bytes(unet) -> int:
    """attn2 to_k + to_v weights, fp32 deltas (what a Custom Diffusion bundle stores), plus one token row."""
    layers = cross_attention_layers(unet)
    n = sum(a.to_k.weight.numel() + a.to_v.weight.numel() for a in layers.values())
    return 4 * (n + next(iter(layers.values())).to_k.in_features)


def report(name: str, unet, folder: Path) -> dict:
    v16 = infusion_bundle_bytes(unet, folder, "fp16")
    v32 = infusion_bundle_bytes(unet, folder, "fp32")
    kv16 = infusion_bundle_bytes(unet, folder, "fp16", key=True)
    ti = 4 * next(iter(cross_attention_layers(unet).values())).to_k.in_features
    cd = custom_diffusion_bytes(unet)
    return {"geometry": name, "attn2_layers": v16["layers"], "sum_d_l": v16["sum_d"],
            "value_fp16_tensor_bytes": v16["tensor_bytes"], "value_fp16_file_bytes": v16["file_bytes"],
            "value_fp32_tensor_bytes": v32["tensor_bytes"], "key_value_fp16_tensor_bytes": kv16["tensor_bytes"],
            "textual_inversion_token_bytes": ti, "custom_diffusion_bytes": cd,
            "infusion_over_custom_diffusion": v16["tensor_bytes"] / cd}


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows.append(report("SD 1.5 (config, meta device)", meta_unet(SD15_UNET), folder))
        rows.append(report("SDXL (config, meta device)", meta_unet(SDXL_UNET), folder))
        rows.append(report("tiny", tiny_pipeline().unet, folder))
        cfg = TOYWORLD_DIR / "base" / "unet" / "config.json"
        if cfg.is_file():
            raw = {k: v for k, v in json.loads(cfg.read_text()).items() if not k.startswith("_")}
            rows.append(report("ToyWorld", meta_unet(raw), folder))
        else:
            print("(ToyWorld base not built: its row is missing; run `multiconcept toyworld build`)")
    print("| geometry | attn2 layers | Σ d_l | value fp16 (tensor / file bytes) | value fp32 | K+V fp16 | TI token fp32 "
          "| Custom Diffusion fp32 | Infusion / CD |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['geometry']} | {r['attn2_layers']} | {r['sum_d_l']:,} | {r['value_fp16_tensor_bytes']:,} / "
              f"{r['value_fp16_file_bytes']:,} | {r['value_fp32_tensor_bytes']:,} | {r['key_value_fp16_tensor_bytes']:,} | "
              f"{r['textual_inversion_token_bytes']:,} | {r['custom_diffusion_bytes']:,} | "
              f"{r['infusion_over_custom_diffusion']:.2e} |")
    sd = rows[0]
    goal = 25_000
    print(f"\nSD 1.5 value-only fp16: {sd['value_fp16_tensor_bytes']:,} tensor bytes "
          f"({sd['value_fp16_tensor_bytes'] / 1024:.1f} KiB), file {sd['value_fp16_file_bytes']:,} bytes; "
          f"goal <= {goal:,} bytes: {'met' if sd['value_fp16_tensor_bytes'] <= goal else 'NOT met'} for the tensors, "
          f"{'met' if sd['value_fp16_file_bytes'] <= goal else 'not met'} for the file (header included); "
          f"paper claims 11 KB = {PAPER_CLAIM_BYTES:,} bytes, "
          f"ratio ours/claim {sd['value_fp16_tensor_bytes'] / PAPER_CLAIM_BYTES:.2f}")


if __name__ == "__main__":
    main()
