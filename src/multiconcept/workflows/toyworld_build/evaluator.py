"""Stage 3: the CLIPs (transformers CLIPModel) trained contrastively on renders and captions: the
evaluator, and a second one by the same recipe (another seed, the other half of
the world pool), the encoder the base's text tower and the tuning-free methods start from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...training import discard_checkpoint
from .common import (
    Log,
    StageJob,
    replace_dir,
    stage_loop,
    to_pixels,
    write_json,
)
from .settings import CHECKPOINTS, BuildConfig, clip_names, stage_digest
from .vae import world_pool
from .world import WORLD


def make_evaluator(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         max_position_embeddings=tokenizer.model_max_length, **ids),
        vision_config=dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=256,
                           num_hidden_layers=4, num_attention_heads=4),
        projection_dim=128)
    return CLIPModel(config)


def _augment_like_generations(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Blur and noise on a third of the batch each, so generated (softer, noisier)
    images land near their renders in feature space."""
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    pick = torch.from_numpy(rng.random(len(x)) < 0.33).view(-1, 1, 1, 1)
    x = torch.where(pick, blurred, x)
    noisy = torch.from_numpy(rng.random(len(x)) < 0.33).view(-1, 1, 1, 1)
    return x + noisy * torch.from_numpy(rng.normal(0, 0.06, x.shape).astype(np.float32))


def train_clips(cfg: BuildConfig, work: Path, tokenizer, log: Log) -> dict:
    """Every CLIP the build needs (settings.clip_names), each trained once and then reloaded."""
    return {name: train_evaluator(cfg, work, tokenizer, log, name) for name in clip_names(cfg)}


def train_evaluator(cfg: BuildConfig, work: Path, tokenizer, log: Log, name: str = "evaluator"):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = work / name
    if (folder / "config.json").exists():
        return CLIPModel.from_pretrained(folder).eval()
    images, meta, _ = world_pool(cfg, log)
    k, n_clips = clip_names(cfg).index(name), len(clip_names(cfg))
    own = np.arange(k, len(images), n_clips)  # the CLIPs see disjoint halves of the pool
    torch.manual_seed(cfg.seed + 3 + 10 * k)
    model = make_evaluator(tokenizer)
    log(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.evaluator_lr, weight_decay=0.1)
    model.train()

    def loss_of(step: int) -> torch.Tensor:
        rng = np.random.default_rng([cfg.seed, 30 + k, step])
        idx = own[rng.integers(len(own), size=cfg.evaluator_batch)]
        pixels = _augment_like_generations(to_pixels(images[idx]), rng)
        # Padding to the longest caption, not to 77: with CLIP's causal mask the pooled
        # (end-of-text) feature never sees the padding, so this is exact and ~3x cheaper.
        ids = tokenizer([WORLD.clip_caption(meta[i], rng) for i in idx], padding=True,
                        truncation=True, return_tensors="pt").input_ids
        return model(input_ids=ids, pixel_values=pixels, return_loss=True).loss

    info, _ = stage_loop(name, StageJob(loss_of, {"clip": model}), opt, steps=cfg.evaluator_steps,
                         max_minutes=cfg.evaluator_max_minutes, peak_lr=cfg.evaluator_lr,
                         warmup=min(100, cfg.evaluator_steps // 10 + 1), checkpoint=work / CHECKPOINTS[name],
                         digest=stage_digest(cfg, name), checkpoint_minutes=cfg.checkpoint_minutes, log=log)
    model.eval()
    tmp = folder.with_name(f"{name}.tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    # Same [-1, 1] normalisation as training; 64 px in, so resize and crop are identities.
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, image_mean=[0.5] * 3,
        image_std=[0.5] * 3, do_resize=True, do_center_crop=True), tokenizer=tokenizer)
    processor.save_pretrained(tmp)
    write_json(tmp / "training.json", info)
    replace_dir(tmp, folder)
    discard_checkpoint(work / CHECKPOINTS[name])
    return CLIPModel.from_pretrained(folder).eval()


@torch.no_grad()
def image_features(model, images: np.ndarray) -> torch.Tensor:
    out = [model.get_image_features(pixel_values=to_pixels(images[i:i + 256])) for i in range(0, len(images), 256)]
    return torch.cat([o if torch.is_tensor(o) else o.pooler_output for o in out])


@torch.no_grad()
def text_features(model, tokenizer, texts: list[str]) -> torch.Tensor:
    ids = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").input_ids
    out = [model.get_text_features(input_ids=ids[i:i + 256]) for i in range(0, len(ids), 256)]
    return torch.cat([o if torch.is_tensor(o) else o.pooler_output for o in out])


def retrieval_top1(model, tokenizer, images: np.ndarray, captions: list[str]) -> float:
    """Share of images whose highest-scoring caption (among all given) is their own;
    a duplicate caption string counts as right."""
    img = F.normalize(image_features(model, images), dim=-1)
    txt = F.normalize(text_features(model, tokenizer, captions), dim=-1)
    best = (img @ txt.T).argmax(1).tolist()
    return float(np.mean([captions[b] == captions[i] for i, b in enumerate(best)]))


# ---------------------------------------------------------------- 4. latent pool
