"""DreamBooth-LoRA (Ruiz et al. 2023 + Hu et al. 2021), as diffusers' example trains it.

peft LoRA on the denoiser's attention projections (optionally the text encoders');
each concept gets a new token whose embedding starts from a rare word and
stays fixed, playing DreamBooth's "sks" identifier. On a transformer base (FLUX,
SD3) the projections are every attention's, image and text streams alike
(models/flow.py: diffusers' LoRA scripts' attention layers); the text encoders
that may carry one are those diffusers' pipeline loads a LoRA into: FLUX.1's
CLIP-L, SD3's CLIP-L and CLIP-G, none on FLUX.2 [klein].
"""

from __future__ import annotations

from dataclasses import dataclass

from ..bundle import embedding_prefix
from ..errors import UserError, require
from ..models import text_encoder_component
from .base import Method, TrainConfig
from .precision import trained_params_to_fp32
from .settings import hp

UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class LoraConfig_(TrainConfig):
    # diffusers train_dreambooth_lora.py README: lr 1e-4, rank 4, 500 steps, batch 1
    steps: int = hp(500, "optimiser steps (diffusers example: 500)")
    lr: float = hp(1e-4, "learning rate (diffusers example: 1e-4)")
    rank: int = hp(4, "LoRA rank (diffusers default: 4)")
    alpha: float = hp(4.0, "LoRA alpha; scale = alpha / rank")
    train_text_encoder: bool = hp(False, "also put LoRA on the text encoders' attention (SDXL: both)")
    augment: bool = hp(False, "scale augmentation (off in DreamBooth)")
    initializer: str = hp("sks", "rare word whose embedding the identifier tokens copy")


def lora_config(rank: int, alpha: float, targets) -> "peft.LoraConfig":  # noqa: F821
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))


class DreamBoothLora(Method):
    name = "lora"
    Config = LoraConfig_

    def setup(self):
        from diffusers.utils import convert_unet_state_dict_to_peft  # noqa: F401  (import check: peft backend present)

        for c in self.concepts:
            c.initializer = c.initializer or self.cfg.initializer
        from ..prompts import add_concept_tokens

        for tokenizer, te in zip(self.base.tokenizers, self.base.text_encoders):
            add_concept_tokens(tokenizer, te, self.concepts)
        self.base.denoiser.add_adapter(lora_config(self.cfg.rank, self.cfg.alpha, denoiser_targets(self.base)))
        for te in self.text_encoders().values():  # SDXL: both, as diffusers' train_dreambooth_lora_sdxl.py does
            te.add_adapter(lora_config(self.cfg.rank, self.cfg.alpha, TEXT_TARGETS))
        params = list(self.named_trainables().values())
        trained_params_to_fp32(params)
        for p in params:
            p.requires_grad_(True)
        return [{"params": params}]

    def trainable_tokens_in(self, prompt):
        return self.cfg.train_text_encoder

    def text_encoders(self) -> dict:
        """{component name: text encoder} that carry LoRA: none, or every one the base has (a flow base: those its
        diffusers pipeline loads LoRA into, `_lora_loadable_modules`)."""
        if not self.cfg.train_text_encoder:
            return {}
        encoders = {text_encoder_component(k): te for k, te in enumerate(self.base.text_encoders)}
        if self.base.flow is not None:
            loadable = type(self.base.pipe)._lora_loadable_modules
            encoders = {c: te for c, te in encoders.items() if c in loadable}
            require(bool(encoders), f"diffusers' {type(self.base.pipe).__name__} loads no text-encoder LoRA: leave "
                                    "train_text_encoder off on this base")
        return encoders

    def named_trainables(self):
        d = self.base.denoiser_name
        out = {f"{d}.{n}": p for n, p in self.base.denoiser.named_parameters() if "lora_" in n}
        for c, te in self.text_encoders().items():
            out.update({f"{c}.{n}": p for n, p in te.named_parameters() if "lora_" in n})
        return out

    def trainable_state(self):
        return {k: v.detach().clone() for k, v in self.named_trainables().items()}

    def bundle_tensors(self):
        from peft.utils import get_peft_model_state_dict

        out = {}
        for k, (tokenizer, te) in enumerate(zip(self.base.tokenizers, self.base.text_encoders)):
            emb = te.get_input_embeddings().weight
            ids = tokenizer.convert_tokens_to_ids([c.token for c in self.concepts])
            out.update({f"{embedding_prefix(k)}{c.token}": emb[i].detach().float().clone()
                        for c, i in zip(self.concepts, ids)})
        d = self.base.denoiser_name
        out.update({f"lora/{d}.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(self.base.denoiser).items()})
        for c, te in self.text_encoders().items():
            out.update({f"lora/{c}.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(te).items()})
        return out

    def bundle_extra(self):
        return {"rank": self.cfg.rank, "alpha": self.cfg.alpha,
                f"{self.base.denoiser_name}_targets": list(denoiser_targets(self.base)),
                "text_targets": list(TEXT_TARGETS) if self.cfg.train_text_encoder else []}

    @classmethod
    def apply(cls, base, bundle):
        from peft.utils import set_peft_model_state_dict

        Method.apply(base, bundle)  # identifier tokens
        name = "mc_" + "_".join(t.strip("<>") for t in bundle.tokens)
        x = bundle.extra
        lora = bundle.with_prefix("lora/")
        models = base.parts
        parts = {c: {k[len(c) + 1:]: v for k, v in lora.items() if k.startswith(c + ".")} for c in models}
        unknown = set(lora) - {f"{c}.{k}" for c, sd in parts.items() for k in sd}
        if unknown:
            raise UserError(f"LoRA bundle {bundle.tokens} has factors for {sorted(unknown)[0].split('.')[0]}, which this "
                            "base does not have: use the base it was learned on")
        try:
            for c, sd in parts.items():
                if sd:
                    targets = x[f"{c}_targets"] if c == base.denoiser_name else x["text_targets"]
                    models[c].add_adapter(lora_config(x["rank"], x["alpha"], targets), adapter_name=name)
                    set_peft_model_state_dict(models[c], sd, adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as e:
            raise UserError(f"LoRA bundle {bundle.tokens} does not fit this base ({str(e).splitlines()[0]}): "
                            "use the base it was learned on") from e
        base.lora_adapters[name] = 1.0
        active = list(base.lora_adapters)
        base.denoiser.set_adapters(active, weights=list(base.lora_adapters.values()))
        for c, sd in parts.items():
            if c != base.denoiser_name and sd:
                models[c].set_adapter(active if len(active) > 1 else active[0])


def denoiser_targets(base) -> tuple:
    """The denoiser's modules LoRA goes on: the UNet's attention projections, or a transformer's (models/flow.py)."""
    return base.flow.lora_targets if base.flow is not None else UNET_TARGETS

