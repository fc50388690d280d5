"""Tiny random metric backbones built from configs, saved like real checkpoints.

For tests and benchmarks on machines without hub access: the folders they
write load through exactly the code path a downloaded CLIP or DINO takes
(`load_clip(path)`, `load_dino(path)`).
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_clip_model(tokenizer, image_size: int = 32, seed: int = 0, width: int = 32, layers: int = 1,
                    patch_size: int = 8, max_length: int = 77):
    from transformers import CLIPConfig, CLIPModel

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2,
                         max_position_embeddings=max_length, **ids),
        vision_config=dict(image_size=image_size, patch_size=patch_size, hidden_size=width, intermediate_size=2 * width,
                           num_hidden_layers=layers, num_attention_heads=2),
        projection_dim=width))


def save_tiny_clip(folder: str | Path, image_size: int = 32, seed: int = 0, tokenizer=None, model=None,
                   processor: dict | None = None) -> Path:
    """model + tokenizer (+ a preprocessor_config.json when `processor` is given)."""
    import json

    from .tiny import tiny_tokenizer

    folder = Path(folder)
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    model = model if model is not None else tiny_clip_model(tokenizer, image_size, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if processor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor",
                                                                     **processor}))
    return folder


def save_tiny_vit(folder: str | Path, image_size: int = 32, seed: int = 0, kind: str = "vit") -> Path:
    """A random ViT ('vit') or DINOv2 ('dinov2') backbone."""
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(seed)
    common = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)
    model = ViTModel(ViTConfig(**common)) if kind == "vit" else Dinov2Model(Dinov2Config(**common))
    model.save_pretrained(folder)
    return Path(folder)
