"""Every fine-tuning method on SD3.5 Medium's full geometry, random weights: one training step and one generation
step each, at 1024 px, batch 1, on the CPU, with the memory savers. Run it alone: it peaks near 20 GB.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/flow_full_geometry.py --out models/bench/sd35m
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/flow_full_geometry.py --out models/bench/sd35m-nf4 --param quantize_frozen=nf4
    .venv/bin/python benchmarks/flow_full_geometry.py --small --out /tmp/sd35-small     # the same path, in a minute

The pipeline is a StableDiffusion3Pipeline built from SD3.5 Medium's published configs (below; no download): its
MM-DiT (24 joint blocks, the first 13 with the second, image-only attention of SD3.5; 2.24 B parameters and a
position-embedding table of 0.23 B values), CLIP-L
and OpenCLIP bigG (the text encoders every method's tokens go into, at full size) and its 16-channel VAE. Not at
real size: T5-XXL (4.7 B parameters, 19 GB in fp32) does not fit beside the transformer in 24 GB, so the
pipeline runs without it, as SD3 allows (`text_encoder_3=None`: the sequence's T5 part is zeros); and the
tokenizers are the tiny test tokenizer, so the two token-embedding tables are a few hundred rows instead of
49,408 (about 0.1 B parameters fewer). Weights are fp32: this CPU has no bf16 matrix unit (bf16 matmuls are far
slower here), so bf16 frozen weights are for GPUs. FLUX.2 [klein] 4B's transformer (3.9 B, 15.5 GB in fp32)
leaves no room for its Qwen3-4B (16 GB) or a training step, and FLUX.1's (11.9 B) does not fit at all; their
trained tensors' sizes come from configs in flow_bundle_sizes.py.
"""

from __future__ import annotations

from geometry import Geometry, clip_encoders, main

# gradient checkpointing where the method allows it; DisenDiff and Infusion read attention maps or place residuals
# in the forward pass, which the recomputation would repeat (docs/flow.md)
SAVERS = {"textual-inversion": {"gradient_checkpointing": True},
          "lora": {"gradient_checkpointing": True, "train_text_encoder": True, "optimizer": "adamw8bit"},
          "custom-diffusion": {"gradient_checkpointing": True, "optimizer": "adamw8bit"},
          "disendiff": {"optimizer": "adamw8bit"},
          "infusion": {}}

SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, sample_size=1024,
               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
# the same structure, narrow and shallow, at 256 px: checks the script end to end in a minute
SMALL_TRANSFORMER = {**SD35_MEDIUM, "sample_size": 32, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
                     "joint_attention_dim": 64, "caption_projection_dim": 16, "pooled_projection_dim": 64,
                     "pos_embed_max_size": 32, "dual_attention_layers": (0,)}
SMALL_VAE = {**SD3_VAE, "sample_size": 256, "block_out_channels": (16, 32, 32, 32), "norm_num_groups": 8}


def build_pipeline(small: bool):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tok, tok2, te, te2 = clip_encoders(small, 32, first_projects=True)  # small: 32 + 32 = the joint dimension
    transformer = SD3Transformer2DModel(**(SMALL_TRANSFORMER if small else SD35_MEDIUM))
    vae = AutoencoderKL(**(SMALL_VAE if small else SD3_VAE))
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
                                    text_encoder_3=None, tokenizer_3=None)
    for part in (te, te2, transformer, vae):
        part.eval()
    return pipe


SD35M = Geometry(name="sd35-medium-geometry-random", build=build_pipeline, savers=SAVERS,
                 sample={"vae_slicing": True, "vae_tiling": True})

if __name__ == "__main__":
    main(SD35M, __file__, __doc__, "models/bench/sd35m")
