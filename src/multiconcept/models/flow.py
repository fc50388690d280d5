"""Flow-matching transformer bases: FLUX.1 [dev]/[schnell], FLUX.2 [klein] and SD3 / 3.5, through diffusers' own
pipelines (FluxPipeline, Flux2KleinPipeline, StableDiffusion3Pipeline). What differs between them is here, once
per architecture; nothing above asks which one it has.

- the text: `encode` calls the pipeline's own `encode_prompt` (with gradients, so trained token rows learn),
  so training conditions the transformer exactly as generation does; `sequence` says which token of the prompt
  sits at each position of that conditioning sequence (FLUX.1: T5's; SD3: CLIP's 77, CLIP-L and CLIP-G side by
  side, then T5's; FLUX.2 [klein]: Qwen's, inside the chat template the pipeline renders);
- the latents: `to_model` from the VAE's scaled latents to what the transformer denoises (FLUX.2 [klein]:
  2x2 patches normalised by the VAE's batch-norm statistics, as its pipeline encodes images);
- the call: `predict` packs the latents, builds the position ids and the guidance input the pipeline would,
  calls the transformer and unpacks its prediction (of ε − x₀) to the latent's shape;
- the joint attention: which blocks hold separate text projections (`add_k_proj` / `add_v_proj`, the
  double-stream blocks; single-stream blocks' K/V also serve image self-attention), and whether the text
  comes first in the concatenated sequence (FLUX) or after the image (SD3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError, require

FLOW_PIPELINES = {"FluxPipeline": "flux1", "Flux2KleinPipeline": "flux2", "StableDiffusion3Pipeline": "sd3"}
FLOW_TRANSFORMERS = {"FluxTransformer2DModel": "flux1", "Flux2Transformer2DModel": "flux2",
                     "SD3Transformer2DModel": "sd3"}


class SequenceTokens:
    """A tokenizer-like view of a flow base's conditioning sequence: `__call__(prompt, return_offsets_mapping=True)`
    gives, for every position of the sequence up to the prompt's last token, the token's id and its character
    span in the prompt ((0, 0) for template, start and padding tokens), as a fast tokenizer does for its own ids.
    Too long a prompt is refused here: each part has its own limit."""

    def __init__(self, flow: "FlowArchitecture", pipe, max_length: int):
        self.flow, self.pipe, self.max_length = flow, pipe, max_length

    @property
    def model_max_length(self) -> int:
        return 10**9  # each part's limit is checked in __call__

    def __call__(self, prompt: str, return_offsets_mapping: bool = True, truncation: bool = False, **_):
        ids, offsets = self.flow.sequence(self.pipe, prompt, self.max_length)
        return {"input_ids": ids, "offset_mapping": offsets}

    def pieces(self, prompt: str) -> list[tuple[int, str]]:
        """(position, text) of the prompt's own tokens in the sequence, each once (heatmap labels; SD3: CLIP's)."""
        enc = self(prompt)
        limit = self.pipe.tokenizer_max_length if self.flow.name == "sd3" else len(enc["input_ids"])
        return [(i, prompt[s:e].strip() or prompt[s:e]) for i, (s, e) in enumerate(enc["offset_mapping"][:limit])
                if e > s]


def _parts(tokenizer, text: str, limit: int, what: str, span: tuple[int, int] | None = None):
    """(ids, offsets) of `text`, with offsets relative to the prompt, which is `text`'s characters `span`
    (all of it by default); tokens outside the prompt get (0, 0)."""
    start, end = span or (0, len(text))
    enc = tokenizer(text, return_offsets_mapping=True, truncation=False)
    ids = list(enc["input_ids"])
    require(len(ids) <= limit, f"prompt is {len(ids)} {what} tokens, longer than this base's limit of {limit}: "
                               f"shorten it ({text[start:start + 40]!r}...)")
    return ids, [(s - start, e - start) if e > s and s >= start and e <= end else (0, 0) for s, e in enc["offset_mapping"]]


@dataclass(frozen=True)
class FlowArchitecture:
    name: str  # a key of models.ARCHITECTURES
    text_first: bool  # the joint attention's sequence is [text; image] (FLUX) or [image; text] (SD3)
    constant_first_token: bool  # every prompt's sequence starts with the same token (CLIP's BOS, Qwen's <|im_start|>)
    lora_targets: tuple  # attention projections of the transformer blocks (diffusers' LoRA scripts' set)
    batched_guidance: bool  # the pipeline runs guidance as one [uncond; cond] batch (SD3), not two calls (FLUX)

    # -- text
    def encode(self, pipe, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def sequence(self, pipe, prompt: str, max_length: int) -> tuple[list[int], list[tuple[int, int]]]:
        raise NotImplementedError

    # -- latents and the transformer call
    def to_model(self, pipe, z: torch.Tensor) -> torch.Tensor:
        return z

    def predict(self, pipe, z: torch.Tensor, timesteps: torch.Tensor, hidden, pooled, guidance: float) -> torch.Tensor:
        raise NotImplementedError

    def token_grid(self, transformer, args, kwargs) -> tuple[int, int]:
        """(h, w) of the image tokens of a transformer call, from its inputs."""
        ids = kwargs["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1

    def pipeline_kwargs(self, pipe, guidance: float, negative: str, max_length: int, n: int) -> dict:
        raise NotImplementedError

    # -- joint attention
    def text_attention(self, transformer) -> dict[str, torch.nn.Module]:
        """{name: attention} of the blocks whose text tokens have their own key and value projections."""
        return {f"transformer_blocks.{i}.attn": b.attn for i, b in enumerate(transformer.transformer_blocks)
                if getattr(b.attn, "add_k_proj", None) is not None}


class Flux1(FlowArchitecture):
    def encode(self, pipe, prompts, max_length):
        hidden, pooled, _ = pipe.encode_prompt(prompts, device=pipe.transformer.device, max_sequence_length=max_length)
        return hidden, pooled

    def sequence(self, pipe, prompt, max_length):
        return _parts(pipe.tokenizer_2, prompt, max_length, "T5")

    def predict(self, pipe, z, timesteps, hidden, pooled, guidance):
        b, c, h, w = z.shape
        t = pipe.transformer
        packed = pipe._pack_latents(z, b, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, z.device, z.dtype)
        txt_ids = torch.zeros(hidden.shape[1], 3, device=z.device, dtype=z.dtype)
        # [dev] was distilled from guided sampling: the guidance strength is an input (diffusers' LoRA script: 3.5)
        g = torch.full((b,), float(guidance), device=z.device, dtype=torch.float32) if t.config.guidance_embeds else None
        out = t(hidden_states=packed, timestep=timesteps / 1000, guidance=g, pooled_projections=pooled,
                encoder_hidden_states=hidden, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(out, h * scale, w * scale, scale)

    def pipeline_kwargs(self, pipe, guidance, negative, max_length, n):
        # --guidance is the distilled guidance input on [dev] (ignored by [schnell]); a negative prompt turns on
        # true classifier-free guidance at the same strength, two transformer calls per step
        kw = {"guidance_scale": guidance, "max_sequence_length": max_length}
        if negative:
            kw.update(negative_prompt=[negative] * n, true_cfg_scale=guidance)
        return kw


class Flux2Klein(FlowArchitecture):
    def encode(self, pipe, prompts, max_length):
        hidden, _ = pipe.encode_prompt(prompts, device=pipe.transformer.device, max_sequence_length=max_length)
        return hidden, None

    def sequence(self, pipe, prompt, max_length):
        tok = pipe.tokenizer
        marker = "\u2063"  # where the prompt goes in the chat template, found by rendering a marker there
        render = lambda text: tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=False)
        start = render(marker).index(marker)
        return _parts(tok, render(prompt), max_length, "Qwen", span=(start, start + len(prompt)))

    def to_model(self, pipe, z):
        # as Flux2KleinPipeline encodes an image: 2x2 patches, then the VAE's batch-norm running statistics
        z = pipe._patchify_latents(z)
        bn = pipe.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(z)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(z)
        return (z - mean) / std

    def predict(self, pipe, z, timesteps, hidden, pooled, guidance):
        t = pipe.transformer
        ids = pipe._prepare_latent_ids(z).to(z.device)
        txt_ids = pipe._prepare_text_ids(hidden).to(z.device)
        g = torch.full((z.shape[0],), float(guidance), device=z.device) if t.config.guidance_embeds else None
        out = t(hidden_states=pipe._pack_latents(z), timestep=timesteps / 1000, guidance=g, encoder_hidden_states=hidden,
                txt_ids=txt_ids, img_ids=ids, return_dict=False)[0]
        return pipe._unpack_latents_with_ids(out, ids, z.shape[2], z.shape[3])

    def pipeline_kwargs(self, pipe, guidance, negative, max_length, n):
        kw = {"guidance_scale": guidance, "max_sequence_length": max_length}
        if negative:  # the pipeline takes no negative text; it is encoded here, as the pipeline encodes ""
            kw["negative_prompt_embeds"] = pipe.encode_prompt([negative] * n, max_sequence_length=max_length)[0]
        return kw


class SD3(FlowArchitecture):
    def encode(self, pipe, prompts, max_length):
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=pipe.transformer.device,
                                                  do_classifier_free_guidance=False, max_sequence_length=max_length)
        return hidden, pooled

    def sequence(self, pipe, prompt, max_length):
        # CLIP-L's and CLIP-G's hidden states side by side fill the first 77 positions (tokenised alike), T5's follow
        clip = pipe.tokenizer_max_length
        ids, offsets = _parts(pipe.tokenizer, prompt, clip, "CLIP")
        if pipe.text_encoder_3 is None:
            return ids, offsets
        t5_ids, t5_offsets = _parts(pipe.tokenizer_3, prompt, max_length, "T5")
        pad = clip - len(ids)
        return ids + [pipe.tokenizer.pad_token_id] * pad + t5_ids, offsets + [(0, 0)] * pad + t5_offsets

    def predict(self, pipe, z, timesteps, hidden, pooled, guidance):
        return pipe.transformer(hidden_states=z, timestep=timesteps, encoder_hidden_states=hidden,
                                pooled_projections=pooled, return_dict=False)[0]

    def token_grid(self, transformer, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        p = transformer.config.patch_size
        return x.shape[-2] // p, x.shape[-1] // p

    def pipeline_kwargs(self, pipe, guidance, negative, max_length, n):
        return {"guidance_scale": guidance, "max_sequence_length": max_length,
                "negative_prompt": [negative] * n if negative else None}


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FLOWS = {
    # diffusers' FLUX.1 DreamBooth-LoRA script's default layers, attention only: image and text projections
    "flux1": Flux1("flux1", True, False, ATTENTION + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"), False),
    # FLUX.2: double blocks as FLUX.1; single blocks fuse Q, K, V and the MLP input in one projection
    "flux2": Flux2Klein("flux2", True, True, ATTENTION + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                                                         "to_qkv_mlp_proj"), False),
    "sd3": SD3("sd3", False, True, ATTENTION + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"), True),
}


# the text encoders each pipeline cannot do without: the ones whose states are the sequence the joint attention
# reads (where every method's tokens go) or the pooled vector it is conditioned on. SD3 runs without its T5.
REQUIRED_ENCODERS = {
    "FluxPipeline": {"text_encoder": "CLIP-L (its pooled vector conditions every block)",
                     "text_encoder_2": "T5 (its states are the sequence the joint attention reads)"},
    "Flux2KleinPipeline": {"text_encoder": "Qwen3 (its hidden states are the sequence the joint attention reads)"},
    "StableDiffusion3Pipeline": {"text_encoder": "CLIP-L (sequence and pooled vector)",
                                 "text_encoder_2": "CLIP-G (sequence and pooled vector)"},
}


def require_text_encoders(pipeline: str, present, source: str) -> None:
    """Refuse a flow pipeline without a text encoder it needs (`present`: the component names it has)."""
    missing = [(c, what) for c, what in REQUIRED_ENCODERS.get(pipeline, {}).items() if c not in present]
    if missing:
        c, what = missing[0]
        raise UserError(f"base {source} is a {pipeline} without its {c}, {what}: load the pipeline with every text "
                        "encoder (the methods learn tokens in them and generation encodes prompts with them)")


def is_flow_source(source) -> bool:
    """Whether a --base names a flow transformer, as far as can be told without loading it: a tiny flow base, a
    folder whose model_index.json names a flow pipeline, a single file whose header names a flow transformer's
    weights, or a loaded Base that is one (a hub id: only once loaded)."""
    import json
    from pathlib import Path

    from ..errors import is_file
    from .single_file import SUFFIX, SingleFile, flow_family, read_safetensors_header

    if getattr(source, "flow", None) is not None:
        return True
    if isinstance(source, SingleFile) or (isinstance(source, str) and source.endswith(SUFFIX) and is_file(source)):
        path = Path(str(source))  # a single file tells by its header's names, before anything loads
        return is_file(path) and flow_family(path, read_safetensors_header(path)[0]) is not None
    if not isinstance(source, str):
        return False
    if source.startswith("tiny-") and source not in ("tiny-sdxl",):
        return True
    index = Path(source) / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_class_name") in FLOW_PIPELINES
    except (OSError, ValueError):
        return False


def refuse_flow_base(source, what: str) -> None:
    if is_flow_source(source):
        raise UserError(f"{what} runs on a UNet base (SD 1.x, SD 2.x, SDXL, ToyWorld), not on a flow-matching "
                        f"transformer ({getattr(source, 'name', source)}) yet: pass such a --base")


def flow_architecture(pipe) -> str | None:
    """"flux1", "flux2" or "sd3" from the transformer's class; None for a UNet pipeline."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return None
    name = FLOW_TRANSFORMERS.get(type(transformer).__name__)
    if name is None:
        raise UserError(f"the pipeline's transformer is a {type(transformer).__name__}: pass a FLUX.1, FLUX.2 [klein] "
                        "or SD3 pipeline")
    return name


def sequence_length(pipe, name: str) -> int:
    """The T5 / Qwen sequence length training and generation use: the pipeline's default (FLUX.1 [dev] 512,
    [schnell] 256 as BFL samples it, SD3 256, FLUX.2 [klein] 512), capped by the tokenizer's own limit."""
    if name == "sd3":
        tok, default = pipe.tokenizer_3, 256
    elif name == "flux1":
        tok, default = pipe.tokenizer_2, 512 if pipe.transformer.config.guidance_embeds else 256
    else:
        tok, default = pipe.tokenizer, getattr(pipe, "tokenizer_max_length", 512)
    return min(default, tok.model_max_length) if tok is not None else default


def native_resolution(pipe, name: str) -> int:
    if name == "sd3":
        return pipe.transformer.config.sample_size * pipe.vae_scale_factor
    return pipe.default_sample_size * pipe.vae_scale_factor
