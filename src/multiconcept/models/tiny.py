"""The random Stable-Diffusion-shaped pipelines behind `--base tiny` and `--base tiny-sdxl`, and their tokenizer.

Built from configs in about a second, as diffusers' own tests build theirs: the
real classes, random weights, 32×32 images. Good for shapes and plumbing; ToyWorld
is what shows a method works.
"""

from __future__ import annotations

import torch

TINY_WORDS = (
    "a an the of and on in with photo picture cat dog toy man woman chair lamp "
    "red blue green yellow gray black white small large star circle square "
    "background beach snow far away very zoomed close up sks ktn pll ucd "
    "teddy bear table rendering painting"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_tokenizer(words=TINY_WORDS, max_length: int = 77):
    """A CLIP-format byte-level BPE built from a word list, no training, no network.

    Every byte is in the vocabulary, so any text tokenizes; the listed words
    get merges so they are single tokens (a few longer ones are left to split
    into several, which is what tests for multi-token class words need).
    """
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    for w in words:
        if len(w) > 6:  # deliberately multi-token
            continue
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            merge = f"{cur} {p}"
            cur = cur + p
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(cur, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    tok.model_max_length = max_length
    return tok


def tiny_vae(**config):
    """The tiny pipelines' VAE: 32x32 images, 16x16x4 latents; `config` adds to its config (the flow bases'
    latent shift and scale)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        **config,
    )


def tiny_pipeline(seed: int = 0):
    """A random SD-shaped pipeline, 32×32 images, built from configs in ~1 s."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = tiny_vae()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, second_width: int = 32):
    """A random SDXL-shaped pipeline, 32×32 images: two CLIP text encoders (the second with a
    projection, whose pooled output joins the time embedding), a UNet whose first level has no
    cross-attention (SDXL's DownBlock2D) and whose deeper level has two transformer layers, and
    size/crop micro-conditioning (``addition_embed_type="text_time"``).

    `second_width`: the second encoder's width. A real SDXL's is wider than its first (1280 vs 768), and
    diffusers' single-file loader tells the two encoders apart by it; the default 32 (both alike) is
    what `--base tiny-sdxl` has always been, so its fingerprint and bundles stay valid."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer()
    torch.manual_seed(seed)
    text_cfg = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**text_cfg, "hidden_size": second_width,
                                                                  "intermediate_size": 2 * second_width,
                                                                  "projection_dim": second_width}))
    time_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        cross_attention_dim=32 + second_width,  # the two encoders' hidden states side by side, as SDXL's 768 + 1280
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + second_width,  # six size/crop numbers + the pooled text
        norm_num_groups=8,
    )
    vae = tiny_vae()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
