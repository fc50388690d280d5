"""Infusion (Zeng et al., arXiv 2404.14007, 2024): a concept in one vector per layer.

Prompts name the concept by its plain class word ("a photo of a cat"); no
token is added. The only trained tensors are one zero-initialised vector
Δv_l ∈ R^{d_l} per cross-attention layer, added to that layer's VALUE at the
class word's token positions, on the conditional branch of classifier-free
guidance only:

    out_l = softmax(Q·K_baseᵀ/√d) · (V_base + 1[j = j*]·Δv_l)

so each layer's attention probabilities — where things go — are the base
model's for that layer's input ("dual stream"; the queries of later layers
do see the customised features of earlier ones, as in the reference code),
and a prompt without the class word is computed exactly as by the base.
`key_residual` adds Δk_l to the key too, as the released code's
fast path does; it breaks the "attention stays the base's" property and is
off by default. Loss: ε-MSE weighted by a soft foreground mask of the
concept (the user's mask, else one derived from the base's own
cross-attention on the class word, see `attention_foreground_mask`).

Residuals are added by forward hooks on every ``attn2.to_v`` (and
``to_k``), so they compose with any attention processor that calls those
modules (SDPA, the attention-capture processor) and with other methods'
bundles. Which rows and positions get a residual is decided per UNet call
by `ClassWordResiduals` (see there): in training from the batch's captions,
in generation from the prompts the pipeline encoded.

Size (SD 1.5: 16 attn2 layers, Σ d_l = 12,480): 24,960 bytes in fp16,
value-only; `benchmarks/bench_infusion_size.py` prints it from the config.
The paper's "11 KB" is not what this arithmetic gives.

On a transformer base (FLUX, SD3) the value that carries the text into the
image is the text stream's (add_v_proj) in the joint blocks
(models/text_attention.py): one residual per joint block, at the class
word's positions of the conditioning sequence (models/flow.py), on the
conditional call only. Unlike a UNet's cross-attention, the joint block's
text tokens also attend to each other, so the residual moves the text
stream later blocks read as well.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..bundle import Bundle
from ..data import Example, center_square, to_tensor
from ..errors import UserError, require
from ..models.conditioning import added_conditioning, encode_prompts
from ..models.text_attention import (
    cross_attention_layers,  # noqa: F401  (re-exported: tests and benchmarks)
    projection,
    text_attention_layers,
)
from ..prompts import Concept, find_word_spans, token_positions, tokenize_checked
from . import register
from .base import Method, TrainConfig
from .settings import hp

# The released code's caption templates (infusion/dataset.py), the concept
# filled in as its plain class word.
INFUSION_TEMPLATES = (
    "a photo of a {}", "a good photo of a {}", "the photo of a {}", "a good photo of the {}",
    "image of a {}", "image of the {}", "A photograph of {}", "A {} shown in a photo", "A photo of {}",
    "A {}", "{}",
)
MIRROR_SUFFIX = " (mirrored)"
VALUE_PREFIX, KEY_PREFIX = "value_residual/", "key_residual/"
STORE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class InfusionConfig(TrainConfig):
    # Infusion paper / released config (SD 1.5): AdamW lr 0.01 (0.03 for SD 2.1),
    # batch 4 x accumulation 4, 500 steps, fp16, h-flip 0.5
    steps: int = hp(500, "optimiser steps (paper: 500)")
    lr: float = hp(0.01, "learning rate (paper: 0.01 for SD 1.5, 0.03 for SD 2.1), not scaled")
    scale_lr: bool = hp(False, "multiply lr by batch x accumulation x processes (the paper does not)")
    batch_size: int = hp(4, "images per micro-batch (paper: 4)")
    grad_accum: int = hp(4, "micro-batches per step (paper: 4)")
    augment: bool = hp(False, "the loop's scale augmentation (+flip); off: Infusion uses h-flip only, see `flip`")
    flip: bool = hp(True, "horizontal flip with p 0.5 (paper), done by adding each image's mirror to the set")
    templates: tuple = hp(INFUSION_TEMPLATES, "caption templates; {} becomes the plain class word (paper's 11)")
    key_residual: bool = hp(False, "also add a residual to the KEY (released code); attention then differs from the base's")
    derive_mask: bool = hp(True, "without a user mask, weight the loss by the base's attention map of the class word")
    store_dtype: str = hp("fp16", "dtype of the residuals in the bundle: fp16 | bf16 | fp32", choices=tuple(STORE_DTYPES))


class ClassWordConcept(Concept):
    """A concept its captions name by the class word alone ("a photo of a cat")."""

    @property
    def phrase(self) -> str:
        return self.class_word


def bundle_token(class_word: str) -> str:
    """The bundle's name for a concept; it never appears in prompts."""
    return f"<infusion:{'_'.join(class_word.split())}>"


ENCODED_KEPT = 64  # prompts encoded lately whose rows a denoiser call may carry (cond and negative, per call)


def class_word_positions(tokenizer, prompt: str, words) -> dict[str, list[int]]:
    """Token indices of every occurrence of each word in `prompt`; absent words are left out."""
    present = [w for w in words if find_word_spans(prompt, w)]
    if not present:
        return {}
    enc = tokenize_checked(tokenizer, prompt)
    return {w: [p for s in find_word_spans(prompt, w) for p in token_positions(enc, s)] for w in present}


# ---------------------------------------------------------------- the residual hooks

class ClassWordResiduals:
    """Adds each concept's residuals to attn2 V (and K) at its class word, cond rows only.

    One per base (``Base.infusion``). Per UNet call a pre-hook builds
    ``selection`` (concept batch token, 1 at the class word's positions of a
    row) from one of two sources:
    - training: `set_rows` with each batch row's positions (from its caption);
    - generation: the prompts the pipeline last passed to `encode_prompt`,
      wrapped here, or handed over by the encoder that built them (SDXL,
      `saw_prompts`). A row gets positions only if it equals one of the
      conditional embeddings seen — so unconditional rows
      (negative prompt), and any UNet call on embeddings we did not see
      encoded, stay untouched. When that call used guidance and the UNet
      batch is twice its conditional rows, the first half (diffusers puts
      [uncond, cond]) is never customised, even if a negative prompt equals
      the prompt. A pipeline called with ready-made ``prompt_embeds`` (no
      prompt text) gets residuals only on rows equal to embeddings
      `saw_prompts` was given with their text: else there is no class word to find.
    """

    def __init__(self, base):
        self.pipe, self.owner = base.pipe, base  # owner: the Base whose `infusion` field holds this
        self.tokenizer = base.sequence_tokenizer
        self.concepts: dict[str, dict] = {}  # class word -> {"value": {layer: Δ}, "key": {layer: Δ}, "source": str}
        self.rows: list[dict[str, list[int]]] | None = None
        self.encoded: list[tuple[str, torch.Tensor]] = []  # (prompt, its conditional embedding)
        self.cfg_rows = 0  # conditional rows of the last encode_prompt call when it used guidance
        self.selection: torch.Tensor | None = None
        self.words: list[str] = []
        self.handles = [base.denoiser.register_forward_pre_hook(self._before_unet, with_kwargs=True),
                        base.denoiser.register_forward_hook(self._after_unet, always_call=True)]
        for layer, attn in text_attention_layers(base).items():
            for kind in ("value", "key"):
                module = getattr(attn, projection(base, kind))
                self.handles.append(module.register_forward_hook(self._residual_hook(layer, kind)))
        self._wrap_encode_prompt()

    # -- install / remove
    @classmethod
    def of(cls, base) -> "ClassWordResiduals":
        if base.infusion is None:
            base.infusion = cls(base)
        return base.infusion

    def add(self, class_word: str, value: dict, key: dict, source: str) -> None:
        if class_word in self.concepts:
            raise UserError(
                f"two Infusion concepts customise the class word {class_word!r} ({self.concepts[class_word]['source']} "
                f"and {source}): a prompt could not tell them apart; load one of them, or re-learn one on another class word"
            )
        self.concepts[class_word] = {"value": value, "key": key, "source": source}

    def remove(self, class_word: str) -> None:
        self.concepts.pop(class_word, None)
        if not self.concepts:
            self.uninstall()

    def uninstall(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.pipe.__dict__.pop("encode_prompt", None)
        if self.owner is not None and self.owner.infusion is self:
            self.owner.infusion = None

    # -- positions
    def set_rows(self, rows: list[dict[str, list[int]]] | None) -> None:
        """Explicit per-row positions for the next UNet calls (training); None = from encoded prompts."""
        self.rows = rows

    def _wrap_encode_prompt(self) -> None:
        original = type(self.pipe).encode_prompt.__get__(self.pipe)
        signature = inspect.signature(original)

        def encode_prompt(*args, **kwargs):
            out = original(*args, **kwargs)
            call = signature.bind(*args, **kwargs)
            prompt = call.arguments.get("prompt")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
            if prompts:  # a call with ready-made embeddings keeps what the encoder that made them handed over
                self.saw_prompts(prompts, out[0], bool(call.arguments.get("do_classifier_free_guidance")))
            return out

        self.pipe.encode_prompt = encode_prompt

    def saw_prompts(self, prompts: list[str], cond: torch.Tensor, guidance: bool = True) -> None:
        """The conditional embeddings the next denoiser calls will see, from `encode_prompt` or, on SDXL, from
        `models.conditioning.pipeline_conditioning`, which encodes for the pipeline. With guidance the
        pipeline puts [uncond; cond] in one batch: only the second half may be customised. FLUX's and FLUX.2's
        pipelines encode the negative prompt by a call of its own and run it as a denoiser call of its own, so
        the prompts of the last few calls are kept (a row is matched by its embedding, exactly)."""
        per_prompt = cond.shape[0] // max(len(prompts), 1)
        # rows are grouped per prompt: num_images_per_prompt repeats of each
        self.encoded = (self.encoded + [(p, cond[i * per_prompt]) for i, p in enumerate(prompts)])[-ENCODED_KEPT:]
        self.cfg_rows = cond.shape[0] if guidance else 0

    def _rows_from_encoded(self, text: torch.Tensor) -> list[dict[str, list[int]]]:
        batch = text.shape[0]
        first = self.cfg_rows if self.cfg_rows and batch == 2 * self.cfg_rows else 0
        rows: list[dict[str, list[int]]] = [{} for _ in range(batch)]
        for b in range(first, batch):
            for prompt, emb in self.encoded:
                if emb.shape == text[b].shape and torch.equal(emb.to(text.dtype), text[b]):
                    rows[b] = class_word_positions(self.tokenizer, prompt, self.concepts)
                    break
        return rows

    def _before_unet(self, module, args, kwargs):
        self.selection = None
        if not self.concepts:
            return
        text = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if text is None:
            return
        rows = self.rows if self.rows is not None else self._rows_from_encoded(text)
        if len(rows) != text.shape[0]:
            raise RuntimeError(f"Infusion has positions for {len(rows)} rows but the UNet batch has {text.shape[0]}")
        self.words = list(self.concepts)
        sel = torch.zeros(len(self.words), text.shape[0], text.shape[1], device=text.device)
        for b, positions in enumerate(rows):
            for word, idx in positions.items():
                if word in self.concepts:
                    sel[self.words.index(word), b, idx] = 1.0
        self.selection = sel if bool(sel.any()) else None

    def _after_unet(self, module, args, out):
        # outside a UNet call no projection is customised (gradient checkpointing,
        # which re-runs projections after the forward, is therefore not supported)
        self.selection = None

    def _residual_hook(self, layer: str, kind: str):
        # outside torch.compile's graph (models/compiled.py): the rows it adds change with every caption
        @torch.compiler.disable
        def hook(module, args, out):
            sel = self.selection
            if sel is None:
                return None  # outside a UNet call, or no concept's class word in this batch
            if sel.shape[1] != out.shape[0]:
                raise RuntimeError(f"Infusion prepared {sel.shape[1]} rows but {layer}.{kind} sees {out.shape[0]}")
            deltas = [self.concepts[w][kind].get(layer) for w in self.words]
            if all(d is None for d in deltas):
                return None
            stacked = torch.stack([d if d is not None else out.new_zeros(out.shape[-1]) for d in deltas])
            # concept batch token × concept dim → batch token dim
            return out + torch.einsum("cbt,cd->btd", sel.to(out.dtype), stacked.to(out.dtype))

        return hook


# ---------------------------------------------------------------- mask from attention

@torch.no_grad()
def attention_foreground_mask(base, image: Image.Image, class_word: str, timesteps=(250, 500, 750),
                              seed: int = 0) -> Image.Image:
    """A soft foreground mask of `class_word` in `image` from the BASE's own cross-attention.

    The image is noised to a few timesteps, the base UNet denoises it with
    "a photo of a <class word>", and the class word's attention maps (mean
    over heads, layers, resolutions and timesteps), smoothed and min-max
    normalised, are the mask. Stands in for the reference code's CLIPSeg
    masks when the user gives none. Returned at the image's size (zero
    outside the centre square the training crop keeps). On a transformer base
    the maps are the joint blocks' image→text attention (joint_attention.py),
    the image noised along the rectified flow to σ = t / 1000.
    """
    from ..attention import gaussian_smooth, minmax_normalize
    from ..latents import latent_scale

    vae = base.vae
    square = center_square(image)
    z0 = vae.encode(to_tensor(square, base.resolution)[None].to(base.device, vae.dtype)).latent_dist.mean.float()
    z0 = (z0 - (getattr(vae.config, "shift_factor", None) or 0.0)) * latent_scale(vae)
    prompt = INFUSION_TEMPLATES[0].format(class_word)
    positions = class_word_positions(base.sequence_tokenizer, prompt, [class_word])[class_word]
    noise_gen = torch.Generator().manual_seed(seed)
    maps = (_flow_class_maps if base.flow is not None else _unet_class_maps)(base, z0, prompt, positions, timesteps,
                                                                            noise_gen)
    m = minmax_normalize(gaussian_smooth(maps))[0]  # h w in [0, 1]
    soft = Image.fromarray((m.cpu().numpy() * 255).round().astype("uint8"), "L").resize(square.size, Image.BILINEAR)
    full = Image.new("L", image.size, 0)
    w, h = image.size
    s = min(w, h)
    full.paste(soft, ((w - s) // 2, (h - s) // 2))
    return full


def _unet_class_maps(base, z0, prompt, positions, timesteps, gen) -> torch.Tensor:
    """1 h w: the class word's cross-attention, mean over timesteps, heads, layers and resolutions (at the finest)."""
    from diffusers import DDPMScheduler

    from ..attention import AttentionStore, capture_attention

    dev, unet = base.device, base.unet
    sched = DDPMScheduler.from_config(base.pipe.scheduler.config)
    t = torch.tensor(timesteps, device=dev)
    noise = torch.randn((len(t), *z0.shape[1:]), generator=gen).to(dev)
    zt = sched.add_noise(z0.expand(len(t), -1, -1, -1), noise, t)
    cond = encode_prompts(base, [prompt])
    text = cond.hidden.expand(len(t), -1, -1).to(unet.dtype)
    pooled = cond.pooled.expand(len(t), -1).to(unet.dtype) if cond.pooled is not None else None
    store = AttentionStore(resolutions=None, token_indices=positions)
    with capture_attention(unet, store):
        unet(zt.to(unet.dtype), t, text, added_cond_kwargs=added_conditioning(base, pooled, base.resolution, base.resolution))
    size = max(store.captured_resolutions)
    maps = [F.interpolate(store.maps(r).float().mean(1, keepdim=True), size=(size, size), mode="bilinear",
                          align_corners=False) for r in store.captured_resolutions]
    return torch.stack(maps).mean(0).mean(0)


def _flow_class_maps(base, z0, prompt, positions, timesteps, gen) -> torch.Tensor:
    """1 h w: the class word's image→text joint attention, mean over σ = t / 1000, heads and joint blocks."""
    from ..attention import AttentionStore
    from ..joint_attention import capture_joint_attention

    dev, dt = base.device, base.denoiser.dtype
    z0 = base.flow.to_model(base.pipe, z0)
    t = torch.tensor(timesteps, device=dev, dtype=torch.float32)
    sigma = (t / 1000).view(-1, 1, 1, 1)
    noise = torch.randn((len(t), *z0.shape[1:]), generator=gen).to(dev)
    zt = (1 - sigma) * z0 + sigma * noise
    cond = encode_prompts(base, [prompt])
    text = cond.hidden.expand(len(t), -1, -1).to(dt)
    pooled = cond.pooled.expand(len(t), -1).to(dt) if cond.pooled is not None else None
    store = AttentionStore(resolutions=None, token_indices=positions)
    with capture_joint_attention(base.denoiser, store, base.flow):
        base.flow.predict(base.pipe, zt.to(dt), t.to(dt), text, pooled, InfusionConfig.guidance)
    return store.maps().float().mean(1).mean(0, keepdim=True)


# ---------------------------------------------------------------- the method

@register
class Infusion(Method):
    name = "infusion"
    Config = InfusionConfig
    concept_type = ClassWordConcept

    def __init__(self, base, data, cfg: InfusionConfig):
        super().__init__(base, data, cfg)
        words = [c.class_word for c in data.concepts]
        require(len(set(words)) == len(words),
                f"Infusion names concepts by their class words, and {words} repeats one: "
                "learn them in separate runs on distinct class words")
        require(all("/" not in w for w in words), f"class words {words} must not contain '/': use plain words")
        # The loop builds captions from concept.phrase and samples data.examples
        # of this same ConceptSet, so it is prepared in place: class-word
        # captions, derived masks, then mirrored copies (h-flip with p 0.5).
        data.concepts[:] = [c if isinstance(c, ClassWordConcept) else ClassWordConcept(c.token, c.class_word, c.initializer)
                            for c in data.concepts]
        self.concepts = data.concepts
        self.derived_masks = 0
        if cfg.derive_mask:
            for ex in data.examples:
                for tok in ex.tokens:
                    if tok not in ex.masks:
                        ex.masks[tok] = attention_foreground_mask(base, ex.image, data.concept(tok).class_word, seed=cfg.seed)
                        self.derived_masks += 1
        if cfg.flip and not any(ex.source.endswith(MIRROR_SUFFIX) for ex in data.examples):
            data.examples.extend([Example(ex.image.transpose(Image.FLIP_LEFT_RIGHT), list(ex.tokens),
                                          {t: m.transpose(Image.FLIP_LEFT_RIGHT) for t, m in ex.masks.items()},
                                          ex.source + MIRROR_SUFFIX) for ex in list(data.examples)])

    # -- parameterisation
    def setup(self):
        layers = text_attention_layers(self.base)
        value_of, key_of = projection(self.base, "value"), projection(self.base, "key")
        dev = self.base.device
        self.residuals: dict[str, dict[str, dict[str, nn.Parameter]]] = {}
        for c in self.concepts:
            value = {l: nn.Parameter(torch.zeros(getattr(a, value_of).out_features, device=dev)) for l, a in layers.items()}
            key = {l: nn.Parameter(torch.zeros(getattr(a, key_of).out_features, device=dev)) for l, a in layers.items()} \
                if self.cfg.key_residual else {}
            self.residuals[c.class_word] = {"value": value, "key": key}
        self.hooks = ClassWordResiduals.of(self.base)
        for word, r in self.residuals.items():
            self.hooks.add(word, r["value"], r["key"], "this training run")
        return [{"params": list(self.named_trainables().values())}]

    def named_trainables(self):
        return {f"{prefix}{word}/{layer}": p
                for word, r in self.residuals.items()
                for prefix, kind in ((VALUE_PREFIX, "value"), (KEY_PREFIX, "key"))
                for layer, p in r[kind].items()}

    def trainable_state(self):
        return {k: v.detach().clone() for k, v in self.named_trainables().items()}

    # -- losses: the masked ε-MSE of the loop; this hook only places the residuals
    def attention_store(self, batch: dict):
        """Called by the loop before each UNet call: set each row's class-word positions.

        Regularisation samples (``target`` False) get none: Infusion names its
        concept by the class word, so a class prompt would carry the concept.
        """
        words = [c.class_word for c in self.concepts]
        tokenizer = self.base.sequence_tokenizer
        self.hooks.set_rows([class_word_positions(tokenizer, p, words) if target else {}
                             for p, target in zip(batch["prompts"], batch["target"])])
        return None

    def teardown(self):
        self.hooks.set_rows(None)
        for word in self.residuals:
            self.hooks.remove(word)

    # -- results
    def bundle_tensors(self):
        dtype = STORE_DTYPES[self.cfg.store_dtype]
        return {k: v.detach().to(dtype).cpu().clone() for k, v in self.named_trainables().items()}

    def bundle_extra(self):
        return {"key_residual": self.cfg.key_residual, "layers": len(next(iter(self.residuals.values()))["value"]),
                "derived_masks": self.derived_masks, "prompts_use": "class word"}

    def to_bundle(self) -> Bundle:
        b = super().to_bundle()
        b.tokens = [bundle_token(w) for w in b.class_words]
        return b

    # -- generation
    @classmethod
    def apply(cls, base, bundle: Bundle) -> None:
        layers = text_attention_layers(base)
        dtype = base.denoiser.dtype
        ctl = ClassWordResiduals.of(base)
        for word in bundle.class_words:
            for kind, prefix in (("value", VALUE_PREFIX), ("key", KEY_PREFIX)):
                for name, d in bundle.with_prefix(f"{prefix}{word}/").items():
                    proj = getattr(layers[name], projection(base, kind)) if name in layers else None
                    if proj is None or proj.out_features != d.numel():
                        raise UserError(f"Infusion bundle for {word!r} has a {kind} residual for layer {name} "
                                        f"({d.numel()} values) that this base's {base.denoiser_label} does not have: "
                                        "use the base it was learned on")
            value = {n: d.to(base.device, dtype) for n, d in bundle.with_prefix(f"{VALUE_PREFIX}{word}/").items()}
            key = {n: d.to(base.device, dtype) for n, d in bundle.with_prefix(f"{KEY_PREFIX}{word}/").items()}
            require(bool(value), f"Infusion bundle {bundle.tokens} holds no value residual for {word!r}: re-learn it")
            ctl.add(word, value, key, f"bundle {bundle_token(word)} ({bundle.base_name})")

    @classmethod
    def remove(cls, base) -> None:
        """Take every Infusion concept off `base` (the pipeline is as loaded again)."""
        if base.infusion is not None:
            base.infusion.uninstall()
