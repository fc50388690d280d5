"""compose --method subject-diffusion: subjects at given places, no per-subject training.

    multiconcept compose "a star <img> and a circle <img> on a gray background" --model sd/ \\
        -s star.png:star_mask.png -s circle.png:circle_mask.png \\
        --location 0.55,0.1,0.95,0.5 --location ref

Each subject is an image with a mask (IMG:MASK), a box in pixels (IMG:x0,y0,x1,y1) or the
whole image (IMG), and an optional place on the canvas, x0,y0,x1,y1 as fractions of its
width and height ('ref' or nothing: where it stood in its reference image). Its mask,
stretched into that box, makes the location map; the box goes into its object tokens.

Three-branch guidance (guidance.three_branch): ε_full reads the fusion prompt, the map
and the object tokens; ε_img the empty prompt with the map and tokens; ε_u the empty
prompt alone. Text-image interpolation (§3.5): after the first `interpolation` share of
the steps ε_full reads the plain caption (no subject clauses) instead, trading subject
fidelity for the prompt's say; 1 (the default) never switches.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..bundle import atomic_write
from ..data import load_image, load_mask
from ..errors import is_file, require
from ..methods.fastcomposer import subject_crop
from ..methods.subject_diffusion import (
    IMAGE_GUIDANCE,
    TEXT_GUIDANCE,
    FusionPrompt,
    SubjectDiffusion,
    box_of,
    fusion_prompt,
    location_map,
    parse_marked_prompt,
    place_mask,
    three_branch,
)
from .generate import SCHEDULERS, make_scheduler, png_metadata

BOX = re.compile(r"^\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*$")


@dataclass
class SubjectComposeSettings:
    steps: int = 50
    guidance: float = TEXT_GUIDANCE  # s_T (paper: 7.5)
    image_guidance: float = IMAGE_GUIDANCE  # s_I (paper: 1.5)
    interpolation: float = 1.0  # share of steps whose ε_full reads the subject clauses
    scheduler: str = "ddim"
    batch_size: int = 4
    height: int = 0  # 0 = the base's native size
    width: int = 0

    def check(self) -> None:
        require(self.steps >= 1, f"--steps must be at least 1, got {self.steps}")
        require(self.guidance >= 0 and self.image_guidance >= 0,
                f"--guidance {self.guidance} and --image-guidance {self.image_guidance} must be non-negative")
        require(0.0 <= self.interpolation <= 1.0, f"--interpolation {self.interpolation} must be in [0, 1]")
        require(self.scheduler in SCHEDULERS, f"unknown scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")


@dataclass
class Subject:
    image: Image.Image
    mask: np.ndarray  # bool, the image's size
    place: tuple[float, float, float, float]  # on the canvas, fractions


def parse_location(spec: str | None, image_size: tuple[int, int], mask: np.ndarray) -> tuple[float, ...]:
    """'x0,y0,x1,y1' (fractions of the canvas) or None / 'ref' (the subject's box in its reference image)."""
    if spec is None or spec.strip() in ("", "ref"):
        x0, y0, x1, y1 = box_of(mask)
        w, h = image_size
        return x0 / w, y0 / h, x1 / w, y1 / h
    m = BOX.match(spec)
    require(m is not None, f"--location {spec!r} is not x0,y0,x1,y1: give fractions of the canvas, e.g. 0.1,0.1,0.5,0.5, or ref")
    box = tuple(float(v) for v in m.groups())
    require(0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1,
            f"--location {spec!r} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions of the canvas)")
    return box


def read_subject(spec: str, location: str | None) -> Subject:
    """'IMG', 'IMG:MASK' or 'IMG:x0,y0,x1,y1' (a box in pixels); a whole path that exists wins."""
    img_path, tail = (spec, None) if is_file(spec) or ":" not in spec else spec.rsplit(":", 1)
    require(is_file(img_path), f"subject image {img_path} does not exist: pass --subject IMG, IMG:MASK or IMG:x0,y0,x1,y1")
    img = load_image(img_path, role="subject image")
    w, h = img.size
    if tail is None:
        mask = np.ones((h, w), dtype=bool)
    elif BOX.match(tail):
        x0, y0, x1, y1 = (int(round(float(v))) for v in BOX.match(tail).groups())
        require(0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, f"subject box {tail} is outside the {w}x{h} image {img_path}")
        mask = np.zeros((h, w), dtype=bool)
        mask[y0:y1, x0:x1] = True
    else:
        require(is_file(tail), f"subject mask {tail} (from {spec!r}) does not exist: pass IMG:MASK or IMG:x0,y0,x1,y1")
        mask = np.asarray(load_mask(tail, img.size)) > 127
        require(bool(mask.any()), f"subject mask {tail} is empty: paint the subject white on black")
    return Subject(img, mask, parse_location(location, img.size, mask))


@torch.no_grad()
def sample(model: SubjectDiffusion, prompt: FusionPrompt, subjects: list[Subject], seeds: list[int],
           settings: SubjectComposeSettings = SubjectComposeSettings(), crop_seed: int = 0, output_type: str = "pil"):
    """Images for one prompt, one per seed, with three-branch guidance."""
    from diffusers.utils.torch_utils import randn_tensor

    base, pipe, unet = model.base, model.base.pipe, model.unet
    dev, dtype, tok = base.device, unet.dtype, model.tokenizer
    h, w = settings.height or base.resolution, settings.width or base.resolution
    vsf = pipe.vae_scale_factor
    require(h % vsf == 0 and w % vsf == 0, f"height and width must be multiples of {vsf} for this base")
    b, n = len(seeds), len(subjects)
    rng = np.random.default_rng(crop_seed)
    crops = torch.stack([subject_crop(s.image, s.mask, None, model.encoder.image_size, rng) for s in subjects])
    pooled, patches = model.subject_features(crops)
    full = model.text_states([prompt], pooled)
    plain = model.text_states([fusion_prompt(tok, prompt.caption, [])], None)
    empty = model.text_states([fusion_prompt(tok, "", [])], None)
    boxes = torch.tensor([s.place for s in subjects], dtype=torch.float32)
    canvas = [place_mask(s.mask, s.place, (h, w)) for s in subjects]
    maps = location_map(canvas, (h, w))[None]
    latent_hw = (h // vsf, w // vsf)
    on = model.extra_channels(maps, 1, latent_hw)
    off = model.extra_channels(None, 1, latent_hw)
    channels = None if on is None else torch.cat([on.expand(2 * b, -1, -1, -1), off.expand(b, -1, -1, -1)])
    valid = torch.zeros(3 * b, n, dtype=torch.bool)
    valid[: 2 * b] = True
    gligen = model.gligen(patches[None].expand(3 * b, -1, -1, -1), boxes[None].expand(3 * b, -1, -1), valid)

    scheduler = make_scheduler(pipe, settings.scheduler)
    scheduler.set_timesteps(settings.steps, device=dev)
    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    latents = randn_tensor((b, unet.config.out_channels, *latent_hw), generator=gens, device=dev, dtype=dtype)
    latents = latents * scheduler.init_noise_sigma
    accepted = set(inspect.signature(scheduler.step).parameters)
    extra = {k: v for k, v in (("generator", gens), ("eta", 0.0)) if k in accepted}
    switch = round(settings.interpolation * len(scheduler.timesteps))
    for i, t in enumerate(scheduler.timesteps):
        cond = full if i < switch else plain
        text = torch.cat([cond.expand(b, -1, -1), empty.expand(2 * b, -1, -1)])
        x = scheduler.scale_model_input(torch.cat([latents] * 3), t)
        eps_full, eps_img, eps_u = model.predict(x, t, text, channels, gligen).chunk(3)
        eps = three_branch(eps_full, eps_img, eps_u, settings.guidance, settings.image_guidance)
        latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
    vae = base.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    image = vae.decode(latents / vae.config.scaling_factor + shift, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * b)


def _compose(prompt, subjects, model, n, seed, settings, locations, base, device, dtype):
    """Yield the loaded model, then (seed, image) for seeds seed .. seed+n-1."""
    settings.check()
    require(n >= 1, f"-n must be at least 1, got {n}")
    require(bool(subjects), "no subject given: add --subject IMG[:MASK], one per image marker in the prompt")
    locations = list(locations or [])
    require(len(locations) <= len(subjects), f"{len(locations)} --location(s) for {len(subjects)} subject(s): "
                                             "give at most one per subject, in subject order ('ref' keeps one's own)")
    locations += [None] * (len(subjects) - len(locations))
    pictures = [read_subject(s, loc) for s, loc in zip(subjects, locations)]  # bad files: fail before loading models
    if not isinstance(model, SubjectDiffusion):
        model = SubjectDiffusion.load(model, base=base, device=device, dtype=dtype)
    parsed = parse_marked_prompt(model.tokenizer, prompt, len(subjects))
    yield model
    for start in range(0, n, settings.batch_size):
        seeds = [seed + i for i in range(start, min(n, start + settings.batch_size))]
        yield from zip(seeds, sample(model, parsed, pictures, seeds, settings, crop_seed=seed))


def compose_images(prompt: str, subjects: list[str], model, n: int = 1, seed: int = 0,
                   settings: SubjectComposeSettings = SubjectComposeSettings(), locations=None, base=None,
                   device: str = "auto", dtype: str = "fp32") -> list[Image.Image]:
    run = _compose(prompt, subjects, model, n, seed, settings, locations, base, device, dtype)
    next(run)
    return [img for _, img in run]


def compose(prompt: str, subjects: list[str], model, n: int = 1, seed: int = 0, out_dir: str | Path = "out",
            settings: SubjectComposeSettings = SubjectComposeSettings(), locations=None, base=None,
            device: str = "auto", dtype: str = "fp32") -> list[Path]:
    """Write n PNGs (seeds seed … seed+n−1) with their settings in the metadata."""
    model_name = Path(model).name if not isinstance(model, SubjectDiffusion) else "subject-diffusion"
    run = _compose(prompt, subjects, model, n, seed, settings, locations, base, device, dtype)
    model = next(run)
    base = model.base
    meta_common = {
        "prompt": prompt, "negative_prompt": "", "scheduler": settings.scheduler, "steps": settings.steps,
        "guidance": settings.guidance, "image_guidance": settings.image_guidance,
        "interpolation": settings.interpolation, "locations": list(locations or []),
        "height": settings.height or base.resolution, "width": settings.width or base.resolution,
        "base": base.name, "base_fingerprint": base.fingerprint, "model": model_name, "method": "subject-diffusion",
        "subjects": subjects, "bundles": [], "tokens": [], "class_words": [],
    }
    paths = []
    for s, img in run:
        path = Path(out_dir) / f"{s:06d}.png"
        meta = {**meta_common, "seed": s}
        atomic_write(path, lambda tmp, img=img, meta=meta: img.save(tmp, format="PNG", pnginfo=png_metadata(meta)))
        paths.append(path)
    return paths
