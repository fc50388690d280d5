"""Training data: images, masks, the prompts that caption them, augmentation.

A `ConceptSet` holds the concepts and the examples that show them. One
example is one image plus which concepts it holds and (optionally) a mask per
concept: the DisenDiff / Break-A-Scene setting is one example holding two
concepts; the Custom Diffusion setting is a few examples per concept.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import is_dir, is_file, require
from .images import SUFFIXES, as_image, limits, read_image, read_mask
from .prompts import Concept

IMAGE_SUFFIXES = SUFFIXES


def load_image(path: str | Path, *, role: str = "image", min_side: int = 1) -> Image.Image:
    return read_image(path, role=role, min_side=min_side)


def load_mask(path: str | Path, size: tuple[int, int]) -> Image.Image:
    """A binary mask (white = the concept) that must match its image's size."""
    return read_mask(path, size)


def is_mask_name(p: Path) -> bool:
    """Masks beside their images: 'x_mask.png' or 'x.mask.png'."""
    return p.stem.endswith("_mask") or p.stem.endswith(".mask")


def list_images(path: str | Path, role: str = "image") -> list[Path]:
    """An image, or a folder's images (masks beside them left out)."""
    path = Path(path)
    # checked here, where a spec first becomes a path, so a name the OS refuses (too long) is "missing" too
    require(is_dir(path) or is_file(path), f"{role} {path} does not exist: check the path")
    if is_dir(path):
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not is_mask_name(p))
        require(bool(files), f"{role} folder {path} holds no images (png, jpg, webp, bmp): add some or pass files")
        return files
    return [path]


@dataclass
class Example:
    image: Image.Image
    tokens: list[str]  # concepts present in this image, in prompt order
    masks: dict[str, Image.Image] = field(default_factory=dict)
    source: str = ""


@dataclass
class ConceptSet:
    concepts: list[Concept]
    examples: list[Example]

    def concept(self, token: str) -> Concept:
        return next(c for c in self.concepts if c.token == token)

    @property
    def tokens(self) -> list[str]:
        return [c.token for c in self.concepts]


@dataclass(frozen=True)
class Source:
    """One training image (a path or a PIL image), the concepts it shows (default:
    every concept learned) and, optionally, a mask per concept (white = the concept)."""

    image: str | Path | Image.Image
    masks: Mapping[str, str | Path | Image.Image] = field(default_factory=dict)
    concepts: tuple[str, ...] | None = None


def concept_set(concepts: Sequence[Concept], sources: Sequence[Source]) -> ConceptSet:
    """Typed concepts and sources -> the training set, every image and mask read and checked."""
    require(bool(concepts), "no concept given: add --concept '<cat1>=cat'")
    require(bool(sources), "no image given: add --image PATH (an image or a folder)")
    tokens = [c.token for c in concepts]
    require(len(set(tokens)) == len(tokens), f"a concept token is given twice in {tokens}: use distinct tokens")
    examples = []
    for src in sources:
        shows = list(src.concepts) if src.concepts is not None else tokens
        for t in [*shows, *src.masks]:
            require(t in tokens, f"{t} is not a concept being learned ({', '.join(tokens)}): add --concept '{t}=CLASS'")
        image = as_image(src.image, role="source image", min_side=limits.min_side)
        name = "an in-memory image" if isinstance(src.image, Image.Image) else str(src.image)
        pixels = np.asarray(image)
        require(not (pixels == pixels[0, 0]).all(),
                f"source image {name} is one flat colour throughout (a fully transparent PNG reads as all white): "
                "there is nothing to learn in it; give an image that shows the concept")
        masks = {t: read_mask(m, image.size) for t, m in src.masks.items()}
        examples.append(Example(image, shows, masks, source=name))
    return ConceptSet(list(concepts), examples)


def build_concept_set(concepts: list[Concept], images: list[str], masks: list[str] = ()) -> ConceptSet:
    """From the command line's specs.

    images: 'PATH' (an image or folder that holds every concept) or
            'TOKEN=PATH' (images of one concept);
    masks:  'TOKEN=PATH', in the same order as that token's images.
    """
    require(bool(images), "no image given: add --image PATH (an image or a folder)")
    tokens = [c.token for c in concepts]
    files: list[tuple[Path, list[str]]] = []
    for spec in images:
        token, path = _split_token(spec, tokens)
        files += [(f, tokens if token is None else [token]) for f in list_images(path)]
    mask_specs: dict[str, list[str]] = {}
    for spec in masks:
        token, path = _split_token(spec, tokens)
        require(token is not None, f"mask {spec!r} must say its concept: TOKEN=PATH, e.g. '<cat1>=cat_mask.png'")
        mask_specs.setdefault(token, []).append(path)
    given: list[dict[str, str]] = [{} for _ in files]
    for token, paths in mask_specs.items():
        holders = [i for i, (_, shows) in enumerate(files) if token in shows]
        require(
            len(paths) == len(holders),
            f"{token} has {len(paths)} mask(s) for {len(holders)} image(s): give one mask per image, in order",
        )
        for i, p in zip(holders, paths):
            given[i][token] = p
    return concept_set(concepts, [Source(f, m, tuple(shows)) for (f, shows), m in zip(files, given)])


def split_token_path(spec: str) -> tuple[str | None, str]:
    """'TOKEN=PATH' -> (token, path); a plain 'PATH' -> (None, path)."""
    token, path = spec.split("=", 1) if spec.startswith("<") and ">=" in spec else (None, spec)
    # Path("") is ".": an empty path would quietly read the current folder
    require(path.strip() != "", f"{spec!r} gives no path: pass an image or a folder, e.g. '<cat1>=photos/cat/'")
    return token, path


def _split_token(spec: str, tokens: list[str]) -> tuple[str | None, str]:
    token, path = split_token_path(spec)
    require(token is None or token in tokens, f"{spec!r} names {token}, which is not a --concept: add --concept '{token}=CLASS'")
    return token, path


# ---------------------------------------------------------------- prompts

def caption(concepts: list[Concept], template: str = "photo of a {}") -> str:
    """'photo of a <new1> cat and <new2> dog' (DisenDiff / Custom Diffusion style)."""
    return template.format(" and ".join(c.phrase for c in concepts))


def class_caption(concepts: list[Concept], template: str = "photo of a {}") -> str:
    return template.format(" and ".join(c.class_word for c in concepts))


# ---------------------------------------------------------------- tensors

def to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Centre-crop square, resize, scale to [-1, 1], CHW."""
    img = center_square(img).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def mask_tensor(mask: Image.Image, size: int) -> torch.Tensor:
    m = center_square(mask).resize((size, size), Image.BILINEAR)
    return torch.from_numpy((np.asarray(m, dtype=np.float32) / 255.0))[None]


def center_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def scale_augment(image: torch.Tensor, mask: torch.Tensor,
                  rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Custom Diffusion's scale augmentation on a [-1,1] CHW image.

    With p≈0.66 the image is shrunk to a random size in [size/3, size] and
    pasted on a black canvas ("a far away"/"very small"; the loss is masked to
    the pasted region); otherwise enlarged to 1.2–1.4× and randomly cropped
    ("zoomed in"/"close up"). Returns (image, concept mask, loss-region mask, prefix).
    """
    size = image.shape[-1]
    if rng.random() < 0.66:
        s = rng.randint(size // 3, size)
    else:
        s = rng.randint(int(1.2 * size), int(1.4 * size))
    img = torch.nn.functional.interpolate(image[None], size=(s, s), mode="bilinear", align_corners=False)[0]
    if mask.shape[0]:
        msk = torch.nn.functional.interpolate(mask[None], size=(s, s), mode="bilinear", align_corners=False)[0]
    else:  # no concept masks given
        msk = mask.new_zeros(0, s, s)
    region = torch.zeros(1, size, size)
    if s < size:
        out = torch.full_like(image, -1.0)  # black canvas
        out_mask = torch.zeros_like(mask)
        y, x = rng.randint(0, size - s), rng.randint(0, size - s)
        out[:, y : y + s, x : x + s] = img
        out_mask[:, y : y + s, x : x + s] = msk
        region[:, y : y + s, x : x + s] = 1
        prefix = rng.choice(["a far away ", "very small "])
    else:
        y, x = rng.randint(0, s - size), rng.randint(0, s - size)
        out = img[:, y : y + size, x : x + size]
        out_mask = msk[:, y : y + size, x : x + size]
        region[:] = 1
        prefix = rng.choice(["zoomed in ", "close up "]) if s > size else ""
    return out, out_mask, region, prefix


def hflip(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.flip(-1) for t in tensors)


@dataclass
class RegExample:
    image: Image.Image
    caption: str


def load_regularisation(folder: str | Path) -> list[RegExample]:
    """Images with a caption each (same stem, .txt); a missing caption is an error."""
    out = []
    for f in list_images(folder):
        cap = f.with_suffix(".txt")
        require(cap.is_file(), f"regularisation image {f} has no caption file {cap.name}: add one line of text beside it")
        out.append(RegExample(load_image(f, role="regularisation image", min_side=limits.min_side), cap.read_text().strip()))
    return out


def generate_regularisation(pipe, prompt: str, n: int, folder: str | Path, seed: int = 0, steps: int = 25,
                            **call) -> list[RegExample]:
    """Class-prompt images drawn by the base itself (prior preservation), cached on disk; `call`: more arguments
    of the pipeline call (a flow base's sequence length)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        f = folder / f"reg_{i:04d}.png"
        if not f.exists():
            g = torch.Generator(pipe.device).manual_seed(seed + i)
            img = pipe(prompt=prompt, num_inference_steps=steps, generator=g, **call).images[0]
            tmp = f.with_suffix(".tmp.png")
            img.save(tmp)
            tmp.replace(f)
            (folder / f"reg_{i:04d}.txt").write_text(prompt)
        out.append(RegExample(load_image(f), prompt))
    return out
