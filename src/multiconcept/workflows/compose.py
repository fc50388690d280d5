"""compose: a prompt with image markers + subject images → PNGs, no per-subject training.

    multiconcept compose "a star <img> and a circle <img> on a gray background" \\
        --subject star.png:star_mask.png --subject circle.png --model fc/ -n 4

Delayed subject conditioning (FastComposer §3.4): for the first (1 − α) of
the denoising steps the conditional branch sees the text-only embedding, so
the layout forms from the text; afterwards the subject-augmented embedding,
so identities fill it in. α = 0.7 (the paper's default) → the first 30 % are
text-only; α = 1 conditions on the subjects from the start, α = 0 never.
The loop is the one diffusers' StableDiffusionPipeline runs (same latents
from the same generators, `scale_model_input`, `step` with the generator and
eta), so any diffusers scheduler works; with α = 0 it reproduces the plain
pipeline's images exactly.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..bundle import atomic_write
from ..data import load_image, load_mask
from ..errors import is_file, require
from ..methods.fastcomposer import FastComposer, SubjectPrompt, parse_subject_prompt, subject_crop
from ..models import TOYWORLD_DIR
from .generate import SCHEDULERS, make_scheduler, png_metadata


@dataclass
class ComposeSettings:
    steps: int = 50  # paper: 50
    guidance: float = 5.0  # paper: 5
    alpha: float = 0.7  # paper: 0.7 → first 30 % of steps text-only
    scheduler: str = "ddim"
    batch_size: int = 4
    height: int = 0  # 0 = the base's native size
    width: int = 0

    def check(self) -> None:
        require(0.0 <= self.alpha <= 1.0, f"--alpha {self.alpha} must be in [0, 1] (share of steps conditioned on the subjects)")
        require(self.steps >= 1, f"--steps must be at least 1, got {self.steps}")
        require(self.guidance >= 0, f"--guidance must be non-negative, got {self.guidance}")
        require(self.scheduler in SCHEDULERS, f"unknown scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")


def text_only_calls(num_timesteps: int, alpha: float) -> int:
    """How many of the first denoising iterations use the text-only embedding."""
    return round((1.0 - alpha) * num_timesteps)


@torch.no_grad()
def sample(model: FastComposer, prompt: SubjectPrompt, crops: torch.Tensor, seeds: list[int],
           settings: ComposeSettings = ComposeSettings(), output_type: str = "pil"):
    """Images for one prompt, one per seed, with delayed subject conditioning."""
    from diffusers.utils.torch_utils import randn_tensor

    base, pipe, unet = model.base, model.base.pipe, model.base.unet
    dev, dtype = base.device, unet.dtype
    text_only, augmented = model.condition([prompt], [crops])
    empty = parse_subject_prompt(model.tokenizer, "")
    uncond = model.encode_text(empty.padded_ids(model.tokenizer)[None])
    b = len(seeds)
    text_only, augmented, uncond = (x.to(dtype).expand(b, -1, -1) for x in (text_only, augmented, uncond))
    h, w = settings.height or base.resolution, settings.width or base.resolution
    vsf = pipe.vae_scale_factor
    require(h % vsf == 0 and w % vsf == 0, f"height and width must be multiples of {vsf} for this base")

    scheduler = make_scheduler(pipe, settings.scheduler)
    scheduler.set_timesteps(settings.steps, device=dev)
    timesteps = scheduler.timesteps
    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    latents = randn_tensor((b, unet.config.in_channels, h // vsf, w // vsf), generator=gens, device=dev, dtype=dtype)
    latents = latents * scheduler.init_noise_sigma
    accepted = set(inspect.signature(scheduler.step).parameters)
    extra = {k: v for k, v in (("generator", gens), ("eta", 0.0)) if k in accepted}
    cfg_on = settings.guidance > 1.0 and unet.config.time_cond_proj_dim is None  # as StableDiffusionPipeline
    switch = text_only_calls(len(timesteps), settings.alpha)
    for i, t in enumerate(timesteps):
        cond = text_only if i < switch else augmented
        x = torch.cat([latents] * 2) if cfg_on else latents
        x = scheduler.scale_model_input(x, t)
        emb = torch.cat([uncond, cond]) if cfg_on else cond
        eps = unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]
        if cfg_on:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + settings.guidance * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
    vae = base.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    image = vae.decode(latents / vae.config.scaling_factor + shift, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * b)


def parse_subject_spec(spec: str) -> tuple[Path, Path | None]:
    """'IMG' or 'IMG:MASK' (a path that exists as a whole wins over a split)."""
    if is_file(spec) or ":" not in spec:
        require(is_file(spec), f"subject image {spec} does not exist: pass --subject IMG or IMG:MASK")
        return Path(spec), None
    img, mask = spec.rsplit(":", 1)
    require(is_file(img), f"subject image {img} (from {spec!r}) does not exist: pass --subject IMG or IMG:MASK")
    require(is_file(mask), f"subject mask {mask} (from {spec!r}) does not exist: pass --subject IMG or IMG:MASK")
    return Path(img), Path(mask)


def read_subjects(specs: list[str]) -> list[tuple[Image.Image, np.ndarray | None]]:
    """Each subject's image and mask (white = subject), read and checked."""
    subjects = []
    for spec in specs:
        img_path, mask_path = parse_subject_spec(spec)
        img = load_image(img_path, role="subject image")
        subjects.append((img, np.asarray(load_mask(mask_path, img.size)) > 127 if mask_path else None))
    return subjects


def subject_crops(subjects: list[tuple[Image.Image, np.ndarray | None]], size: int, seed: int) -> torch.Tensor:
    """The noise-background crops of each subject (noise seeded by `seed`)."""
    rng = np.random.default_rng(seed)
    return torch.stack([subject_crop(img, mask, None, size, rng) for img, mask in subjects])


def _compose(prompt: str, subjects: list[str], model, n: int, seed: int, settings: ComposeSettings, base, device, dtype):
    """Yield (seed, image) for seeds seed .. seed+n-1, and first the loaded model.

    All n images share the subjects' crops (their noise is seeded by `seed`)."""
    settings.check()
    require(n >= 1, f"-n must be at least 1, got {n}")
    require(bool(subjects), "no subject given: add --subject IMG[:MASK], one per image marker in the prompt")
    pictures = read_subjects(subjects)  # bad files: fail before loading models
    if not isinstance(model, FastComposer):
        model = FastComposer.load(model, base=base, device=device, dtype=dtype)
    parsed = parse_subject_prompt(model.tokenizer, prompt, len(subjects))
    crops = subject_crops(pictures, model.encoder.image_size, seed)
    yield model
    for start in range(0, n, settings.batch_size):
        seeds = [seed + i for i in range(start, min(n, start + settings.batch_size))]
        yield from zip(seeds, sample(model, parsed, crops, seeds, settings))


def compose_images(prompt: str, subjects: list[str], model: FastComposer | str | Path, n: int = 1, seed: int = 0,
                   settings: ComposeSettings = ComposeSettings(), base=None, device: str = "auto",
                   dtype: str = "fp32") -> list[Image.Image]:
    """n images of `prompt` with the subjects, in memory."""
    run = _compose(prompt, subjects, model, n, seed, settings, base, device, dtype)
    next(run)
    return [img for _, img in run]


def compose(
    prompt: str,
    subjects: list[str],
    model: FastComposer | str | Path,
    n: int = 1,
    seed: int = 0,
    out_dir: str | Path = "out",
    settings: ComposeSettings = ComposeSettings(),
    base=None,
    device: str = "auto",
    dtype: str = "fp32",
) -> list[Path]:
    """Write n PNGs (seeds seed … seed+n−1) with their settings in the metadata."""
    model_name = Path(model).name if not isinstance(model, FastComposer) else "fastcomposer"
    run = _compose(prompt, subjects, model, n, seed, settings, base, device, dtype)
    model = next(run)
    base = model.base
    out_dir = Path(out_dir)
    meta_common = {
        "prompt": prompt, "negative_prompt": "", "scheduler": settings.scheduler, "steps": settings.steps,
        "guidance": settings.guidance, "alpha": settings.alpha,
        "height": settings.height or base.resolution, "width": settings.width or base.resolution,
        "base": base.name, "base_fingerprint": base.fingerprint, "model": model_name, "method": "fastcomposer",
        "subjects": subjects, "bundles": [], "tokens": [], "class_words": [],
    }
    paths = []
    for s, img in run:
        path = out_dir / f"{s:06d}.png"
        meta = {**meta_common, "seed": s}
        atomic_write(path, lambda tmp, img=img, meta=meta: img.save(tmp, format="PNG", pnginfo=png_metadata(meta)))
        paths.append(path)
    return paths


COMPOSE_METHODS = ("fastcomposer", "subject-diffusion")
# ToyWorld's tuning-free models ship with the package (fp16, trained parts only; `make toyworld-models` makes them)
SHIPPED = {m: TOYWORLD_DIR / m for m in COMPOSE_METHODS}


def shipped_model(method: str | None = None) -> Path:
    """ToyWorld's shipped model folder of `method` (default FastComposer), what compose uses without a model."""
    method = method or "fastcomposer"
    require(method in COMPOSE_METHODS, f"unknown compose method {method!r}: choose one of {', '.join(COMPOSE_METHODS)}")
    require(SHIPPED[method].is_dir(), f"ToyWorld's {method} model is not in this install ({SHIPPED[method]}): "
                                      f"pass --model FOLDER, or make it with `make toyworld-models`")
    return SHIPPED[method]


def model_method(model) -> str:
    """Which tuning-free method a model (folder) is."""
    from ..methods.subject_diffusion import CONFIG_FILE as SD_CONFIG
    from ..methods.subject_diffusion import SubjectDiffusion

    if isinstance(model, SubjectDiffusion) or (not isinstance(model, FastComposer) and (Path(model) / SD_CONFIG).is_file()):
        return "subject-diffusion"
    return "fastcomposer"


def compose_any(prompt: str, subjects: list[str], model, *, method: str | None = None, locations=(), alpha: float = 0.7,
                guidance: float | None = None, image_guidance: float = 1.5, interpolation: float = 1.0,
                steps: int = 50, scheduler: str = "ddim", n: int = 1, seed: int = 0, out_dir="out", base=None,
                device: str = "auto", dtype: str = "fp32") -> list[Path]:
    """The command line's compose: the method the model folder holds (or `method`, checked against it); no model:
    ToyWorld's shipped one of `method`."""
    from . import compose_subject_diffusion as sd

    model = shipped_model(method) if model is None else model
    found = model_method(model)
    require(method is None or method in COMPOSE_METHODS,
            f"unknown compose method {method!r}: choose one of {', '.join(COMPOSE_METHODS)}")
    require(method is None or method == found, f"--model {model} holds a {found} model, not {method}: "
                                               f"pass --method {found} or another model folder")
    if found == "subject-diffusion":
        settings = sd.SubjectComposeSettings(steps=steps, guidance=sd.TEXT_GUIDANCE if guidance is None else guidance,
                                             image_guidance=image_guidance, interpolation=interpolation,
                                             scheduler=scheduler)
        return sd.compose(prompt, subjects, model, n=n, seed=seed, out_dir=out_dir, settings=settings,
                          locations=list(locations), base=base, device=device, dtype=dtype)
    require(not locations, "--location is Subject-Diffusion's: a FastComposer model places subjects from the prompt")
    settings = ComposeSettings(steps=steps, guidance=5.0 if guidance is None else guidance, alpha=alpha, scheduler=scheduler)
    return compose(prompt, subjects, model, n=n, seed=seed, out_dir=out_dir, settings=settings, base=base, device=device,
                   dtype=dtype)
