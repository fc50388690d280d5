"""Every fine-tuning method on the full SDXL geometry, random weights: one training step and one
generation step each, at 1024 px, batch 1, on the CPU, with the memory savers.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sdxl_full_geometry.py --out models/bench/sdxl
    .venv/bin/python benchmarks/sdxl_full_geometry.py --small --out /tmp/sdxl-small   # the same path, in a minute

The pipeline is built from SDXL base 1.0's published configs (UNet 2.57 B parameters, CLIP ViT-L and
OpenCLIP ViT-bigG text encoders, its VAE), written below; no download. The tokenizers are the tiny
test tokenizer, so the two token-embedding tables are a few hundred rows instead of 49,408 (about 0.1 B
parameters fewer; every other weight is SDXL's). Weights are fp32: this CPU has no bf16 matrix unit
(a 2048² bf16 matmul runs ~300x slower than fp32 here), so bf16 frozen weights are for GPUs.

Each method runs in its own process, so each peak resident memory (VmHWM, reset between phases
through /proc/self/clear_refs) is that method's alone; an address-space limit turns an out-of-memory
into a recorded error instead of the kernel killing a process. Results go to OUT/results.json and a
table on stdout.
"""

from __future__ import annotations

from geometry import Geometry, clip_encoders, main

# gradient checkpointing where the method allows it; DisenDiff and Infusion read attention maps or
# place residuals in the forward pass, which the recomputation would repeat (docs/sdxl.md)
SAVERS = {"textual-inversion": {"gradient_checkpointing": True},
          "lora": {"gradient_checkpointing": True, "train_text_encoder": True, "optimizer": "adamw8bit"},
          "custom-diffusion": {"gradient_checkpointing": True, "optimizer": "adamw8bit"},
          "disendiff": {"optimizer": "adamw8bit"},
          "infusion": {}}

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True)
# the same structure, narrow and shallow, at 256 px: checks the script end to end in a minute
SMALL_UNET = {**SDXL_UNET, "sample_size": 32, "block_out_channels": (32, 64, 128), "transformer_layers_per_block": (1, 1, 2),
              "attention_head_dim": (2, 4, 8), "cross_attention_dim": 96, "addition_time_embed_dim": 8,
              "projection_class_embeddings_input_dim": 6 * 8 + 64, "norm_num_groups": 8}
SMALL_VAE = {**SDXL_VAE, "sample_size": 256, "block_out_channels": (16, 32, 32, 32), "norm_num_groups": 8}


def build_pipeline(small: bool):
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tok, tok2, te, te2 = clip_encoders(small, 64, first_projects=False)
    unet = UNet2DConditionModel(**(SMALL_UNET if small else SDXL_UNET))
    vae = AutoencoderKL(**(SMALL_VAE if small else SDXL_VAE))
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=sched)


SDXL = Geometry(name="sdxl-geometry-random", build=build_pipeline, savers=SAVERS,
                sample={"vae_slicing": True, "vae_tiling": True})

if __name__ == "__main__":
    main(SDXL, __file__, __doc__, "models/bench/sdxl")
