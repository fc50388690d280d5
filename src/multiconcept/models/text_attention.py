"""Where the text enters attention, for either family: the one seam the methods ask through.

- UNet (SD 1.x, 2.x, SDXL): the cross-attention layers (``attn2``); their key and value projections
  (``to_k`` / ``to_v``) read text only, their query (``to_q``) the image.
- Transformer (FLUX.1, FLUX.2 [klein], SD3): the joint (double-stream) blocks' attention, where the text tokens
  have projections of their own (``add_k_proj`` / ``add_v_proj``) and one softmax runs over [text; image] keys
  (models/flow.py). Single-stream blocks' K/V also serve the image's self-attention, so they are no analogue;
  the text stream's query (``add_q_proj``) asks for the text tokens, not the image, so neither is it of the
  UNet's image query. One difference to state: in a joint block the text tokens also attend to each other, so
  changed K/V move the text stream that later blocks read.
"""

from __future__ import annotations

from ..errors import UserError

KINDS = {"to_k": "key", "to_v": "value", "to_q": "query"}  # the UNet's names, as methods' settings spell them
PROJECTIONS = {"unet": {"key": "to_k", "value": "to_v", "query": "to_q"},
               "transformer": {"key": "add_k_proj", "value": "add_v_proj"}}


def cross_attention_layers(unet) -> dict:
    """A UNet's attn2 modules by name, e.g. 'down_blocks.0.attentions.0.transformer_blocks.0.attn2'."""
    return {name: m for name, m in unet.named_modules() if name.split(".")[-1] == "attn2"}


def text_attention_layers(base) -> dict:
    """{name: attention module} of every layer where the image reads the text."""
    if base.flow is not None:
        return base.flow.text_attention(base.denoiser)
    return cross_attention_layers(base.unet)


def projection(base, kind: str) -> str:
    """The module name, within a text-attention layer, of its `kind` projection ("key", "value", "query")."""
    names = PROJECTIONS[base.denoiser_name]
    if kind not in names:
        raise UserError(f"a {base.architecture} transformer's joint attention has no {kind} projection that reads "
                        f"only the text (its image query also serves the image's self-attention): leave to_q out "
                        f"(train_projections=to_k,to_v; DisenDiff: train_qkv=false)")
    return names[kind]


def text_projections(base, kinds) -> dict[str, object]:
    """{name in the denoiser: module} of the `kinds` projections ("key", "value", "query") of every text layer."""
    return {f"{layer}.{projection(base, k)}": getattr(attn, projection(base, k))
            for layer, attn in text_attention_layers(base).items() for k in kinds}


def projection_kinds(names) -> tuple[str, ...]:
    """Settings' projection names (to_k, to_v, to_q) as kinds."""
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise UserError(f"unknown attention projection {unknown[0]!r}: use to_k, to_v or to_q")
    return tuple(KINDS[n] for n in names)


def first_text_token_is_constant(base) -> bool:
    """Whether every prompt's text sequence starts with the same token (CLIP's start-of-text; FLUX.2 [klein]'s
    chat template's <|im_start|>); T5's (FLUX.1) starts with the prompt's first word."""
    return base.flow is None or base.flow.constant_first_token
