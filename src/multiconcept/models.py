"""Base models: where the weights come from, and nothing above this knows.

`load_base(name)` accepts
- ``None`` or ``"toyworld"``: the embedded ToyWorld pipeline shipped in the
  package (see toyworld/), the default;
- ``"tiny"``: a random Stable-Diffusion-shaped pipeline built from configs,
  for tests and for machines without ToyWorld weights;
- a local folder holding a StableDiffusionPipeline (``model_index.json``) or
  a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), loaded by diffusers.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError

TOYWORLD_DIR = Path(__file__).parent / "toyworld" / "assets"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Base:
    """A loaded base pipeline plus what identifies it."""

    pipe: "StableDiffusionPipeline"  # noqa: F821
    name: str
    fingerprint: str
    # what methods installed on the pipeline: peft LoRA adapters by name with their weights
    # (LoRA bundles, --lora files), and Infusion's class-word residuals (methods/infusion.py)
    lora_adapters: dict[str, float] = field(default_factory=dict)
    infusion: object | None = None

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def resolution(self) -> int:
        """Native image size: latent sample size times the VAE's downsampling."""
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor


# ---------------------------------------------------------------- devices

def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        try:
            return torch.device(name)
        except RuntimeError as e:
            raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from e
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    if device.type == "cpu" and name == "fp16":
        raise UserError("fp16 is not supported on the CPU: use --dtype fp32 or bf16")
    return DTYPES[name]


# ---------------------------------------------------------------- tiny base

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


def tiny_pipeline(seed: int = 0):
    """A random SD-shaped pipeline, 32×32 images, built from configs in ~1 s."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
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
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
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


# ---------------------------------------------------------------- loading

def fingerprint(pipe) -> str:
    """Identify a base by its configs, vocabulary and weight statistics.

    Statistics (mean |w|, std at 3 significant digits) rather than raw bytes,
    so the same checkpoint loaded in fp32, fp16 or bf16 gets the same print.
    """
    h = hashlib.sha256()
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        raw = part.config.to_dict() if hasattr(part.config, "to_dict") else dict(part.config)
        cfg = {k: v for k, v in raw.items()
               if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")}
        h.update(type(part).__name__.encode())
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(str(pipe.text_encoder.get_input_embeddings().weight.shape[0]).encode())
    probes = [
        pipe.unet.conv_in.weight,
        pipe.unet.conv_out.weight,
        pipe.text_encoder.get_input_embeddings().weight,
        pipe.vae.decoder.conv_out.weight,
    ]
    for t in probes:
        t = t.detach().float()
        h.update(f"{t.abs().mean().item():.3g}/{t.std().item():.3g}".encode())
    return h.hexdigest()[:16]


def toyworld_available() -> bool:
    return (TOYWORLD_DIR / "base" / "model_index.json").is_file()


@contextmanager
def quiet_loading():
    """No 'Loading weights' bars from transformers while a model loads: the caller
    shows its own progress, and errors stay one line."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def follow_progress_bar_setting() -> None:
    """diffusers and transformers draw loading bars unless told in code; take
    huggingface_hub's switch (HF_HUB_DISABLE_PROGRESS_BARS, which the CLI sets
    unless --verbose) as the word for all three."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes", "on"):
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()


def load_base(name: str | None = None, device: str = "auto", dtype: str = "fp32") -> Base:
    from diffusers import StableDiffusionPipeline

    follow_progress_bar_setting()
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if name in (None, "toyworld"):
        if not toyworld_available():
            raise UserError(
                "the ToyWorld base is not built into this install: run `multiconcept toyworld build`, "
                "or pass --base tiny (random test model) or --base PATH_OR_HUB_ID"
            )
        pipe = StableDiffusionPipeline.from_pretrained(TOYWORLD_DIR / "base", dtype=dt)
        name = "toyworld"
    elif name == "tiny":
        pipe = tiny_pipeline()
        if dt != torch.float32:
            pipe = pipe.to(dtype=dt)
    else:
        path = Path(name)
        if path.exists():
            if not (path / "model_index.json").is_file():
                raise UserError(f"{name} has no model_index.json: "
                                "pass a StableDiffusionPipeline folder (save_pretrained) or a hub id")
            source = str(path)
        else:
            source = name
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                source, dtype=dt, safety_checker=None, requires_safety_checker=False
            )
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"could not load base {name!r} ({first}): "
                            "pass a local pipeline folder, or a hub id with network access") from e
    pipe.set_progress_bar_config(disable=True)
    fp = fingerprint(pipe)
    pipe = pipe.to(dev)
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        part.requires_grad_(False)
        part.eval()
    return Base(pipe=pipe, name=str(name), fingerprint=fp)
