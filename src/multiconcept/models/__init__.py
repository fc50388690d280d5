"""Base models: where the weights come from, and nothing above this knows.

`load_base(name)` accepts
- ``None`` or ``"toyworld"``: the embedded ToyWorld pipeline shipped in the
  package (see toyworld/), the default;
- ``"tiny"``: a random Stable-Diffusion-shaped pipeline built from configs,
  for tests and for machines without ToyWorld weights; ``"tiny-sdxl"``: its
  SDXL-shaped sibling; ``"tiny-flux"``, ``"tiny-flux-schnell"``, ``"tiny-flux2"``,
  ``"tiny-sd3"`` (and ``"tiny-sd3-no-t5"``): the flow-matching transformers' (tiny_flow.py);
- a local folder holding a StableDiffusionPipeline, StableDiffusionXLPipeline, FluxPipeline
  (FLUX.1 [dev] / [schnell]), Flux2KleinPipeline or StableDiffusion3Pipeline (``model_index.json``) or a hub id
  (``stable-diffusion-v1-5/stable-diffusion-v1-5``, ``black-forest-labs/FLUX.1-dev``,
  ``stabilityai/stable-diffusion-3.5-medium``), loaded by diffusers;
- a single-file checkpoint ``FILE.safetensors`` (SD 1.x, SD 2.x, SDXL as A1111, ComfyUI and kohya hold them;
  FLUX.1 and SD3 / 3.5 as BFL, Stability and ComfyUI ship them; FLUX.2 [klein]'s transformer with its pipeline's
  configs), or a `SingleFile` naming the diffusers configs that fit it (single_file.py).

Every base has an architecture (`architecture_of`): ``"sdxl"`` when the UNet
takes SDXL's size/crop micro-conditioning and pooled text (``addition_embed_type
"text_time"``, which only SDXL-family UNets have) and the pipeline has a second
text encoder; otherwise ``"sd2"`` when the UNet's cross-attention reads 1024-wide
text (SD 2.x's OpenCLIP ViT-H), else ``"sd1"`` (CLIP ViT-L's 768, and the
SD-1.x-shaped tiny and ToyWorld bases). The UNet config decides rather than the
pipeline class, because a folder saved by another tool may name a class we do
not load it with. A transformer pipeline's architecture is its transformer's class:
``"flux1"``, ``"flux2"`` (FLUX.2 [klein]) or ``"sd3"`` (SD3 and 3.5); flow.py holds what differs between them.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from .fingerprint import fingerprint, weights_digest
from .flow import (
    FLOW_PIPELINES,
    FLOWS,
    SequenceTokens,
    flow_architecture,
    native_resolution,
    require_text_encoders,
    sequence_length,
)
from .single_file import SingleFile, is_checkpoint_path, load_single_file

TOYWORLD_DIR = Path(__file__).parent.parent / "toyworld" / "assets"

ARCHITECTURES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "flux1": "FLUX.1", "flux2": "FLUX.2 [klein]",
                 "sd3": "SD3"}
PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", **FLOW_PIPELINES}
PIPELINE_NAMES = "a StableDiffusionPipeline, StableDiffusionXLPipeline, FluxPipeline, Flux2KleinPipeline or " \
                 "StableDiffusion3Pipeline"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def text_encoder_component(k: int) -> str:
    """The pipeline's name of its text encoder k (0-based): text_encoder, text_encoder_2 (SDXL's second), ..."""
    return "text_encoder" + (f"_{k + 1}" if k else "")


@dataclass
class Base:
    """A loaded base pipeline plus what identifies it."""

    pipe: "StableDiffusionPipeline"  # noqa: F821  (or any pipeline of PIPELINES)
    name: str
    fingerprint: str
    architecture: str = "sd1"  # a key of ARCHITECTURES, from architecture_of(pipe)
    weights: dict[str, str] = field(default_factory=dict)  # weights_digest(pipe): {grid: digest}
    # a single-file base's diffusers configs (--base-config), which code written for other tools must name too
    base_config: str | None = None
    # what methods installed on the pipeline: peft LoRA adapters by name with their weights
    # (LoRA bundles, --lora files), and Infusion's class-word residuals (methods/infusion.py)
    lora_adapters: dict[str, float] = field(default_factory=dict)
    infusion: object | None = None

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def flow(self):
        """The flow-matching transformer architecture (flow.FLOWS) of this base, None for a UNet base."""
        return FLOWS.get(self.architecture)

    @property
    def denoiser_name(self) -> str:
        """The pipeline's name of the network that denoises: "unet" or "transformer"."""
        return "transformer" if self.flow is not None else "unet"

    @property
    def denoiser(self):
        return getattr(self.pipe, self.denoiser_name)

    @property
    def denoiser_label(self) -> str:
        """How messages name the denoiser: "UNet" or "transformer"."""
        return "transformer" if self.flow is not None else "UNet"

    @property
    def sequence_length(self) -> int:
        """The T5 / Qwen tokens a flow base's prompts are padded to (flow.sequence_length)."""
        return sequence_length(self.pipe, self.architecture)

    @property
    def sequence_tokenizer(self):
        """What gives each position of the denoiser's text sequence its token and its span in the prompt:
        the tokenizer itself on a UNet base (its 77 positions), flow.SequenceTokens on a transformer."""
        if self.flow is None:
            return self.pipe.tokenizer
        return SequenceTokens(self.flow, self.pipe, self.sequence_length)

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def text_encoders(self) -> list:
        """Every text encoder, the first first (SDXL: CLIP ViT-L, then OpenCLIP ViT-bigG; FLUX.1: CLIP-L, T5;
        SD3: CLIP-L, CLIP-G, T5 when the pipeline has it; FLUX.2 [klein]: its Qwen3)."""
        return [te for te in (getattr(self.pipe, text_encoder_component(k), None) for k in range(3)) if te is not None]

    @property
    def tokenizers(self) -> list:
        names = ("tokenizer", "tokenizer_2", "tokenizer_3")
        return [t for t, te in ((getattr(self.pipe, n, None), getattr(self.pipe, text_encoder_component(k), None))
                                for k, n in enumerate(names)) if t is not None and te is not None]

    @property
    def parts(self) -> dict:
        """{pipeline component name: model} for the denoiser and every text encoder (what LoRA factors name)."""
        return {self.denoiser_name: self.denoiser,
                **{text_encoder_component(k): te for k, te in enumerate(self.text_encoders)}}

    @property
    def is_sdxl(self) -> bool:
        return self.architecture == "sdxl"

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def resolution(self) -> int:
        """Native image size: latent sample size times the VAE's downsampling."""
        if self.flow is not None:
            return native_resolution(self.pipe, self.architecture)
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


# ---------------------------------------------------------------- loading

def architecture_of(pipe) -> str:
    """"sdxl", "sd2" or "sd1", from the UNet's config, or a flow transformer's (see the module's docstring)."""
    flow = flow_architecture(pipe)
    if flow is not None:
        return flow
    cfg = pipe.unet.config
    if cfg.get("addition_embed_type") == "text_time" and getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd2" if cfg.get("cross_attention_dim") == 1024 else "sd1"


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


def pipeline_class(source: str):
    """The diffusers class for a local folder (its model_index.json names it); a hub id, whose
    index is only read by loading, goes through DiffusionPipeline and is checked after."""
    import diffusers

    index = Path(source) / "model_index.json"
    if not index.is_file():
        return diffusers.DiffusionPipeline
    try:
        name = json.loads(index.read_text()).get("_class_name", "StableDiffusionPipeline")
    except (ValueError, OSError) as e:
        raise UserError(f"{index} is not readable JSON ({type(e).__name__}): restore the pipeline folder") from e
    if name not in PIPELINES:
        raise UserError(f"{source} holds a {name}: pass {PIPELINE_NAMES} folder")
    return getattr(diffusers, name)


def load_base(name: str | SingleFile | None = None, device: str = "auto", dtype: str = "fp32") -> Base:
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
        from .tiny import tiny_pipeline

        pipe = tiny_pipeline()
        if dt != torch.float32:
            pipe = pipe.to(dtype=dt)
    elif name == "tiny-sdxl":
        from .tiny import tiny_sdxl_pipeline

        pipe = tiny_sdxl_pipeline()
        if dt != torch.float32:
            pipe = pipe.to(dtype=dt)
    elif isinstance(name, str) and name.startswith("tiny-") and name in tiny_flow_names():
        from .tiny_flow import TINY_FLOW

        pipe = TINY_FLOW[name]()
        if dt != torch.float32:
            pipe = pipe.to(dtype=dt)
    elif is_checkpoint_path(name):
        source = name if isinstance(name, SingleFile) else SingleFile(Path(name))
        pipe = load_single_file(source, dt)
        base = base_from_pipeline(pipe, str(name), dev)
        base.base_config = source.config
        return base
    else:
        path = Path(name)
        if path.exists():
            if not (path / "model_index.json").is_file():
                raise UserError(f"{name} has no model_index.json: "
                                f"pass {PIPELINE_NAMES} folder (save_pretrained) or a hub id")
            source = str(path)
        else:
            source = name
        cls = pipeline_class(source)
        if path.exists():  # a folder's components are listed before anything loads
            index = json.loads((path / "model_index.json").read_text())
            require_text_encoders(cls.__name__, {c for c, v in index.items() if isinstance(v, list) and v[0]}, name)
        # SD pipelines load without their safety checker; SDXL's and the transformers' have none (DiffusionPipeline,
        # for a hub id, ignores the two arguments when the id turns out to be another pipeline)
        extra = dict(safety_checker=None, requires_safety_checker=False) if cls.__name__ in (
            "StableDiffusionPipeline", "DiffusionPipeline") else {}
        try:
            pipe = cls.from_pretrained(source, dtype=dt, **extra)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"could not load base {name!r} ({first}): "
                            "pass a local pipeline folder, or a hub id with network access") from e
        if type(pipe).__name__ not in PIPELINES:
            raise UserError(f"base {name!r} is a {type(pipe).__name__}: pass {PIPELINE_NAMES}")
        require_text_encoders(type(pipe).__name__, {c for c, v in pipe.components.items() if v is not None}, name)
    return base_from_pipeline(pipe, str(name), dev)


def base_from_pipeline(pipe, name: str, device: torch.device | None = None) -> Base:
    """A Base of a pipeline already in memory (loaded above, or built from configs), frozen and on `device`."""
    pipe.set_progress_bar_config(disable=True)
    fp, weights = fingerprint(pipe), weights_digest(pipe)
    if device is not None:
        pipe = pipe.to(device)
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    encoders = [getattr(pipe, text_encoder_component(k), None) for k in range(3)]
    for part in (denoiser, pipe.vae, *[te for te in encoders if te is not None]):
        part.requires_grad_(False)
        part.eval()
    return Base(pipe=pipe, name=name, fingerprint=fp, architecture=architecture_of(pipe), weights=weights)


def tiny_flow_names() -> tuple[str, ...]:
    from .tiny_flow import TINY_FLOW

    return tuple(TINY_FLOW)
