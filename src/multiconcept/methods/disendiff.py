"""DisenDiff: attention calibration (Zhang et al., CVPR 2024, arXiv 2403.18551).

Custom Diffusion's parameterisation (attn2 K/V + one modifier token per
concept) plus two cross-attention losses on the query maps of one level,
SD 1.5's 16×16, its deepest down/up-block level (on any base the same place,
`attention.calibration_level`: SDXL 32, ToyWorld 8):
- L_bind pulls each modifier's map onto its class word's map;
- L_s&s pushes the class words' maps apart.
L = L_diffusion + 0.01 · mean over target samples (L_bind + L_s&s).

Optional, Break-A-Scene style, when masks are given: a mask attention loss
(each token's map vs its concept's mask) and union sampling (each sample
names a random non-empty subset of the image's concepts and the diffusion
loss is masked to their union).

Every ablation of the paper is a flag that removes or changes exactly its
term: no_bind, no_separation, no_gaussian, no_suppression, twice_suppression,
all_resolutions, train_qkv.

On a transformer base (FLUX, SD3) the maps are the image→text block of the
joint attention, renormalised over the text keys (joint_attention.py), on
one token grid: there are no levels to choose among, only blocks. The
default calibrates every joint (double-stream) block: those are where the
image reads the text through projections of the text's own, the ones Custom
Diffusion trains, so the losses reach every trained tensor directly; the
single-stream blocks are left out, as their keys serve the image's
self-attention too and stay frozen. This choice is unmeasured: no trained
transformer is available here to compare block sets (`attention_blocks`
picks others). train_qkv and all_resolutions have no analogue there and are
refused.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import AttentionStore, calibration_level
from ..errors import UserError, require
from ..losses import bind_loss, mask_attention_loss, separation_loss
from ..models.text_attention import text_attention_layers
from .custom_diffusion import CustomDiffusion, CustomDiffusionConfig
from .settings import hp


@dataclass
class DisenDiffConfig(CustomDiffusionConfig):
    attention_weight: float = hp(0.01, "weight of (L_bind + L_s&s) (paper: 0.01)")
    attention_resolution: int = hp(0, "side of the query maps the losses use; 0 = the deepest down/up-block level "
                                      "(paper: SD 1.5's 16x16 of 64x64; SDXL at 1024 px: 32; ToyWorld: 8)", at_least=0)
    no_bind: bool = hp(False, "ablation: drop L_bind")
    no_separation: bool = hp(False, "ablation: drop L_s&s")
    no_gaussian: bool = hp(False, "ablation: no Gaussian smoothing G")
    no_suppression: bool = hp(False, "ablation: no suppression f_m on class maps")
    twice_suppression: bool = hp(False, "ablation: apply f_m twice (A^4)")
    all_resolutions: bool = hp(False, "ablation: average maps over every cross-attention resolution")
    train_qkv: bool = hp(False, "ablation: train attn2 to_q as well as to_k/to_v")
    attention_blocks: tuple = hp((), "transformer bases: the joint (double-stream) blocks, by index, whose maps the "
                                     "losses use; () = every joint block (an unmeasured default, see `disendiff`'s "
                                     "docstring)", items=int)
    mask_attention_weight: float = hp(0.0, "Break-A-Scene mask attention loss weight (paper: 0.01); needs masks")
    union_sampling: bool = hp(False, "Break-A-Scene: each sample names a random subset of the image's concepts")

    @property
    def suppression_power(self) -> int:
        if self.no_suppression:
            return 1
        return 4 if self.twice_suppression else 2


class DisenDiff(CustomDiffusion):
    name = "disendiff"
    Config = DisenDiffConfig

    def __init__(self, base, data, cfg: DisenDiffConfig):
        super().__init__(base, data, cfg)
        if cfg.train_qkv and "to_q" not in cfg.train_projections:
            cfg.train_projections = tuple(cfg.train_projections) + ("to_q",)  # a transformer refuses it

    def setup(self):
        if self.base.flow is not None:
            require(not self.cfg.all_resolutions, "a transformer base has one token grid, no resolutions to average: "
                                                  "leave all_resolutions off (attention_blocks chooses blocks)")
            self.attention_blocks()  # refuses unknown blocks before training
        elif not self.cfg.attention_resolution:
            latent = (self.cfg.resolution or self.base.resolution) // self.base.pipe.vae_scale_factor
            self.cfg.attention_resolution = calibration_level(self.base.unet.config, latent)  # the bundle records it
        return super().setup()

    def choose_tokens(self, example, rng: random.Random) -> list[str]:
        tokens = list(example.tokens)
        if not self.cfg.union_sampling or len(tokens) < 2:
            return tokens
        k = rng.randint(1, len(tokens))
        chosen = set(rng.sample(tokens, k))
        return [t for t in tokens if t in chosen]  # keep prompt order

    def attention_blocks(self) -> list[str] | None:
        if self.base.flow is None or not self.cfg.attention_blocks:
            return None
        layers = list(text_attention_layers(self.base))
        bad = [i for i in self.cfg.attention_blocks if not 0 <= i < len(layers)]
        require(not bad, f"attention_blocks {bad[0]} is not a joint block of this transformer: it has "
                         f"{len(layers)} (0..{len(layers) - 1})")
        return [layers[i] for i in self.cfg.attention_blocks]

    def attention_store(self, batch):
        if not any(batch["target"]):
            return None
        res = None if self.cfg.all_resolutions or self.base.flow is not None else [self.cfg.attention_resolution]
        return AttentionStore(resolutions=res, with_grad=True)

    def _maps(self, store: AttentionStore) -> torch.Tensor:
        """``batch token h w``: the chosen resolution, or all resolutions averaged at the finest."""
        got = store.captured_resolutions
        if not got:
            raise UserError(
                f"no cross-attention layer of this base has {self.cfg.attention_resolution}x{self.cfg.attention_resolution} "
                f"queries at this image size: pass --param attention_resolution=N with N one of the UNet's levels"
            )
        if self.base.flow is not None:
            return store.maps()  # one token grid
        if not self.cfg.all_resolutions:
            return store.maps(self.cfg.attention_resolution)
        top = max(got)
        return torch.stack([F.interpolate(store.maps(r), size=(top, top), mode="bilinear", align_corners=False)
                            for r in got]).mean(0)

    def extra_loss(self, batch, store):
        if store is None:
            return None, {}
        cfg = self.cfg
        maps = self._maps(store)
        terms, bind_v, sep_v, mask_v, per_concept = [], 0.0, 0.0, 0.0, {}
        for i, (enc, is_target) in enumerate(zip(batch["encoded"], batch["target"])):
            present = [c for c in self.concepts if c.token in enc.positions]
            if not is_target or not present:
                continue  # attention terms only on samples whose caption holds the modifiers
            cls = torch.stack([maps[i, enc.positions[c.token + "/class"]].mean(0) for c in present])
            mod = torch.stack([maps[i, enc.positions[c.token]].mean(0) for c in present])
            term = maps.new_zeros(())
            if not cfg.no_bind:
                parts = bind_loss(cls, mod, smooth=not cfg.no_gaussian, suppression_power=cfg.suppression_power,
                                  per_concept=True)  # each concept's 1 - IoU; L_bind is their sum
                b = parts.sum()
                term = term + b
                bind_v += b.item()
                for c, v in zip(present, parts.tolist()):
                    per_concept[c.token] = per_concept.get(c.token, 0.0) + v
            if not cfg.no_separation and len(present) > 1:
                s = separation_loss(cls, smooth=not cfg.no_gaussian, suppression_power=cfg.suppression_power)
                term = term + s
                sep_v += s.item()
            terms.append(cfg.attention_weight * term)
            masks = batch["masks"][i]
            if cfg.mask_attention_weight and all(c.token in masks for c in present):
                target = torch.cat([masks[c.token] for c in present]).to(maps.device)
                # both the modifier and the class word of a concept should light up its mask
                m = mask_attention_loss(torch.cat([mod, cls]), torch.cat([target, target]))
                terms.append(cfg.mask_attention_weight * m)
                mask_v += m.item()
        if not terms:
            return None, {}
        n = len([t for t in batch["target"] if t])
        return torch.stack(terms).sum() / max(n, 1), {"bind": bind_v / max(n, 1), "separation": sep_v / max(n, 1),
                                                     "mask_attention": mask_v / max(n, 1),
                                                     **{f"bind {t}": v / max(n, 1) for t, v in per_concept.items()}}
