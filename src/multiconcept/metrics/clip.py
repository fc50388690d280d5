"""CLIP-T and CLIP-I with any transformers CLIPModel (local folder or hub id).

CLIP-T: cosine between the CLIP text embedding of the prompt (learned
tokens removed, class words kept; DisenDiff prefixes "A photo depicts ") and
the image embedding. CLIP-I: mean cosine over all (generated, reference)
pairs of image embeddings. Both are reported as raw cosines; `scaled` gives
the published scales, CLIPScore 2.5·max(cos, 0) (Hessel et al. 2021, used by
DisenDiff and CustomConcept101) and 100·max(cos, 0) (torchmetrics), applied
per image before averaging, as those definitions do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserError, require
from ..models import TOYWORLD_DIR, quiet_loading
from ..prompts import strip_tokens
from .preprocess import ImagePreprocess, from_config

TOYWORLD_EVALUATOR = TOYWORLD_DIR / "evaluator"
DISENDIFF_TEXT_PREFIX = "A photo depicts "

# name -> (formula shown in reports, per-image transform of the raw cosine)
SCALES = {
    "raw": ("cos", lambda c: c),
    "clipscore": ("2.5*max(cos,0)", lambda c: 2.5 * max(c, 0.0)),
    "100": ("100*max(cos,0)", lambda c: 100.0 * max(c, 0.0)),
}


def check_scale(scale: str) -> str:
    require(scale in SCALES, f"unknown scale {scale!r}: use raw, clipscore (2.5*max(cos,0)) or 100 (100*max(cos,0))")
    return scale


def scaled(cosine: float, scale: str) -> float:
    return float(SCALES[check_scale(scale)][1](cosine))


def toyworld_evaluator_available() -> bool:
    return (TOYWORLD_EVALUATOR / "config.json").is_file()


# ---------------------------------------------------------------- loading

def model_source(name: str, flag: str) -> str:
    """A local folder (must hold config.json) or a hub id, as a string transformers accepts."""
    path = Path(name)
    if path.exists():
        require(path.is_dir() and (path / "config.json").is_file(),
                f"{flag} {name} is not a transformers model folder (no config.json): pass a folder written by "
                f"save_pretrained, or a hub id")
        return str(path)
    require(not name.startswith((".", "/", "~")) and name.count("/") <= 1,
            f"{flag} {name} does not exist: check the path, or give a hub id such as openai/clip-vit-base-patch32")
    return name


def read_model_json(source: str, filename: str) -> dict | None:
    """A JSON file beside a model's weights, or None when the checkpoint has none."""
    path = Path(source)
    if path.is_dir():
        f = path / filename
        return json.loads(f.read_text()) if f.is_file() else None
    from transformers.utils import cached_file

    try:
        resolved = cached_file(source, filename, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None
    return json.loads(Path(resolved).read_text()) if resolved else None


def image_processor_config(source: str) -> dict | None:
    """The checkpoint's image recipe: preprocessor_config.json (transformers 4 and
    hub checkpoints), or the "image_processor" part of processor_config.json,
    where transformers 5's processor.save_pretrained puts it."""
    cfg = read_model_json(source, "preprocessor_config.json")
    if cfg is None:
        cfg = (read_model_json(source, "processor_config.json") or {}).get("image_processor")
    return cfg


def model_type(source: str, flag: str) -> str:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source).model_type
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load {flag} {source!r} ({first}): pass a local model folder, "
                        f"or a hub id with network access") from e


def features(out) -> torch.Tensor:
    """transformers 4 returns the projected tensor, 5 a ModelOutput whose pooler_output holds it."""
    return out if torch.is_tensor(out) else out.pooler_output


@dataclass
class ClipScorer:
    model: "CLIPModel"  # noqa: F821
    tokenizer: object
    preprocess: ImagePreprocess
    name: str
    batch_size: int = 64
    max_length: int = 77
    _text_cache: dict = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict:
        return {"name": self.name, "kind": "CLIPModel", "preprocess": self.preprocess.describe()}

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) unit-length image embeddings, float32 on the CPU; batched model calls."""
        out = []
        for i in range(0, len(images), self.batch_size):
            px = self.preprocess(images[i: i + self.batch_size]).to(self.device, self.model.dtype)
            out.append(F.normalize(features(self.model.get_image_features(pixel_values=px)).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit-length text embeddings; each distinct text is encoded once per scorer."""
        todo = sorted({t for t in texts if t not in self._text_cache})
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i: i + self.batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            emb = features(self.model.get_text_features(input_ids=enc.input_ids.to(self.device),
                                                        attention_mask=enc.attention_mask.to(self.device)))
            for t, e in zip(chunk, F.normalize(emb.float(), dim=-1).cpu()):
                self._text_cache[t] = e
        if not texts:
            return torch.zeros(0, self.model.config.projection_dim)
        return torch.stack([self._text_cache[t] for t in texts])


def load_clip(name: str | None = None, device: str = "cpu", batch_size: int = 64) -> ClipScorer:
    """A CLIPModel + its tokenizer + its image recipe; None = the ToyWorld evaluator."""
    from transformers import AutoTokenizer, CLIPModel

    if name is None:
        require(toyworld_evaluator_available(),
                "no CLIP model given and the ToyWorld evaluator is not built into this install: pass --clip PATH_OR_HUB_ID "
                "(e.g. openai/clip-vit-base-patch32), or run `multiconcept toyworld build`")
        source, label = str(TOYWORLD_EVALUATOR), "toyworld-evaluator"
    else:
        source, label = model_source(name, "--clip"), name
    kind = model_type(source, "--clip")
    require(kind == "clip", f"--clip {label} is a {kind!r} checkpoint, not CLIP: pass a transformers CLIPModel checkpoint")
    try:
        with quiet_loading():
            model = CLIPModel.from_pretrained(source, dtype=torch.float32).to(device).eval()
            tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load --clip {label!r} ({first}): the folder needs the model weights and the "
                        f"tokenizer files (save both with save_pretrained)") from e
    image_size = model.config.vision_config.image_size
    prep = from_config(image_processor_config(source), image_size)
    limit = min(model.config.text_config.max_position_embeddings, tokenizer.model_max_length or 77)
    return ClipScorer(model, tokenizer, prep, label, batch_size=batch_size, max_length=limit)


# ---------------------------------------------------------------- metrics

def clip_text(prompt: str, tokens: Sequence[str], prefix: str = "") -> str:
    """The text CLIP-T scores: learned tokens removed, class words kept."""
    return prefix + strip_tokens(prompt, list(tokens))


def text_image_cosines(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Row i: cosine of image i with text i."""
    return (image_emb * text_emb).sum(-1)


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """CLIP-I / DINO: the mean cosine over every pair (a_i, b_j) of unit embeddings."""
    require(len(a) > 0 and len(b) > 0, "image alignment needs at least one image on each side")
    return float((a @ b.T).mean())


def per_image_alignment(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """For each a_i, its mean cosine to every b_j (their mean is `mean_pairwise_cosine`)."""
    return (a @ b.T).mean(1).tolist()
