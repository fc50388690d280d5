"""generate: a prompt + bundles → PNGs with their settings in the metadata."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL.PngImagePlugin import PngInfo

from ..bundle import Bundle, atomic_write, check_base, load_bundle, read_header
from ..errors import UserError, require
from ..models import Base, SingleFile, load_base
from ..models.compiled import COMPILE_MODES, compile_denoiser
from ..models.conditioning import pipeline_conditioning
from ..prompts import Concept, concept_tokens_in, locate_concepts

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "ddpm": "DDPMScheduler",
}
# what a flow-matching transformer base samples with (its pipeline's own); the UNet samplers above do not apply there
FLOW_SCHEDULERS = {"flow-euler": "FlowMatchEulerDiscreteScheduler"}
ALL_SCHEDULERS = {**SCHEDULERS, **FLOW_SCHEDULERS}


@dataclass
class SampleSettings:
    steps: int = 50  # DisenDiff / Infusion protocols: DDIM 50 steps
    guidance: float = 6.0  # DisenDiff: CFG 6 (FLUX.1 [dev]: the distilled guidance input)
    scheduler: str = "auto"  # ddim on a UNet base (the protocols'), flow-euler on a transformer base
    negative_prompt: str = ""
    batch_size: int = 4
    height: int = 0  # 0 = the base's native size
    width: int = 0
    vae_slicing: bool = False  # decode one image at a time: the batch's decoder activations never coexist
    vae_tiling: bool = False  # decode in overlapping tiles (diffusers' AutoencoderKL), for large images
    compile: str = "off"  # on: torch.compile the whole denoiser while sampling (models/compiled.py)

    def __post_init__(self):
        require(isinstance(self.steps, int) and self.steps >= 1, f"steps must be at least 1, got {self.steps}")
        require(math.isfinite(self.guidance) and self.guidance >= 0,
                f"guidance must be a finite number >= 0, got {self.guidance}")
        require(self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}")
        require(self.height >= 0 and self.width >= 0, f"height and width must be >= 0 (0: the base's), "
                                                      f"got {self.height}x{self.width}")
        require(self.compile in COMPILE_MODES, f"compile must be on or off, got {self.compile!r}: fix --compile")
        require(self.scheduler in ALL_SCHEDULERS or self.scheduler == "auto",
                f"unknown scheduler {self.scheduler!r}: choose auto or one of {', '.join(ALL_SCHEDULERS)}")

    def scheduler_for(self, base: Base) -> str:
        """The scheduler's name on `base`: auto is ddim on a UNet, flow-euler on a transformer; a UNet scheduler
        on a transformer (or the reverse) is refused, as their noise schedules differ."""
        if self.scheduler == "auto":
            return "flow-euler" if base.flow is not None else "ddim"
        flow = self.scheduler in FLOW_SCHEDULERS
        require(flow == (base.flow is not None),
                f"scheduler {self.scheduler} is for {'flow-matching transformer' if flow else 'UNet'} bases, and "
                f"{base.name!r} is {'a UNet' if base.flow is None else 'a flow-matching transformer'}: pass "
                f"--scheduler auto (or {'ddim' if base.flow is None else 'flow-euler'})")
        return self.scheduler


@dataclass
class Loaded:
    base: Base
    bundles: list[tuple[str, Bundle]] = field(default_factory=list)
    extra_loras: list[str] = field(default_factory=list)
    extra_tokens: list[str] = field(default_factory=list)  # tokens of --embedding files
    extra_embeddings: list[str] = field(default_factory=list)

    @property
    def concepts(self) -> list[Concept]:
        return [Concept(t, c) for _, b in self.bundles for t, c in zip(b.tokens, b.class_words)]


def load_with_bundles(base: Base | str | SingleFile | None, bundle_paths: list[str], device="auto", dtype="fp32") -> Loaded:
    from ..methods import get_method

    if not isinstance(base, Base):
        base = load_base(base, device=device, dtype=dtype)
    loaded = Loaded(base)
    owners: dict[str, str] = {}
    for p in bundle_paths:
        b = load_bundle(p)
        check_base(b, base, str(p))
        for t in b.tokens:
            require(t not in owners, f"{t} is defined by both {owners.get(t)} and {p}: load one of them, "
                                     f"or re-learn one under another token (or, for Infusion, another class word)")
            owners[t] = str(p)
        get_method(b.method).apply(base, b)
        loaded.bundles.append((str(p), b))
    return loaded


def image_name(seed: int, prefix: str = "") -> str:
    return f"{prefix}{seed:06d}.png"


def planned_paths(out_dir: str | Path, n: int, seed: int, prefix: str = "") -> list[Path]:
    """The files `generate` will write, so a caller can refuse to overwrite them first."""
    return [Path(out_dir) / image_name(seed + i, prefix) for i in range(n)]


def check_prompt_tokens(prompt: str, bundle_paths: list[str], embeddings: list[str] = ()) -> None:
    """Refuse a concept token no bundle or embedding file defines (the text encoder would read it as
    a few ordinary word pieces and draw something, silently), and a token two of them define. Reads
    headers only, so this runs before any model loads."""
    from .external import check_embedding_tokens, embedding_token

    check_embedding_tokens(bundle_paths, list(embeddings))
    refuse_undefined_tokens(prompt, [t for p in bundle_paths for t in read_header(p)["tokens"]]
                            + [embedding_token(e)[0] for e in embeddings])


def refuse_undefined_tokens(prompt: str, defined: list[str]) -> None:
    missing = [t for t in concept_tokens_in(prompt) if t not in defined]
    if missing:
        have = f"the bundles and embeddings define {', '.join(defined)}" if defined else "no bundle is loaded (-b FILE)"
        raise UserError(f"the prompt names {', '.join(missing)}, which no loaded bundle defines; {have}: "
                        f"load the bundle (-b) or embedding (--embedding) that defines it, or fix the prompt")


def make_scheduler(pipe, name: str):
    """A fresh scheduler of kind `name` from the base's config (schedulers keep state)."""
    import diffusers

    require(name in ALL_SCHEDULERS, f"unknown scheduler {name!r}: choose one of {', '.join(ALL_SCHEDULERS)}")
    return getattr(diffusers, ALL_SCHEDULERS[name]).from_config(pipe.scheduler.config)


def set_scheduler(pipe, name: str) -> None:
    if type(pipe.scheduler).__name__ != ALL_SCHEDULERS.get(name):
        pipe.scheduler = make_scheduler(pipe, name)


def png_metadata(meta: dict) -> PngInfo:
    info = PngInfo()
    info.add_text("multiconcept", json.dumps(meta, sort_keys=True))
    # the line A1111-style readers show
    info.add_text("parameters", f"{meta['prompt']}\nSteps: {meta['steps']}, Sampler: {meta['scheduler']}, "
                                f"CFG scale: {meta['guidance']}, Seed: {meta['seed']}")
    return info


def read_png_metadata(path: str | Path) -> dict:
    from PIL import Image

    with Image.open(path) as im:
        raw = im.info.get("multiconcept") or (im.text.get("multiconcept") if hasattr(im, "text") else None)
    require(raw is not None, f"{path} has no multiconcept metadata: it was not written by `multiconcept generate`")
    return json.loads(raw)


@dataclass
class Inpaint:
    """Where to draw: a source image and a mask (white = repaint)."""

    image: "Image.Image"  # noqa: F821
    mask: "Image.Image"  # noqa: F821


def draw(prompt: str, loaded: Loaded, n: int, seed: int, settings: SampleSettings = SampleSettings(),
         inpaint: Inpaint | None = None, attention_maps: bool = False):
    """Yield (seed, image, attention store or None, index in the store) for images seed .. seed+n-1,
    sampled in batches of `settings.batch_size`, after checking the prompt against the loaded concepts."""
    base, pipe = loaded.base, loaded.base.pipe
    require(n >= 1, f"-n must be at least 1, got {n}")
    locate_concepts(base.sequence_tokenizer, prompt, loaded.concepts)  # length limit, class words present
    refuse_undefined_tokens(prompt, [c.token for c in loaded.concepts] + loaded.extra_tokens)
    require(inpaint is None or base.flow is None, f"inpainting on a {base.architecture} transformer base is not supported: "
                                                  "leave out --init-image / --inpaint-mask")
    set_scheduler(pipe, settings.scheduler_for(base))
    h, w = settings.height or base.resolution, settings.width or base.resolution
    uncompile = compile_denoiser(base.denoiser, settings.compile, scope="model")
    try:
        for start in range(0, n, settings.batch_size):
            seeds = [seed + i for i in range(start, min(n, start + settings.batch_size))]
            gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
            store = None
            if attention_maps:
                with maps_captured(base, settings) as store:
                    images = _sample(base, prompt, seeds, gens, settings, h, w, inpaint)
            else:
                images = _sample(base, prompt, seeds, gens, settings, h, w, inpaint)
            for i, (s, img) in enumerate(zip(seeds, images)):
                yield s, img, store, i
    finally:
        uncompile()


@contextmanager
def maps_captured(base: Base, settings: SampleSettings):
    """An AttentionStore filled while sampling: the conditional branch's cross-attention (UNet), or image→text joint
    attention (transformer; the pipelines run guidance as a second call, or, SD3, as the first half of the batch)."""
    from ..attention import AttentionStore, capture_attention
    from ..joint_attention import capture_joint_attention

    batched = base.flow is None or base.flow.batched_guidance
    store = AttentionStore(resolutions=None, accumulate=True,
                           batch_slice="cond" if batched and settings.guidance > 1 else None)
    if base.flow is None:
        with capture_attention(base.unet, store):
            yield store
    else:
        with capture_joint_attention(base.denoiser, store, base.flow, skip_uncond=True):
            yield store


def generate(
    prompt: str,
    loaded: Loaded,
    n: int,
    seed: int,
    out_dir: str | Path,
    settings: SampleSettings = SampleSettings(),
    attention_maps: bool = False,
    name_prefix: str = "",
    inpaint: Inpaint | None = None,
) -> list[Path]:
    """`draw`, each image written as a PNG with its settings in the metadata (and its attention maps)."""
    base, out_dir = loaded.base, Path(out_dir)
    meta_common = {
        "prompt": prompt, "negative_prompt": settings.negative_prompt, "scheduler": settings.scheduler_for(base),
        "steps": settings.steps, "guidance": settings.guidance, "height": settings.height or base.resolution,
        "width": settings.width or base.resolution, "base": base.name, "base_fingerprint": base.fingerprint,
        "bundles": [Path(p).name for p, _ in loaded.bundles],
        "tokens": [c.token for c in loaded.concepts], "class_words": [c.class_word for c in loaded.concepts],
        "loras": list(loaded.extra_loras), "embeddings": list(loaded.extra_embeddings), "inpaint": inpaint is not None,
    }
    paths: list[Path] = []
    for s, img, store, i in draw(prompt, loaded, n, seed, settings, inpaint, attention_maps):
        path = out_dir / image_name(s, name_prefix)
        meta = {**meta_common, "seed": s}
        atomic_write(path, lambda tmp, img=img, meta=meta: img.save(tmp, format="PNG", pnginfo=png_metadata(meta)))
        paths.append(path)
        if store is not None:
            write_heatmaps(store, i, base, prompt, img, out_dir / "attention", f"{name_prefix}{s:06d}_")
    return paths


def _sample(base: Base, prompt, seeds, gens, s: SampleSettings, h, w, inpaint: Inpaint | None = None):
    pipe = base.pipe
    for on, enable, disable in ((s.vae_slicing, pipe.vae.enable_slicing, pipe.vae.disable_slicing),
                                (s.vae_tiling, pipe.vae.enable_tiling, pipe.vae.disable_tiling)):
        (enable if on else disable)()
    kwargs = dict(num_inference_steps=s.steps, guidance_scale=s.guidance, generator=gens, height=h, width=w)
    if base.flow is not None:  # the pipeline encodes the prompt itself: trained tokens and Infusion see it there
        with torch.no_grad():
            kwargs.update(base.flow.pipeline_kwargs(pipe, s.guidance, s.negative_prompt, base.sequence_length, len(seeds)))
            return pipe(prompt=[prompt] * len(seeds), **kwargs).images
    with torch.no_grad():
        kwargs.update(pipeline_conditioning(base, [prompt] * len(seeds), s.negative_prompt, h, w))
        if inpaint is None:
            return pipe(**kwargs).images
        if pipe.unet.config.in_channels == 9:  # a real inpainting checkpoint: its own pipeline
            require(not base.is_sdxl, "inpainting with an SDXL inpainting UNet is not supported yet: "
                                      "use the SDXL base model, which inpaints by latent blending")
            from diffusers import StableDiffusionInpaintPipeline

            ip = StableDiffusionInpaintPipeline(**pipe.components)
            return ip(image=inpaint.image, mask_image=inpaint.mask, **kwargs).images
        blend = LatentBlend(pipe, inpaint, h, w, len(seeds), gens)
        return pipe(callback_on_step_end=blend, callback_on_step_end_tensor_inputs=["latents"], **kwargs).images


class LatentBlend:
    """Masked-latent blending for bases without an inpainting UNet (ToyWorld, plain SD).

    After every denoising step, latents outside the mask are replaced by the
    source image's latents noised to the step's next timestep (Blended Latent
    Diffusion, Avrahami et al. 2023); after the last step, by the clean source
    latents. Inside the mask the model draws freely. The edge is as sharp as
    the latent grid (8 px on SD, 4 px on ToyWorld).
    """

    def __init__(self, pipe, inpaint: Inpaint, h: int, w: int, n: int, gens):
        from ..data import to_tensor

        require(inpaint.image.size == inpaint.mask.size,
                f"inpainting mask is {inpaint.mask.size} but its image is {inpaint.image.size}: make them the same size")
        vae = pipe.vae
        px = torch.nn.functional.interpolate(to_tensor(inpaint.image, max(inpaint.image.size))[None], size=(h, w),
                                             mode="bilinear", align_corners=False)
        z = vae.encode(px.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        self.z_src = z.expand(n, -1, -1, -1)
        m = torch.from_numpy(np.asarray(inpaint.mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
        self.mask = torch.nn.functional.interpolate(m, size=z.shape[-2:], mode="area").to(z.device, z.dtype)
        require(bool((self.mask > 0.5).any()), "the inpainting mask is empty: paint the region to fill white")
        self.noise = torch.stack([torch.randn(z.shape[1:], generator=g) for g in gens]).to(z.device, z.dtype)

    def __call__(self, pipe, i, t, kw):
        timesteps = pipe.scheduler.timesteps
        if i + 1 < len(timesteps):
            known = pipe.scheduler.add_noise(self.z_src, self.noise, timesteps[i + 1 : i + 2].repeat(self.z_src.shape[0]))
        else:
            known = self.z_src
        kw["latents"] = self.mask * kw["latents"] + (1 - self.mask) * known.to(kw["latents"].dtype)
        return kw


def prompt_token_labels(tokenizer, prompt: str) -> list[tuple[int, str]]:
    """(position, word piece) for the prompt's real tokens (no BOS/EOS/padding)."""
    ids = tokenizer(prompt).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return [(i, p.replace("</w>", "")) for i, p in enumerate(pieces) if 0 < i < len(ids) - 1]


def write_heatmaps(store, index: int, base: Base, prompt: str, image, folder: Path, prefix: str) -> list[Path]:
    from ..heatmaps import save_heatmaps

    res = sorted(store.captured_resolutions)
    # the level one step coarser than the finest: SD 1.5's 32/16 maps carry the layout
    maps = torch.stack([torch.nn.functional.interpolate(store.maps(r)[index : index + 1].float(), size=(res[-1], res[-1]),
                                                       mode="bilinear", align_corners=False)[0] for r in res]).mean(0)
    labels = (prompt_token_labels(base.tokenizer, prompt) if base.flow is None
              else base.sequence_tokenizer.pieces(prompt))
    if not labels:
        raise UserError("the prompt has no tokens to draw attention maps for: give a non-empty prompt")
    idx = [i for i, _ in labels]
    return save_heatmaps(maps[idx], [l for _, l in labels], folder, image=image, prefix=prefix)
