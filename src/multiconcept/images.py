"""The one way this tool reads an image or a mask a user hands it.

Rules (also in `multiconcept learn --help`):
- PNG, JPEG, WebP, BMP; modes RGB, RGBA, L, LA, P. Transparent pixels become
  white in an image, as image viewers show them, and black in a mask, so that
  transparency is never mistaken for the concept.
- The longer side may be at most `limits.max_side` pixels (default 8192,
  a 50-megapixel photo; `--max-image-side` or MULTICONCEPT_MAX_IMAGE_SIDE).
  The size is read from the file's header, so an oversized file (a
  decompression bomb) is refused before it is decoded.
- Images to learn from need `limits.min_side` pixels (32) on the shorter side.
- A mask is black and white: anti-aliased edges are fine, but a mask whose
  pixels are mostly grey (a photo, noise) is refused.

This module imports no torch, so the CLI can check files before it loads any
model.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError, is_file, require

SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
READABLE_MODES = {"RGB", "RGBA", "L", "LA", "P"}
MAX_SIDE_ENV = "MULTICONCEPT_MAX_IMAGE_SIDE"
# a mask pixel in (GREY_LOW, GREY_HIGH) is neither black nor white; anti-aliasing greys a
# one-pixel rim, a few percent of a mask's pixels, while noise or a photo is mostly grey
GREY_LOW, GREY_HIGH = 32, 223
MAX_GREY_SHARE = 0.25


@dataclass
class Limits:
    max_side: int = 8192
    min_side: int = 32  # for images to learn from: the tiny test base's resolution; ToyWorld's is 64

    def __post_init__(self):
        env = os.environ.get(MAX_SIDE_ENV)
        if env:
            self.max_side = parse_side(env, MAX_SIDE_ENV)


def limits_floor() -> int:
    return Limits.min_side  # below it nothing could be learned from anyway


def parse_side(value: str | int, where: str) -> int:
    try:
        side = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{where} must be a whole number of pixels, got {value!r}: e.g. 8192") from None
    require(side >= limits_floor(), f"{where} must be at least {limits_floor()} pixels, got {side}: e.g. 8192")
    return side


limits = Limits()


def read_image(path: str | Path, *, role: str = "image", min_side: int = 1, background=(255, 255, 255)) -> Image.Image:
    """An RGB image, or a clear UserError naming the file, the problem and the fix."""
    path = Path(path)
    require(is_file(path), f"{role} {path} does not exist: check the path")
    try:
        with warnings.catch_warnings():
            # our side limit is checked below from the header; PIL's warning would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                require(
                    max(w, h) <= limits.max_side,
                    f"{role} {path} is {w}x{h} pixels, over the limit of {limits.max_side} on a side: "
                    f"downscale it, or raise --max-image-side",
                )
                im.load()
                mode = im.mode
                img = im.copy()
    except Image.DecompressionBombError as e:
        raise UserError(f"{role} {path} is larger than PIL's decompression-bomb limit "
                        f"({2 * Image.MAX_IMAGE_PIXELS:,} pixels; this tool allows {limits.max_side} on a side): "
                        f"downscale it") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{role} {path} is corrupt or not an image ({type(e).__name__}): re-export it as PNG or JPEG") from e
    require(
        mode in READABLE_MODES,
        f"{role} {path} has mode {mode}, which is not supported: convert it to RGB (e.g. PIL's img.convert('RGB'))",
    )
    require(
        min(img.size) >= min_side,
        f"{role} {path} is {img.size[0]}x{img.size[1]} pixels, too small to learn from: "
        f"give at least {min_side} pixels on the shorter side",
    )
    return flatten(img, background)


def flatten(img: Image.Image, background) -> Image.Image:
    """RGB, transparent pixels composited on `background`."""
    if img.mode in ("RGBA", "LA", "P"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba)
    return img.convert("RGB")


def as_image(value: str | Path | Image.Image, *, role: str = "image", min_side: int = 1,
             background=(255, 255, 255)) -> Image.Image:
    """A path or an in-memory PIL image, under the same rules as a file (the Python API's inputs)."""
    if not isinstance(value, Image.Image):
        return read_image(value, role=role, min_side=min_side, background=background)
    w, h = value.size
    require(max(w, h) <= limits.max_side, f"{role} is {w}x{h} pixels, over the limit of {limits.max_side} on a side: "
                                         f"downscale it, or raise the limit (multiconcept.images.limits.max_side)")
    require(min(w, h) >= min_side, f"{role} is {w}x{h} pixels, too small to learn from: give at least {min_side} pixels "
                                   f"on the shorter side")
    require(value.mode in READABLE_MODES, f"{role} has mode {value.mode}, which is not supported: convert it to RGB")
    return flatten(value, background)


def read_mask(path: str | Path | Image.Image, size: tuple[int, int] | None = None, *, role: str = "mask") -> Image.Image:
    """A binary mask (white = the concept), the size of its image when `size` is given; a path or a PIL image."""
    where = role if isinstance(path, Image.Image) else f"{role} {path}"
    m = np.asarray(as_image(path, role=role, background=(0, 0, 0)).convert("L"))
    if size is not None:
        require(
            (m.shape[1], m.shape[0]) == tuple(size),
            f"{where} is {m.shape[1]}x{m.shape[0]} but its image is {size[0]}x{size[1]}: make them the same size",
        )
    grey = float(((m > GREY_LOW) & (m < GREY_HIGH)).mean())
    require(
        grey <= MAX_GREY_SHARE,
        f"{where} is not a mask: {grey:.0%} of its pixels are grey, neither black nor white: "
        f"paint the concept white on black",
    )
    arr = m > 127
    require(bool(arr.any()), f"{where} is empty (no white pixels): paint the concept white on black")
    return Image.fromarray((arr * 255).astype(np.uint8), "L")

