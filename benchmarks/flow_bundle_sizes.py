"""Each fine-tuning method's trained tensors, in bytes, at the real geometry of FLUX.1 [dev], FLUX.2 [klein] 4B,
SD3.5 Medium and SD3.5 Large, for one concept: from the published configs, each transformer built on the meta device
(no memory), counted with the methods' own choice of layers (models/flow.py, models/text_attention.py).

    .venv/bin/python benchmarks/flow_bundle_sizes.py [--json OUT.json]

What a bundle holds, as the methods write it (bundle tensors' dtypes): token rows fp32, one per text encoder
(FLUX.1: CLIP-L 768 + T5-XXL 4096; SD3.5: CLIP-L 768 + CLIP-G 1280 + T5-XXL 4096; klein: Qwen3-4B 2560);
LoRA factors fp32 at rank 4 on the attention projections (diffusers' LoRA scripts' layers) plus the identifier
token's rows; Custom Diffusion / DisenDiff the joint blocks' text-stream K and V deltas fp32 plus the token's rows;
Infusion one value residual per joint block, fp16. Headers and safetensors framing add a few KB.
"""

from __future__ import annotations

import argparse
import json

CONFIGS = {
    "FLUX.1 [dev]": ("flux1", "FluxTransformer2DModel", {}, (768, 4096)),  # diffusers' defaults are FLUX.1's
    "FLUX.2 [klein] 4B": ("flux2", "Flux2Transformer2DModel",
                          dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                               num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
                               mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6,
                               guidance_embeds=False), (2560,)),
    "SD3.5 Medium": ("sd3", "SD3Transformer2DModel",
                     dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                          num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                          pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                          dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"), (768, 1280, 4096)),
    "SD3.5 Large": ("sd3", "SD3Transformer2DModel",
                    dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                         num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, dual_attention_layers=(),
                         qk_norm="rms_norm"), (768, 1280, 4096)),
}
LORA_RANK = 4  # the method's default (diffusers' DreamBooth-LoRA scripts' rank)


def sizes(architecture: str, class_name: str, config: dict, widths: tuple[int, ...]) -> dict:
    import diffusers
    import torch
    from torch import nn

    from multiconcept.models.flow import FLOWS
    from multiconcept.models.text_attention import PROJECTIONS

    with torch.device("meta"):
        transformer = getattr(diffusers, class_name)(**config)
    flow = FLOWS[architecture]
    token = 4 * sum(widths)  # fp32 rows, one per text encoder
    joint = flow.text_attention(transformer)
    kv = sum(getattr(a, PROJECTIONS["transformer"][k]).weight.numel() for a in joint.values() for k in ("key", "value"))
    lora = sum(LORA_RANK * (m.in_features + m.out_features) for n, m in transformer.named_modules()
               if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in flow.lora_targets))
    value = sum(a.add_v_proj.out_features for a in joint.values())
    return {"transformer_parameters": sum(p.numel() for p in transformer.parameters()), "joint_blocks": len(joint),
            "textual-inversion": token, "lora": 4 * lora + token, "custom-diffusion": 4 * kv + token,
            "disendiff": 4 * kv + token, "infusion": 2 * value}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()
    rows = {name: sizes(*spec) for name, spec in CONFIGS.items()}
    methods = ("textual-inversion", "lora", "custom-diffusion", "disendiff", "infusion")
    print("| base | transformer parameters | joint blocks | " + " | ".join(methods) + " |")
    print("|---|---|---|" + "---|" * len(methods))
    for name, r in rows.items():
        print(f"| {name} | {r['transformer_parameters'] / 1e9:.2f} B | {r['joint_blocks']} | "
              + " | ".join(f"{r[m]:,} B" for m in methods) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
