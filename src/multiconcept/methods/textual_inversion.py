"""Textual Inversion (Gal et al., 2022): only the new tokens' embeddings train."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, TrainConfig
from .settings import hp

# diffusers' textual_inversion example README: lr 5e-4 scaled, batch 1 x 4, 3000 steps
TI_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a close-up photo of a {}", "a bright photo of the {}", "a good photo of a {}",
)


@dataclass
class TextualInversionConfig(TrainConfig):
    steps: int = hp(3000, "optimiser steps (diffusers example: 3000)")
    lr: float = hp(5e-4, "learning rate before scaling (diffusers example: 5e-4)")
    scale_lr: bool = hp(True, "multiply lr by batch x accumulation x processes")
    grad_accum: int = hp(4, "micro-batches per step (diffusers example: 4)")
    weight_decay: float = hp(0.0, "AdamW weight decay on the embedding rows")
    augment: bool = hp(False, "scale augmentation (off in Textual Inversion)")
    templates: tuple = hp(TI_TEMPLATES, "caption templates")


class TextualInversion(Method):
    name = "textual-inversion"
    Config = TextualInversionConfig

    def setup(self):
        self.add_trainable_tokens()
        return [{"params": self.token_params()}]

    def named_trainables(self):
        return self.token_trainables()

    def trainable_state(self):
        return {k: v.detach().clone() for k, v in self.token_trainables().items()}

    def bundle_tensors(self):
        return self.token_rows()
