"""The subject image encoder (a CLIP vision tower) and the fusion MLP that writes its
embedding into the text encoding at the subject's noun."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError, require
from ...models import TOYWORLD_DIR, Base
from .config import CLIP_MEAN, CLIP_STD


class SubjectImageEncoder(nn.Module):
    """One embedding per subject crop: CLIP's pooled CLS (after post-layernorm)
    through visual_projection. Crops come in [0, 1]; normalised here."""

    def __init__(self, vision, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.vision = vision  # transformers CLIPVisionModelWithProjection
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        return self.vision.config.image_size

    @property
    def embed_dim(self) -> int:
        return self.vision.config.projection_dim

    @property
    def layers(self) -> nn.ModuleList:
        return self.vision.vision_model.encoder.layers

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """crops ``n 3 S S`` in [0, 1] → ``n embed_dim``."""
        return self.features(crops)[0]

    def features(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled embedding ``n embed_dim``, patch tokens ``n patches width``): the
        patch tokens through the tower's final layernorm, as open_clip returns them
        (Subject-Diffusion's dense image features)."""
        x = (crops.float() - self.mean) / self.std
        dtype = next(self.vision.parameters()).dtype
        out = self.vision(pixel_values=x.to(dtype))
        patches = self.vision.vision_model.post_layernorm(out.last_hidden_state[:, 1:])
        return out.image_embeds.float(), patches.float()


def vision_from_clip_model(clip) -> "CLIPVisionModelWithProjection":  # noqa: F821
    """vision_model + visual_projection of a transformers CLIPModel, as one model."""
    from transformers import CLIPVisionModelWithProjection

    vcfg = clip.config.vision_config
    vcfg.projection_dim = clip.config.projection_dim  # lives on the outer config in CLIPModel
    vision = CLIPVisionModelWithProjection(vcfg)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return vision.eval()


def tiny_image_encoder(projection_dim: int = 32, seed: int = 0) -> SubjectImageEncoder:
    """A random CLIP vision tower for tests: 32 px, 3 layers, built from a config."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, projection_dim=projection_dim)
    return SubjectImageEncoder(CLIPVisionModelWithProjection(cfg).eval())


def load_image_encoder(spec: str | None, base: Base) -> SubjectImageEncoder:
    """'tiny', a folder (a CLIPModel, e.g. ToyWorld's encoder, or a
    CLIPVisionModelWithProjection), a hub id, or None = the base's natural one
    (ToyWorld: its encoder CLIP's vision tower — the world's second CLIP, never the evaluator that scores
    identity; tiny: the tiny tower)."""
    if spec is None:
        if base.name == "toyworld":
            spec = str(TOYWORLD_DIR / "encoder")
            require(Path(spec, "config.json").is_file(),
                    "ToyWorld's encoder CLIP is not built yet: run `multiconcept toyworld build`, or pass --image-encoder PATH")
        elif base.name == "tiny":
            spec = "tiny"
        else:
            raise UserError(f"base {base.name!r} has no default image encoder: pass --image-encoder "
                            "(a CLIP folder or hub id, e.g. openai/clip-vit-large-patch14 as in the paper)")
    if spec == "tiny":
        enc = tiny_image_encoder(base.text_encoder.config.hidden_size)
        return enc.to(base.device)
    from transformers import AutoConfig, CLIPModel, CLIPVisionModelWithProjection

    try:
        kind = AutoConfig.from_pretrained(spec).model_type
        if kind == "clip":
            vision = vision_from_clip_model(CLIPModel.from_pretrained(spec, dtype=torch.float32))
        elif kind == "clip_vision_model":
            vision = CLIPVisionModelWithProjection.from_pretrained(spec, dtype=torch.float32)
        else:
            raise UserError(f"image encoder {spec} is a {kind!r} model: pass a CLIP model or CLIP vision model")
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"could not load image encoder {spec!r} ({first}): "
                        "pass a local CLIP folder, or a hub id with network access") from e
    mean, std = CLIP_MEAN, CLIP_STD
    pre = Path(spec) / "preprocessor_config.json"
    if pre.is_file():  # e.g. ToyWorld's CLIPs normalise to [-1, 1]
        p = json.loads(pre.read_text())
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
    return SubjectImageEncoder(vision.eval(), mean, std).to(base.device)




class MLP(nn.Module):
    """LN → Linear → GELU → Linear (the paper's MLP1 / MLP2)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class FusionMLP(nn.Module):
    """c' = LN(h2), h2 = MLP2(h1) + h1, h1 = MLP1([t ; v]) + t (≈2.96 M params at d = 768)."""

    def __init__(self, text_dim: int, image_dim: int):
        super().__init__()
        self.text_dim, self.image_dim = text_dim, image_dim
        self.image_proj = nn.Linear(image_dim, text_dim) if image_dim != text_dim else None
        self.mlp1 = MLP(2 * text_dim, text_dim)
        self.mlp2 = MLP(text_dim, text_dim)
        self.norm = nn.LayerNorm(text_dim)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """text ``... d``, image ``... e`` → ``... d``."""
        v = image if self.image_proj is None else self.image_proj(image)
        h = self.mlp1(torch.cat([text, v], dim=-1)) + text
        h = self.mlp2(h) + h
        return self.norm(h)


def fuse_subjects(fusion: FusionMLP, text: torch.Tensor, embeds: torch.Tensor, where: list[tuple[int, int]]) -> torch.Tensor:
    """Replace text ``batch token d`` at each (sample, token) of `where` by its
    fusion with the matching row of `embeds` ``n e``; other positions unchanged."""
    if not where:
        return text
    b = torch.tensor([w[0] for w in where], device=text.device)
    t = torch.tensor([w[1] for w in where], device=text.device)
    fused = fusion(text[b, t].float(), embeds.float()).to(text.dtype)
    return text.index_put((b, t), fused)
