"""The Subject-Diffusion model: its parts on a base pipeline, what trains, and its folder.

A trained model is a folder:

    subject_diffusion.json          base name + fingerprint, settings (which parts exist), vision config
    subject_diffusion.safetensors   every new or trained tensor: unet.* (conv_in, attn2 K/V, fusers,
                                    object-token MLP), text_encoder.*, cls_mlp.*
    image_encoder.safetensors       the whole CLIPVisionModelWithProjection (transformers names)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ...bundle import atomic_write
from ...errors import require
from ...models import Base, SingleFile
from ..fastcomposer import SubjectImageEncoder, read_tensors
from ..fastcomposer.model import base_for, read_model_config, saved_image_encoder
from ..settings import apply_values, config_dict
from .config import CONFIG_FILE, MODEL_FORMAT, MODEL_VERSION, SubjectDiffusionConfig
from .fusion import ClsMLP, FusionPrompt, encode_fused
from .objects import ObjectTokens
from .unet import subject_unet

WEIGHTS_FILE = "subject_diffusion.safetensors"


class SubjectDiffusion(nn.Module):
    """Image encoder, fusion text encoder, location channel and gated adapters on a base.
    The base's UNet is replaced by its Subject-Diffusion copy (base.unet is this model's UNet)."""

    def __init__(self, base: Base, encoder: SubjectImageEncoder, cfg: SubjectDiffusionConfig):
        super().__init__()
        self.base, self.cfg = base, cfg
        d = base.text_encoder.config.hidden_size
        cross = base.unet.config.cross_attention_dim
        require(cross == d, f"the UNet reads {cross}-d text but the text encoder writes {d}-d: not a usable base")
        self.encoder = encoder
        self.text_encoder = base.text_encoder
        token_dim = base.text_encoder.get_input_embeddings().weight.shape[1]
        self.cls_mlp = ClsMLP(encoder.embed_dim, token_dim).to(base.device) if cfg.cls_embedding else None
        self.unet = subject_unet(base.unet, location_map=cfg.location_map, adapter=cfg.adapter)
        if cfg.adapter:
            width = encoder.vision.config.hidden_size
            self.unet.position_net = ObjectTokens(width, cross, use_boxes=cfg.boxes).to(base.device, base.unet.dtype)
        base.pipe.unet = self.unet

    @property
    def tokenizer(self):
        return self.base.tokenizer

    # -- conditioning

    def subject_features(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """crops ``n 3 S S`` in [0, 1] → (pooled ``n e``, patch tokens ``n p c``)."""
        trains = any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
            return self.encoder.features(crops.to(self.base.device))

    def text_states(self, prompts: list[FusionPrompt], pooled: torch.Tensor | None,
                    valid: list[list[bool]] | None = None) -> torch.Tensor:
        return encode_fused(self.text_encoder, self.tokenizer, prompts, self.cls_mlp, pooled, valid)

    def gligen(self, patches: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor) -> dict | None:
        """cross_attention_kwargs for the object tokens (None without the adapter).
        patches ``b n p c``, boxes ``b n 4`` in [0, 1], valid ``b n``."""
        if not self.cfg.adapter:
            return None
        dev, dtype = self.base.device, self.unet.dtype
        return {"gligen": {"patches": patches.to(dev, dtype), "boxes": boxes.to(dev, dtype), "valid": valid.to(dev)}}

    def extra_channels(self, maps: torch.Tensor | None, batch: int, latent_hw: tuple[int, int]) -> torch.Tensor | None:
        """The location channel at the latent size (zeros when `maps` is None), or None without it."""
        from .unet import latent_map

        if not self.cfg.location_map:
            return None
        if maps is None:
            return torch.zeros(batch, 1, *latent_hw, device=self.base.device, dtype=self.unet.dtype)
        return latent_map(maps, latent_hw).to(self.base.device, self.unet.dtype)

    def predict(self, latents: torch.Tensor, t, text: torch.Tensor, channels: torch.Tensor | None,
                gligen: dict | None) -> torch.Tensor:
        x = latents if channels is None else torch.cat([latents, channels.to(latents.dtype)], dim=1)
        return self.unet(x, t, encoder_hidden_states=text.to(self.unet.dtype), cross_attention_kwargs=gligen,
                         return_dict=False)[0]

    # -- training

    def set_trainable(self) -> dict[str, nn.Parameter]:
        """Freeze everything, unfreeze what the config trains (the paper's split); return those by name."""
        cfg = self.cfg
        for part in (self.unet, self.text_encoder, self.base.vae, self.encoder):
            part.requires_grad_(False)
        if self.cls_mlp is not None:
            self.cls_mlp.requires_grad_(True)
        if cfg.train_text_encoder:
            self.text_encoder.requires_grad_(True)
        for name, p in self.unet.named_parameters():
            if self._new_in_unet(name) or (cfg.train_cross_kv and _cross_kv(name)):
                p.requires_grad_(True)
        layers = self.encoder.layers
        n = len(layers) if cfg.vision_layers < 0 else min(cfg.vision_layers, len(layers))
        for layer in list(layers)[len(layers) - n:]:
            layer.requires_grad_(True)
        return {k: p for k, p in self.named_parts() if p.requires_grad}

    def _new_in_unet(self, name: str) -> bool:
        """conv_in (when it grew the location channel), the object-token MLP and the fusers."""
        if name.startswith("conv_in."):
            return self.cfg.location_map
        return name.startswith("position_net.") or ".fuser." in name

    def named_parts(self):
        yield from ((f"unet.{k}", p) for k, p in self.unet.named_parameters())
        yield from ((f"text_encoder.{k}", p) for k, p in self.text_encoder.named_parameters())
        yield from ((f"image_encoder.{k}", p) for k, p in self.encoder.vision.named_parameters())
        if self.cls_mlp is not None:
            yield from ((f"cls_mlp.{k}", p) for k, p in self.cls_mlp.named_parameters())

    def saved_names(self) -> set[str]:
        """What the folder keeps besides the image encoder: every trained tensor and every new one."""
        cfg = self.cfg
        names = set()
        for k, _ in self.named_parts():
            part, rest = k.split(".", 1)
            if part == "cls_mlp" or (part == "text_encoder" and cfg.train_text_encoder):
                names.add(k)
            elif part == "unet" and (self._new_in_unet(rest) or (cfg.train_cross_kv and _cross_kv(rest))):
                names.add(k)
        return names

    # -- files

    def save(self, out: str | Path, meta: dict) -> Path:
        """Write the model folder; the JSON goes last, so its presence means complete."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        keep = self.saved_names()
        tensors = {k: p.detach().contiguous().cpu() for k, p in self.named_parts() if k in keep}
        vision = {k: v.detach().contiguous().cpu() for k, v in self.encoder.vision.state_dict().items()}
        atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
        atomic_write(out / "image_encoder.safetensors", lambda tmp: save_file(vision, tmp))
        enc = self.encoder
        body = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "method": "subject-diffusion",
                "base_name": self.base.name, "base_fingerprint": self.base.fingerprint, "base_weights": self.base.weights,
                "vision_config": enc.vision.config.to_dict(), "image_mean": enc.mean.flatten().tolist(),
                "image_std": enc.std.flatten().tolist(), "settings": config_dict(self.cfg), **meta}
        text = json.dumps(body, indent=1, sort_keys=True, default=str)
        atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
        return out

    @classmethod
    def load(cls, folder: str | Path, base: Base | str | SingleFile | None = None, device: str = "auto",
             dtype: str = "fp32") -> "SubjectDiffusion":
        """A model folder on its base; the base's fingerprint must match the recorded one."""
        folder = Path(folder)
        config = read_config(folder)
        base = base_for(folder, config, base, device, dtype)
        cfg = apply_values(SubjectDiffusionConfig(), config["settings"])
        encoder = saved_image_encoder(folder, config)
        model = cls(base, encoder.to(base.device, base.unet.dtype), cfg)
        tensors = read_tensors(folder / WEIGHTS_FILE)
        params = dict(model.named_parts())
        want_names = model.saved_names()
        bad = sorted(set(tensors) ^ want_names) or sorted(k for k in tensors if tensors[k].shape != params[k].shape)
        require(not bad, f"the weights in {folder / WEIGHTS_FILE} do not fit its settings (e.g. {bad[0] if bad else ''}): "
                         "re-run training")
        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v.to(params[k].dtype))
        model.config = config
        return model.eval()


def _cross_kv(name: str) -> bool:
    return ".attn2.to_k." in name or ".attn2.to_v." in name


def read_config(folder: Path) -> dict:
    return read_model_config(folder, CONFIG_FILE, MODEL_FORMAT, MODEL_VERSION, "a Subject-Diffusion",
                             "`multiconcept train-encoder --method subject-diffusion`")
