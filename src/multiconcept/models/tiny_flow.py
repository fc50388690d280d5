"""Random flow-matching transformer pipelines behind `--base tiny-flux`, `tiny-flux-schnell`, `tiny-flux2` and
`tiny-sd3`: diffusers' own pipeline classes (FluxPipeline, Flux2KleinPipeline, StableDiffusion3Pipeline) with
their real model classes, built from configs in about a second, 32×32 images.

diffusers' own tests download their T5 and Qwen tokenizers; here they are trained offline with the `tokenizers`
package on a few words: T5's SentencePiece Unigram (with its metaspace "▁" word starts and "</s>" closing every
sequence) and Qwen2's byte-level BPE with the chat template FLUX.2 [klein] renders each prompt through.
Every size is the smallest that keeps each architecture's structure: two double-stream (joint) blocks, so a
method can pick some blocks and not others, and a single-stream block after them (SD3: a dual-attention
block first, as SD3.5 has); a Qwen3 of 28 layers (klein's pipeline reads its hidden states 9, 18 and 27).
"""

from __future__ import annotations

import json

import torch

from .tiny import TINY_WORDS, tiny_tokenizer, tiny_vae

# the T5 sequence length of the tiny bases (FLUX.1 [dev] uses 512, [schnell] 256, SD3 256); Unigram trained on
# a few words splits most of them into pieces, so a prompt takes more tokens than on a real T5
TINY_SEQUENCE = 64
# Qwen's byte-level BPE keeps the few words whole: the chat template and a two-concept caption fit in 48, and fewer
# padding tokens leave the prompt a larger share of the joint attention
TINY_QWEN_SEQUENCE = 48
# real FLUX.1 / SD3 latent normalisation (their VAE configs), kept on the tiny VAEs so the formulas are exercised
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's chat template, reduced to what `apply_chat_template(..., add_generation_prompt=True,
# enable_thinking=False)` renders for one user message
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789<>,.!?'-")


def tiny_t5_tokenizer(words=TINY_WORDS):
    """A T5TokenizerFast whose SentencePiece Unigram model is trained here on `words`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      initial_alphabet=ALPHABET)
    tok.train_from_iterator([" ".join(words)] * 20, trainer)
    # the trainer's EM sums in parallel, so scores vary in their last bits from run to run, and it gives the
    # alphabet's unseen characters scores in a hash set's order: ids would differ between two builds. Rounded,
    # the unseen characters scored alike, and sorted, the same pieces get the same ids every time
    trained = json.loads(tok.to_str())["model"]["vocab"]
    unseen = set(ALPHABET) - set("".join(words))
    specials = trained[:3]
    pieces = sorted(((p, -20.0 if p in unseen else round(v, 6)) for p, v in trained[3:]), key=lambda x: (-x[1], x[0]))
    tok.model = models.Unigram([tuple(x) for x in specials] + pieces, unk_id=2, byte_fallback=False)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    t5 = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)
    t5.model_max_length = TINY_SEQUENCE
    return t5


def tiny_qwen_tokenizer(words=TINY_WORDS):
    """A Qwen2TokenizerFast whose byte-level BPE is trained here on `words`, with Qwen3's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(QWEN_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(words)] * 20 + ["user assistant"] * 20, trainer)
    qwen = Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                              bos_token=None)
    qwen.chat_template = QWEN_CHAT_TEMPLATE
    qwen.model_max_length = TINY_QWEN_SEQUENCE
    return qwen


def tiny_t5(tokenizer, width: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                                   num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0))


def tiny_clip(tokenizer, width: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=width,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def ready(pipe):
    """In inference mode, as `from_pretrained` leaves a pipeline (T5's dropout would otherwise be on), and quiet."""
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flow_scheduler(**config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


def tiny_flux_pipeline(seed: int = 0, guidance: bool = True, single_layers: int = 1):
    """FLUX.1-shaped: CLIP-L (pooled only) + T5 (the sequence), a FluxTransformer2DModel with 2x2-packed latents.
    `guidance`: the guidance-distilled [dev] (the transformer takes a guidance input) or [schnell] (it does not);
    `single_layers`: single-stream blocks after the two joint ones (diffusers' kohya FLUX.1 reader knows their
    fused projection only at FLUX.1's real width, so its round trip is tested without them)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=single_layers,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4))
    # FLUX.1 [dev]'s scheduler config: the shift is chosen per image size (use_dynamic_shifting)
    scheduler = flow_scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                               base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=tiny_vae(**FLUX_VAE), text_encoder=tiny_clip(tokenizer, 32, False),
                        tokenizer=tokenizer, text_encoder_2=tiny_t5(tokenizer_2), tokenizer_2=tokenizer_2,
                        transformer=transformer)
    pipe.default_sample_size = 16  # 32 px images, as the other tiny bases
    return ready(pipe)


def tiny_flux2_pipeline(seed: int = 0):
    """FLUX.2 [klein]-shaped (the undistilled base, which diffusers' klein LoRA script trains): a Qwen3 causal LM
    whose hidden states 9, 18 and 27 side by side are the sequence, a Flux2Transformer2DModel, AutoencoderKLFlux2."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    width = 16
    text_encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                                                num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
                                                head_dim=8, max_position_embeddings=128, tie_word_embeddings=True,
                                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    # klein reads Qwen's hidden states before its final norm; drawn at transformers' 0.02 they would be ~50x smaller
    # than the image tokens and the prompt would barely reach the transformer: the tiny's token table is unit-scale
    torch.nn.init.normal_(text_encoder.get_input_embeddings().weight, std=1.0)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=1,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=3 * width,
                                          timestep_guidance_channels=16, mlp_ratio=3.0, axes_dims_rope=(2, 2, 2, 2),
                                          guidance_embeds=False)
    # FLUX.2's modulation has no bias: from the timestep embedding random weights make (~0.07 wide) its gates come
    # out near 0.02, so the attention, and with it the prompt, would barely reach the image tokens; drawn wider
    # here, the gates are near 1.5 and the prompt moves the prediction about as much as on the tiny FLUX.1
    torch.nn.init.normal_(transformer.time_guidance_embed.timestep_embedder.linear_2.weight, std=4.0)
    vae = AutoencoderKLFlux2(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                             norm_num_groups=8, sample_size=32)
    scheduler = flow_scheduler(shift=3.0, use_dynamic_shifting=True)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)
    pipe.tokenizer_max_length = TINY_QWEN_SEQUENCE
    pipe.default_sample_size = 16
    return ready(pipe)


def tiny_sd3_pipeline(seed: int = 0, t5: bool = True, clip_widths: tuple[int, int] = (16, 16),
                      unprojected_clip_l: bool = False):
    """SD3.5-shaped: CLIP-L and CLIP-G (pooled and sequence, side by side) then T5 after them in the sequence
    (`t5` False: a pipeline loaded without it, as SD3 allows), an SD3Transformer2DModel of JointTransformerBlocks
    whose first block has SD3.5's second, image-only attention (dual attention) and qk RMS norms.

    What a single file can hold (export/original_layout.py) asks two things of SD3's own encoders that the default
    tiny does not have: `clip_widths` CLIP-G wider than CLIP-L (768 and 1280 in SD3; diffusers tells the two apart
    in a file by width; their sum stays the T5's 32, which the pipeline pads their side-by-side states to), and
    `unprojected_clip_l`: CLIP-L's projection the identity (SD3's reference code pools CLIP-L unprojected, and
    diffusers reads a file's CLIP-L projection as the identity)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = tiny_tokenizer(), tiny_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=sum(clip_widths), pos_embed_max_size=16,
                                        dual_attention_layers=(0,), qk_norm="rms_norm")
    encoder_3 = tiny_t5(tokenizer_3)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=flow_scheduler(shift=3.0), vae=tiny_vae(**SD3_VAE),
        text_encoder=tiny_clip(tokenizer, clip_widths[0], True), tokenizer=tokenizer,
        text_encoder_2=tiny_clip(tokenizer_2, clip_widths[1], True), tokenizer_2=tokenizer_2,
        text_encoder_3=encoder_3 if t5 else None, tokenizer_3=tokenizer_3 if t5 else None)
    if unprojected_clip_l:
        with torch.no_grad():
            pipe.text_encoder.text_projection.weight.copy_(torch.eye(clip_widths[0]))
    return ready(pipe)


TINY_FLOW = {"tiny-flux": tiny_flux_pipeline, "tiny-flux-schnell": lambda: tiny_flux_pipeline(guidance=False),
             "tiny-flux2": tiny_flux2_pipeline, "tiny-sd3": tiny_sd3_pipeline,
             "tiny-sd3-no-t5": lambda: tiny_sd3_pipeline(t5=False)}
