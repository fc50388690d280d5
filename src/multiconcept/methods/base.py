"""What every fine-tuning method shares: a config, a parameterisation, losses.

A method = (a) which tensors are new or trainable and (b) which losses are
added to the diffusion loss. The fine-tuning job (finetune.py) on the one
training loop owns everything else: data, noise, optimiser, accumulation,
checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..bundle import Bundle, delta_prefix, embedding_prefix
from ..data import ConceptSet
from ..errors import UserError
from ..losses import FLOW_WEIGHTINGS
from ..models import Base
from ..prompts import Concept, add_concept_tokens, set_token_rows
from ..training import OPTIMIZERS
from .settings import PROBABILITY, Settings, compile_setting, hp


@dataclass
class TrainConfig(Settings):
    """Training-loop settings shared by every method; methods override defaults."""

    steps: int = hp(500, "optimiser steps", at_least=1)
    lr: float = hp(1e-4, "learning rate (before --scale-lr)", above=0)
    scale_lr: bool = hp(False, "multiply lr by batch size x accumulation x processes (diffusers' --scale_lr)")
    batch_size: int = hp(1, "images per micro-batch", at_least=1)
    grad_accum: int = hp(1, "micro-batches per optimiser step", at_least=1)
    weight_decay: float = hp(1e-2, "AdamW weight decay", at_least=0)
    max_grad_norm: float = hp(1.0, "gradient clipping", at_least=0)
    resolution: int = hp(0, "training image size; 0 = the base's native size", at_least=0)
    augment: bool = hp(True, "Custom Diffusion's scale augmentation + horizontal flip")
    flip_p: float = hp(0.5, "horizontal flip probability when augmenting", **PROBABILITY)
    latents: str = hp("auto", "VAE posterior: sample (diffusers' scripts) | mean | auto (mean when a channel's "
                      "posterior std > 0.5, as on ToyWorld's VAE; else sample)", choices=("auto", "sample", "mean"))
    loss_region: str = hp("masks", "with masks, where the diffusion loss counts: masks (union of the caption's "
                          "concepts, Break-A-Scene) | unnamed-out (all but the other concepts' pixels) | all",
                          choices=("masks", "unnamed-out", "all"))
    unnamed: str = hp("keep", "a caption naming some of an image's masked concepts: keep the others' pixels, or "
                      "erase them (painted with the background's median colour; suits plain backgrounds)",
                      choices=("keep", "erase"))
    reg_fraction: float = hp(0.5, "share of samples drawn from regularisation images, when given", **PROBABILITY)
    mixed_precision: str = hp("no", "no | fp16 | bf16 (accelerate)", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = hp(False, "recompute the UNet's activations in the backward pass instead of keeping "
                                             "them: less memory (SDXL on common GPUs), slower steps (docs/sdxl.md)")
    quantize_frozen: str = hp("no", "nf4: the denoiser's frozen linear layers in 4-bit NormalFloat (bitsandbytes' own "
                                    "layers; diffusers' FLUX.2 LoRA script's --bnb_quantization_config_path), the "
                                    "trained ones kept; the base stays quantized after training", choices=("no", "nf4"))
    compile: str = compile_setting()
    optimizer: str = hp("adamw", "adamw | adamw8bit (bitsandbytes' 8-bit moments: a quarter of AdamW's state memory; "
                         "pip install 'multiconcept[bnb]')", choices=OPTIMIZERS)
    weighting_scheme: str = hp("none", "flow-matching bases (FLUX, SD3): the timestep density and loss weight of "
                                       "diffusers' compute_density_for_timestep_sampling / compute_loss_weighting_for_sd3; "
                                       "none = uniform, weight 1 (diffusers' FLUX scripts)", choices=FLOW_WEIGHTINGS)
    logit_mean: float = hp(0.0, "flow-matching bases, weighting_scheme=logit_normal: its mean (diffusers' scripts: 0)")
    logit_std: float = hp(1.0, "flow-matching bases, weighting_scheme=logit_normal: its std (diffusers' scripts: 1)",
                          above=0)
    mode_scale: float = hp(1.29, "flow-matching bases, weighting_scheme=mode: its scale (diffusers' scripts: 1.29)")
    guidance: float = hp(3.5, "guidance-distilled bases (FLUX.1 [dev]): the guidance input while training "
                              "(diffusers' FLUX LoRA script: 3.5)", at_least=0)
    seed: int = hp(0, "seed for data order, noise and timesteps")
    checkpoint_every: int = hp(100, "steps between resumable checkpoints", at_least=0)
    log_file: str = hp("", "append each step's loss terms to this JSON-lines file ('' = none)")
    templates: tuple = hp(("photo of a {}",), "caption templates; {} becomes '<tok> class [and <tok2> class2]'")


class TrainableTokens(nn.Module):
    """The text encoder's token embedding with the new rows as the only Parameter.

    Frozen rows stay bit-identical by construction (no weight-decay drift, no
    gradient masking), which is what "only the modifier rows receive
    gradient" asks for.
    """

    def __init__(self, embedding: nn.Embedding, new_ids: list[int]):
        super().__init__()
        self.base = embedding
        self.new_ids = list(new_ids)
        self.rows = nn.Parameter(embedding.weight[self.new_ids].detach().clone().float())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # look up the frozen table, then swap in the trained rows where the new ids occur
        # (never copy the table: SD's is 49408 x 768)
        out = self.base(input_ids).detach()
        ids = torch.as_tensor(self.new_ids, device=input_ids.device)
        match = (input_ids.unsqueeze(-1) == ids).to(out.dtype)  # batch token k
        hit = match.sum(-1, keepdim=True)
        return out * (1 - hit) + match @ self.rows.to(out.dtype)

    @property
    def weight(self):  # callers that inspect .weight see the live table
        w = self.base.weight.detach().clone()
        w[self.new_ids] = self.rows.detach().to(w.dtype)
        return w

    def commit(self) -> nn.Embedding:
        with torch.no_grad():
            self.base.weight[self.new_ids] = self.rows.to(self.base.weight.dtype)
        return self.base


class Method:
    """Base class; subclasses set `name`, `Config` and fill the hooks."""

    name = "method"
    Config = TrainConfig
    concept_type: type[Concept] = Concept  # how prompts name this method's concepts (its `phrase`)

    def __init__(self, base: Base, data: ConceptSet, cfg: TrainConfig):
        self.base, self.data, self.cfg = base, data, cfg
        self.concepts: list[Concept] = data.concepts
        self.tokens: TrainableTokens | None = None  # the first text encoder's
        self.token_tables: list[TrainableTokens] = []  # one per text encoder (SDXL: two)

    # -- parameterisation -------------------------------------------------
    def setup(self) -> list[dict]:
        """Make the trainable tensors; return optimiser param groups."""
        raise NotImplementedError

    def add_trainable_tokens(self) -> TrainableTokens:
        """The concepts' tokens in every tokenizer and text encoder of the base, each row trained:
        SDXL reads both encoders' hidden states and pools the second's, so a token learned in one
        alone would be half a concept."""
        self.token_tables = []
        for tokenizer, te in zip(self.base.tokenizers, self.base.text_encoders):
            new_ids = add_concept_tokens(tokenizer, te, self.concepts)
            self.token_tables.append(TrainableTokens(te.get_input_embeddings(), new_ids))
            te.set_input_embeddings(self.token_tables[-1])
        self.tokens = self.token_tables[0]
        return self.tokens

    def token_params(self) -> list[nn.Parameter]:
        return [t.rows for t in self.token_tables]

    def token_trainables(self) -> dict[str, nn.Parameter]:
        """Checkpoint names of the token rows: ``token_rows`` (first encoder), ``token_rows_2``, ..."""
        return {"token_rows" + (f"_{i + 1}" if i else ""): t.rows for i, t in enumerate(self.token_tables)}

    def trainable_tokens_in(self, prompt: str) -> bool:
        """Whether a prompt's encoding depends on trained tensors (else it is cached)."""
        return self.tokens is not None and any(c.token in prompt for c in self.concepts)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.named_trainables()
        for k, v in state.items():
            with torch.no_grad():
                params[k].copy_(v)

    def named_trainables(self) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    # -- losses -----------------------------------------------------------
    mask_loss = True  # restrict the diffusion loss to the concepts' masks when masks are given

    def choose_tokens(self, example, rng) -> list[str]:
        """Which of an example's concepts this sample's caption names (all, by default)."""
        return list(example.tokens)

    def attention_store(self, batch: dict):
        """An AttentionStore for this batch when the losses need maps, else None."""
        return None

    def full_precision_modules(self) -> set[str]:
        """The denoiser's modules whose own weights train: `quantize_frozen` leaves them as they are."""
        return set()

    def attention_blocks(self) -> list[str] | None:
        """On a transformer base, the joint blocks whose maps `attention_store` wants (None: every one)."""
        return None

    def extra_loss(self, batch: dict, store) -> tuple[torch.Tensor | None, dict]:
        return None, {}

    def after_step(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    # -- results ----------------------------------------------------------
    def bundle_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def bundle_extra(self) -> dict:
        return {}

    def to_bundle(self) -> Bundle:
        from dataclasses import asdict

        return Bundle(
            method=self.name,
            tokens=[c.token for c in self.concepts],
            class_words=[c.class_word for c in self.concepts],
            base_name=self.base.name,
            base_fingerprint=self.base.fingerprint,
            base_weights=dict(self.base.weights),
            architecture=self.base.architecture,
            hyperparameters={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.cfg).items()},
            extra=self.bundle_extra(),
            tensors=self.bundle_tensors(),
        )

    def token_rows(self) -> dict[str, torch.Tensor]:
        assert self.token_tables
        return {f"{embedding_prefix(k)}{c.token}": table.rows[i].detach().clone()
                for k, table in enumerate(self.token_tables) for i, c in enumerate(self.concepts)}

    # -- generation -------------------------------------------------------
    @classmethod
    def prompt_phrase(cls, token: str, class_word: str) -> str:
        """How a prompt names one of this method's concepts: '<cat1> cat' (Infusion: 'cat')."""
        return cls.concept_type(token, class_word).phrase

    @classmethod
    def apply(cls, base: Base, bundle: Bundle) -> None:
        """Load a bundle into a base pipeline for generation (default: tokens + deltas)."""
        for k, (tokenizer, te) in enumerate(zip(base.tokenizers, base.text_encoders)):
            rows = bundle.with_prefix(embedding_prefix(k))
            if rows:
                set_token_rows(tokenizer, te, rows)
        deltas = bundle.with_prefix(delta_prefix(base.denoiser_name))
        if deltas:
            params = dict(base.denoiser.named_parameters())
            for name, d in deltas.items():
                if name not in params:
                    raise UserError(f"bundle changes {name}, which this base's {base.denoiser_label} does not have: "
                                    "the bundle is for another base")
                with torch.no_grad():
                    params[name].add_(d.to(params[name]))
