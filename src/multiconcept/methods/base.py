"""What every fine-tuning method shares: a config, a parameterisation, losses.

A method = (a) which tensors are new or trainable and (b) which losses are
added to the diffusion loss. The training loop (train.py) owns everything
else: data, noise, optimiser, accumulation, checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from ..bundle import Bundle
from ..data import ConceptSet
from ..errors import UserError, require
from ..models import Base
from ..prompts import Concept, add_concept_tokens, set_token_rows


def hp(default, help: str):
    """A config field whose help text the CLI shows (`multiconcept methods`)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Training-loop settings shared by every method; methods override defaults."""

    steps: int = hp(500, "optimiser steps")
    lr: float = hp(1e-4, "learning rate (before --scale-lr)")
    scale_lr: bool = hp(False, "multiply lr by batch size x accumulation x processes (diffusers' --scale_lr)")
    batch_size: int = hp(1, "images per micro-batch")
    grad_accum: int = hp(1, "micro-batches per optimiser step")
    weight_decay: float = hp(1e-2, "AdamW weight decay")
    max_grad_norm: float = hp(1.0, "gradient clipping")
    resolution: int = hp(0, "training image size; 0 = the base's native size")
    augment: bool = hp(True, "Custom Diffusion's scale augmentation + horizontal flip")
    flip_p: float = hp(0.5, "horizontal flip probability when augmenting")
    latents: str = hp("auto", "VAE posterior: sample (diffusers' scripts) | mean | auto (mean when a channel's "
                      "posterior std > 0.5, as on ToyWorld's VAE; else sample)")
    loss_region: str = hp("masks", "with masks, where the diffusion loss counts: masks (union of the caption's "
                          "concepts, Break-A-Scene) | unnamed-out (all but the other concepts' pixels) | all")
    unnamed: str = hp("keep", "a caption naming some of an image's masked concepts: keep the others' pixels, or "
                      "erase them (painted with the background's median colour; suits plain backgrounds)")
    reg_fraction: float = hp(0.5, "share of samples drawn from regularisation images, when given")
    mixed_precision: str = hp("no", "no | fp16 | bf16 (accelerate)")
    seed: int = hp(0, "seed for data order, noise and timesteps")
    checkpoint_every: int = hp(100, "steps between resumable checkpoints")
    log_file: str = hp("", "append each step's loss terms to this JSON-lines file ('' = none)")
    templates: tuple = hp(("photo of a {}",), "caption templates; {} becomes '<tok> class [and <tok2> class2]'")


def config_help(cfg_cls) -> list[tuple[str, object, str]]:
    return [(f.name, f.default, f.metadata.get("help", "")) for f in fields(cfg_cls)]


# settings that take one of a few words (checked where --param values arrive)
CHOICES = {"latents": ("auto", "sample", "mean"), "loss_region": ("masks", "unnamed-out", "all"),
           "unnamed": ("keep", "erase")}


# (lowest value, whether the lowest itself is allowed); every float must also be finite
BOUNDS = {"steps": (1, True), "lr": (0, False), "batch_size": (1, True), "grad_accum": (1, True),
          "weight_decay": (0, True), "max_grad_norm": (0, True), "resolution": (0, True), "checkpoint_every": (0, True)}
PROBABILITIES = ("flip_p", "reg_fraction")


def check_settings(cfg) -> None:
    """Every number a setting can take, checked once, before any model loads."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"setting {f.name} must be a finite number, got {v}: fix --param {f.name} (or its option)")
        low, inclusive = BOUNDS.get(f.name, (None, True))
        if f.name in PROBABILITIES:
            low, inclusive = 0, True
            if v > 1:
                raise UserError(f"setting {f.name} is a probability, got {v}: give a value from 0 to 1")
        if low is not None and (v < low or (v == low and not inclusive)):
            bound = f"at least {low}" if inclusive else f"greater than {low}"
            raise UserError(f"setting {f.name} must be {bound}, got {v}: fix --param {f.name} (or its option)")


def apply_values(cfg, values: dict[str, object]):
    """Typed settings (the Python API's) onto a config dataclass: each value must have
    its setting's type (an int where a float is wanted is fine); then every number is checked."""
    known = {f.name for f in fields(cfg)}
    for key, val in values.items():
        require(key in known, f"{type(cfg).__name__} has no setting {key!r}: see `multiconcept methods` for the list")
        cur = getattr(cfg, key)
        kind = type(cur)
        ok = isinstance(val, kind) and not (isinstance(val, bool) and kind is not bool)
        if kind is float and isinstance(val, int) and not isinstance(val, bool):
            val, ok = float(val), True
        if kind is tuple and isinstance(val, list):
            val, ok = tuple(val), True
        require(ok, f"setting {key}={val!r} must be of type {kind.__name__}: fix the value")
        if key in CHOICES:
            require(val in CHOICES[key], f"{key} must be one of {', '.join(CHOICES[key])}, got {val!r}")
        setattr(cfg, key, val)
    check_settings(cfg)
    return cfg


def apply_overrides(cfg, overrides: dict[str, str]):
    """--param key=value strings onto a config dataclass, typed by its defaults."""
    known = {f.name: f for f in fields(cfg)}
    for k, v in overrides.items():
        key = k.replace("-", "_")
        if key not in known:
            raise UserError(f"{type(cfg).__name__} has no setting {k!r}: see `multiconcept methods` for the list")
        cur = getattr(cfg, key)
        try:
            if isinstance(cur, bool):
                val = v.lower() in ("1", "true", "yes", "on")
                if v.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError(v)
            elif isinstance(cur, tuple):
                val = tuple(x.strip() for x in v.split("|"))
                if cur and isinstance(cur[0], int):
                    val = tuple(int(x) for x in val)
            else:
                val = type(cur)(v)
        except ValueError as e:
            raise UserError(f"setting {k}={v!r} is not a valid {type(cur).__name__}: fix the value") from e
        if key in CHOICES and val not in CHOICES[key]:
            raise UserError(f"{key} must be {', '.join(CHOICES[key][:-1])} or {CHOICES[key][-1]}, got {val!r}: "
                            f"fix --param {key}")
        setattr(cfg, key, val)
    check_settings(cfg)
    return cfg


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
        self.tokens: TrainableTokens | None = None

    # -- parameterisation -------------------------------------------------
    def setup(self) -> list[dict]:
        """Make the trainable tensors; return optimiser param groups."""
        raise NotImplementedError

    def add_trainable_tokens(self) -> TrainableTokens:
        te = self.base.text_encoder
        new_ids = add_concept_tokens(self.base.tokenizer, te, self.concepts)
        self.tokens = TrainableTokens(te.get_input_embeddings(), new_ids)
        te.set_input_embeddings(self.tokens)
        return self.tokens

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
            hyperparameters={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.cfg).items()},
            extra=self.bundle_extra(),
            tensors=self.bundle_tensors(),
        )

    def token_rows(self) -> dict[str, torch.Tensor]:
        assert self.tokens is not None
        return {f"token_embedding/{c.token}": self.tokens.rows[i].detach().clone() for i, c in enumerate(self.concepts)}

    # -- generation -------------------------------------------------------
    @classmethod
    def prompt_phrase(cls, token: str, class_word: str) -> str:
        """How a prompt names one of this method's concepts: '<cat1> cat' (Infusion: 'cat')."""
        return cls.concept_type(token, class_word).phrase

    @classmethod
    def apply(cls, base: Base, bundle: Bundle) -> None:
        """Load a bundle into a base pipeline for generation (default: tokens + deltas)."""
        rows = bundle.with_prefix("token_embedding/")
        if rows:
            set_token_rows(base.tokenizer, base.text_encoder, rows)
        deltas = bundle.with_prefix("unet_delta/")
        if deltas:
            params = dict(base.unet.named_parameters())
            for name, d in deltas.items():
                if name not in params:
                    raise UserError(f"bundle changes {name}, which this base's UNet does not have: "
                                    "the bundle is for another base")
                with torch.no_grad():
                    params[name].add_(d.to(params[name]))
