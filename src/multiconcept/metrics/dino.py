"""DINO image alignment: mean cosine of ViT CLS features, generated vs reference.

The DreamBooth protocol: DINO ViT-S/16 (facebook/dino-vits16), CLS token of
the last layer, images resized (shortest edge, bicubic) to 256, centre
cropped to 224, ImageNet-normalised. Any transformers ViT-family checkpoint
whose first output token is a CLS token works (vit, dinov2, deit, ...).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserError, require
from ..models import quiet_loading
from .clip import model_source, model_type
from .preprocess import ImagePreprocess, dino_recipe

# model types whose last_hidden_state[:, 0] is a CLS token
CLS_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers", "dinov3_vit", "deit", "beit", "data2vec-vision", "vit_msn",
                   "ijepa", "vit_mae")


@dataclass
class DinoScorer:
    model: torch.nn.Module
    preprocess: ImagePreprocess
    name: str
    batch_size: int = 64
    interpolate: bool = False  # pass interpolate_pos_encoding when the crop differs from the model's size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict:
        return {"name": self.name, "kind": type(self.model).__name__, "feature": "CLS of last_hidden_state",
                "preprocess": self.preprocess.describe()}

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        kw = {"interpolate_pos_encoding": True} if self.interpolate else {}
        for i in range(0, len(images), self.batch_size):
            px = self.preprocess(images[i: i + self.batch_size]).to(self.device, self.model.dtype)
            cls = self.model(pixel_values=px, **kw).last_hidden_state[:, 0]
            out.append(F.normalize(cls.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


def load_dino(name: str, device: str = "cpu", batch_size: int = 64) -> DinoScorer:
    from transformers import AutoModel

    source = model_source(name, "--dino")
    kind = model_type(source, "--dino")
    require(kind in CLS_MODEL_TYPES,
            f"--dino {name} is a {kind!r} checkpoint: pass a ViT/DINO one (model type {', '.join(CLS_MODEL_TYPES[:3])}, ...), "
            f"e.g. facebook/dino-vits16")
    try:
        with quiet_loading():
            model = AutoModel.from_pretrained(source, dtype=torch.float32).to(device).eval()
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load --dino {name!r} ({first}): pass a folder written by save_pretrained or a hub id") from e
    image_size = model.config.image_size
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else int(image_size)
    prep = dino_recipe(image_size)
    takes_flag = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
    return DinoScorer(model, prep, name, batch_size, interpolate=takes_flag and prep.crop[0] != image_size)
