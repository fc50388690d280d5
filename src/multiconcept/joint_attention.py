"""Image→text attention maps from a flow transformer's joint attention (FLUX.1, FLUX.2 [klein], SD3 / 3.5).

In a double-stream ("joint") block the text and image tokens are projected separately and one softmax runs
over the concatenated keys. The analogue of a UNet's cross-attention map is the block of those
probabilities where image tokens query text keys, renormalised over the text keys; renormalising a softmax
over a subset of its keys is the softmax over that subset alone, so the map is

    A = softmax(Q_image · K_textᵀ / √d)            batch heads image_token text_token

computed from the block's own Q and K after its q/k RMS norms and (FLUX) the rotary embedding of each
token's position, exactly as the block's processor makes them. The block's output is computed as its
processor computes it (SDPA over the whole sequence), so a captured block gives the same result as an
uncaptured one; only the maps cost extra, and only on the blocks a store asks for.

`JointCaptureProcessor` mirrors diffusers' FluxAttnProcessor, Flux2AttnProcessor and JointAttnProcessor2_0
line for line where they differ: the order of the sequence ([text; image] on FLUX, [image; text] on SD3),
rotary embeddings (FLUX), the text output projection (skipped by SD3's last block, `context_pre_only`).

    store = AttentionStore(with_grad=True)
    with capture_joint_attention(base.denoiser, store, base.flow):
        pred = base.flow.predict(...)
    maps = store.maps()     # batch token h w over the image-token grid, mean over heads and captured blocks
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from .attention import AttentionStore
from .errors import UserError


def _plain_processors() -> tuple:
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor

    return FluxAttnProcessor, Flux2AttnProcessor, JointAttnProcessor2_0


def joint_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, image_rotary_emb, text_first: bool):
    """The joint attention's query, key and value, ``batch heads sequence dim``, as the block's processor makes
    them: per-stream projections and q/k norms, concatenated ([text; image] or [image; text]), then the rotary
    embedding over the whole sequence (FLUX)."""
    from diffusers.models.embeddings import apply_rotary_emb

    heads = attn.heads
    img = [attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)]
    txt = [attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
           attn.add_v_proj(encoder_hidden_states)]
    img = [x.unflatten(-1, (heads, -1)) for x in img]  # batch sequence heads dim
    txt = [x.unflatten(-1, (heads, -1)) for x in txt]
    norms = [(attn.norm_q, attn.norm_k), (attn.norm_added_q, attn.norm_added_k)]
    for stream, (nq, nk) in zip((img, txt), norms):
        if nq is not None:
            stream[0] = nq(stream[0])
        if nk is not None:
            stream[1] = nk(stream[1])
    q, k, v = (torch.cat([t, i] if text_first else [i, t], dim=1) for i, t in zip(img, txt))
    if image_rotary_emb is not None:
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def image_text_probabilities(q: torch.Tensor, k: torch.Tensor, n_text: int, text_first: bool) -> torch.Tensor:
    """softmax over the text keys of the image queries' scores, in float32: ``batch heads image text``."""
    if text_first:
        q_img, k_txt = q[:, :, n_text:], k[:, :, :n_text]
    else:
        q_img, k_txt = q[:, :, : q.shape[2] - n_text], k[:, :, k.shape[2] - n_text:]
    scores = torch.matmul(q_img.float(), k_txt.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1)


class JointCaptureProcessor:
    """The block's processor with the image→text maps recorded into `store` (see the module's docstring);
    a call without text (a single-stream block) goes to `fallback`."""

    def __init__(self, store: AttentionStore, name: str, fallback, text_first: bool):
        self.store, self.name, self.fallback, self.text_first = store, name, fallback, text_first

    @torch.compiler.disable  # as CaptureAttnProcessor's (attention.py): new every step, writes a Python store
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 *args, **kwargs):
        if encoder_hidden_states is None or attention_mask is not None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                 *args, **kwargs)
        n_text = encoder_hidden_states.shape[1]
        q, k, v = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb, self.text_first)
        self.store.record(self.name, image_text_probabilities(q, k, n_text, self.text_first), self.store.latent_hw)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)  # batch sequence (heads dim)
        if self.text_first:
            text, image = out[:, :n_text], out[:, n_text:]
        else:
            image, text = out[:, : out.shape[1] - n_text], out[:, out.shape[1] - n_text:]
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        if not getattr(attn, "context_pre_only", False):  # SD3's last block leaves its text output unprojected
            text = attn.to_add_out(text.contiguous())
        return image, text


@contextmanager
def capture_joint_attention(transformer, store: AttentionStore, flow, blocks: list[str] | None = None,
                            skip_uncond: bool = False) -> Iterator[AttentionStore]:
    """Install JointCaptureProcessor on the transformer's joint blocks (`blocks`: their names in
    `flow.text_attention`, None for all); restore on exit. A forward pre-hook tells the store the image-token
    grid of each call. `skip_uncond`: record nothing in calls the pipeline names "uncond" (FLUX and FLUX.2
    run the unconditional branch as a call of its own, inside `transformer.cache_context("uncond")`)."""
    layers = flow.text_attention(transformer)
    chosen = list(layers) if blocks is None else blocks
    unknown = [b for b in chosen if b not in layers]
    if unknown:
        raise UserError(f"no joint attention block {unknown[0]} in this transformer: choose among "
                        f"{', '.join(layers)}")
    plain = _plain_processors()
    previous = {name: layers[name].processor for name in chosen}
    for name, proc in previous.items():
        if isinstance(proc, JointCaptureProcessor):
            raise ValueError(f"{name} is already capturing: one capture_joint_attention per transformer at a time.")
        if type(proc) not in plain:
            raise UserError(f"cannot capture attention on {name}: its processor {type(proc).__name__} is not the "
                            "plain joint attention and capture would bypass it")
    state = {"call": None}
    own_context = getattr(transformer, "cache_context", None)  # SD3's transformer has none: it batches [uncond; cond]

    @contextmanager
    def named_call(name, **kw):
        state["call"] = name
        try:
            with own_context(name, **kw):
                yield
        finally:
            state["call"] = None

    for name in chosen:
        layers[name].set_processor(JointCaptureProcessor(store, name, previous[name], flow.text_first))
    if own_context is not None:
        transformer.cache_context = named_call
    try:
        with store.recording(transformer, flow.token_grid, lambda: not (skip_uncond and state["call"] == "uncond")):
            yield store
    finally:
        if own_context is not None:
            del transformer.cache_context
        for name, proc in previous.items():
            layers[name].set_processor(proc)
