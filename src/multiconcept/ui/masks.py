"""Masks painted in the browser: the image shown for painting, and the painted mask read back.

The editor gets the image scaled so that its longer side is `PAINT_SIDE`
pixels (a 64-pixel ToyWorld render is too small to paint on; a 4000-pixel
photo too large to send back and forth), and hands back its value as
{background, layers, composite}. The mask is every pixel a layer covers
(alpha > 0), scaled back to the image's own size. Some gradio releases sent
the layers back empty (gradio issues 10298, 10573); then the mask is where the
composite differs from the background, so a painted stroke is never lost.
No gradio here: these are plain functions of images and arrays.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

PAINT_SIDE = 512
# a composite pixel differing from the background by more than this (0-255, any channel) is paint
PAINT_DIFFERENCE = 24


def paint_size(size: tuple[int, int], side: int = PAINT_SIDE) -> tuple[int, int]:
    """(w, h) of the painting canvas: the image's aspect, the longer side `side`."""
    w, h = size
    scale = side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def paint_background(image: Image.Image, side: int = PAINT_SIDE) -> Image.Image:
    """The image to paint on: upscaled without blur (nearest), downscaled smoothly."""
    size = paint_size(image.size, side)
    resample = Image.NEAREST if size[0] >= image.size[0] else Image.LANCZOS
    return image.convert("RGB").resize(size, resample)


def editor_value(image: Image.Image, side: int = PAINT_SIDE) -> dict:
    """An editor value holding `image` to paint on and no paint yet."""
    bg = paint_background(image, side)
    return {"background": bg, "layers": [], "composite": bg}


def _array(img) -> np.ndarray | None:
    if img is None:
        return None
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGBA") if img.mode in ("RGBA", "LA", "P") else img.convert("RGB"))
    return np.asarray(img)


def _alpha(layer: np.ndarray) -> np.ndarray:
    """Coverage of one layer ``h w``: its alpha channel, or any non-black pixel when it has none."""
    if layer.ndim == 3 and layer.shape[2] == 4:
        return layer[..., 3] > 0
    grey = layer if layer.ndim == 2 else layer.max(axis=2)
    return grey > 0


def painted_region(value: dict | None) -> np.ndarray | None:
    """Where the editor holds paint, ``h w`` bool at the canvas size; None when nothing is painted."""
    if not value:
        return None
    layers = [_array(layer) for layer in value.get("layers") or []]
    covered = [_alpha(layer) for layer in layers if layer is not None]
    if covered:
        region = np.logical_or.reduce(covered)
        if region.any():
            return region
    bg, comp = _array(value.get("background")), _array(value.get("composite"))
    if bg is None or comp is None or bg.shape[:2] != comp.shape[:2]:
        return None
    diff = np.abs(comp[..., :3].astype(np.int16) - bg[..., :3].astype(np.int16)).max(axis=2) > PAINT_DIFFERENCE
    return diff if diff.any() else None


def mask_from_editor(value: dict | None, size: tuple[int, int]) -> Image.Image | None:
    """The painted mask (white = painted) at the image's size (w, h), or None when nothing is painted."""
    region = painted_region(value)
    if region is None:
        return None
    canvas = Image.fromarray((region * 255).astype(np.uint8), "L")
    if canvas.size != tuple(size):
        # area-average then threshold: a stroke keeps its extent when the canvas is scaled down
        canvas = canvas.resize(tuple(size), Image.BOX if canvas.size[0] > size[0] else Image.NEAREST)
        canvas = canvas.point(lambda v: 255 if v >= 128 else 0)
    return canvas
