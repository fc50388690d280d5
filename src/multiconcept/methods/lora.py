"""DreamBooth-LoRA (Ruiz et al. 2023 + Hu et al. 2021), as diffusers' example trains it.

peft LoRA on the UNet attention projections (optionally the text encoder's);
each concept gets a new token whose embedding starts from a rare word and
stays fixed, playing DreamBooth's "sks" identifier.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .base import Method, TrainConfig, embedding_prefix
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
    train_text_encoder: bool = hp(False, "also put LoRA on the text encoder's attention")
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

        if self.cfg.train_text_encoder and len(self.base.text_encoders) > 1:
            raise UserError("lora's train_text_encoder is not supported on SDXL bases yet: "
                            "drop --param train_text_encoder=true")
        for tokenizer, te in zip(self.base.tokenizers, self.base.text_encoders):
            add_concept_tokens(tokenizer, te, self.concepts)
        self.base.unet.add_adapter(lora_config(self.cfg.rank, self.cfg.alpha, UNET_TARGETS))
        if self.cfg.train_text_encoder:
            self.base.text_encoder.add_adapter(lora_config(self.cfg.rank, self.cfg.alpha, TEXT_TARGETS))
        params = list(self.named_trainables().values())
        for p in params:
            p.requires_grad_(True)
        return [{"params": params}]

    def trainable_tokens_in(self, prompt):
        return self.cfg.train_text_encoder

    def named_trainables(self):
        out = {f"unet.{n}": p for n, p in self.base.unet.named_parameters() if "lora_" in n}
        if self.cfg.train_text_encoder:
            out.update({f"text_encoder.{n}": p for n, p in self.base.text_encoder.named_parameters() if "lora_" in n})
        return out

    def trainable_state(self):
        return {k: v.detach().clone() for k, v in self.named_trainables().items()}

    def bundle_tensors(self):
        from peft.utils import get_peft_model_state_dict

        out = {}
        for k, (tokenizer, te) in enumerate(zip(self.base.tokenizers, self.base.text_encoders)):
            emb = te.get_input_embeddings().weight
            ids = tokenizer.convert_tokens_to_ids([c.token for c in self.concepts])
            out.update({f"{embedding_prefix(k)}{c.token}": emb[i].detach().clone() for c, i in zip(self.concepts, ids)})
        out.update({f"lora/unet.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(self.base.unet).items()})
        if self.cfg.train_text_encoder:
            te = get_peft_model_state_dict(self.base.text_encoder)
            out.update({f"lora/text_encoder.{k}": v.detach().clone() for k, v in te.items()})
        return out

    def bundle_extra(self):
        return {"rank": self.cfg.rank, "alpha": self.cfg.alpha, "unet_targets": list(UNET_TARGETS),
                "text_targets": list(TEXT_TARGETS) if self.cfg.train_text_encoder else []}

    @classmethod
    def apply(cls, base, bundle):
        from peft.utils import set_peft_model_state_dict

        Method.apply(base, bundle)  # identifier tokens
        name = "mc_" + "_".join(t.strip("<>") for t in bundle.tokens)
        x = bundle.extra
        lora = bundle.with_prefix("lora/")
        unet_sd = {k[len("unet."):]: v for k, v in lora.items() if k.startswith("unet.")}
        te_sd = {k[len("text_encoder."):]: v for k, v in lora.items() if k.startswith("text_encoder.")}
        try:
            base.unet.add_adapter(lora_config(x["rank"], x["alpha"], x["unet_targets"]), adapter_name=name)
            set_peft_model_state_dict(base.unet, unet_sd, adapter_name=name)
            if te_sd:
                base.text_encoder.add_adapter(lora_config(x["rank"], x["alpha"], x["text_targets"]), adapter_name=name)
                set_peft_model_state_dict(base.text_encoder, te_sd, adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as e:
            raise UserError(f"LoRA bundle {bundle.tokens} does not fit this base ({str(e).splitlines()[0]}): "
                            "use the base it was learned on") from e
        base.lora_adapters[name] = 1.0
        active = list(base.lora_adapters)
        base.unet.set_adapters(active, weights=list(base.lora_adapters.values()))
        if te_sd:
            base.text_encoder.set_adapter(active if len(active) > 1 else active[0])


