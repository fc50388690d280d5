"""Cross-attention maps: capture them from a diffusers UNet, aggregate, smooth.

Since diffusers 0.35 the default `AttnProcessor2_0` calls SDPA, which never
forms the attention probabilities. To read them we install
`CaptureAttnProcessor` on the cross-attention (``attn2``) layers: on a call
whose query map has a requested resolution it computes softmax(Q·Kᵀ·scale)
explicitly, hands the probabilities to an `AttentionStore` and returns the
same output AttnProcessor2_0 would; on any other call it delegates to the
layer's previous processor, so non-captured layers keep SDPA speed.

    store = AttentionStore(resolutions=[16], with_grad=True)
    with capture_attention(unet, store):
        noise_pred = unet(latents, t, encoder_hidden_states=text).sample
    maps = store.maps(16)            # batch token h w, softmax over all tokens

Shapes are written as words: ``batch heads query token`` etc.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)

from .errors import UserError

# Processors that compute plain softmax(QKᵀ·scale)V from attn.to_q/to_k/to_v.
# Replacing them by explicit math on a captured call changes nothing but
# speed. Anything else (IP-Adapter, Custom-Diffusion processors, fused QKV)
# carries its own weights or projections that explicit math would bypass.
PLAIN_PROCESSORS = (AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor, XFormersAttnProcessor)

# Latent downsampling levels we search when mapping a query length to (h, w).
MAX_LEVELS = 8


# ---------------------------------------------------------------- helpers


def exists(x) -> bool:
    return x is not None


def _pyramid(height: int, width: int) -> Iterator[tuple[int, int]]:
    """(h, w) of each UNet level: a stride-2, pad-1, 3×3 conv gives ceil(x/2)."""
    h, w = height, width
    for _ in range(MAX_LEVELS):
        yield h, w
        if h == 1 and w == 1:
            return
        h, w = (h + 1) // 2, (w + 1) // 2


# ---------------------------------------------------------------- store


class AttentionStore:
    """Collects cross-attention probabilities as maps ``batch heads token h w``.

    Args:
        resolutions: short sides of the query maps to keep (16 = the 16×16
            layers of SD 1.5 at 512 px, DisenDiff's choice); None keeps all.
            For a non-square latent the short side is matched (16×24 → 16).
        token_indices: token positions to keep, ``(k,)`` for every sample or
            ``(batch, k)`` per sample (batch after `batch_slice`); None keeps
            all. Softmax is over all tokens first, so kept maps still hold the
            probability mass they had among all 77.
        with_grad: keep the autograd graph (training losses on the maps);
            False stores detached copies.
        accumulate: keep a running sum per layer over calls (sampling: one
            map per layer over all denoising steps) instead of every call.
        batch_slice: keep only these samples of each call: a ``slice``, or
            ``"cond"`` / ``"uncond"`` for the second / first half of a
            classifier-free-guidance batch (diffusers puts uncond first).
    """

    def __init__(
        self,
        resolutions: Iterable[int] | None = None,
        token_indices: Sequence[int] | torch.Tensor | None = None,
        with_grad: bool = False,
        accumulate: bool = False,
        batch_slice: slice | str | None = None,
    ):
        if with_grad and accumulate:
            raise ValueError(
                "AttentionStore(with_grad=True, accumulate=True) would keep the graph of every "
                "step in one sum; use accumulate for sampling and with_grad for training."
            )
        if isinstance(batch_slice, str) and batch_slice not in ("cond", "uncond"):
            raise ValueError(f"batch_slice={batch_slice!r}: use a slice, 'cond', 'uncond' or None.")
        self.resolutions = None if resolutions is None else frozenset(int(r) for r in resolutions)
        self.token_indices = token_indices
        self.with_grad = with_grad
        self.accumulate = accumulate
        self.batch_slice = batch_slice
        # Latent size of the current UNet call, set by capture_attention's hook.
        self.latent_hw: tuple[int, int] | None = None
        # False between UNet calls while hooked: gradient checkpointing
        # re-runs the processors during backward and those must not record.
        self._recording = True
        self.reset()

    # -- state

    def reset(self) -> None:
        """Forget every captured map (call once per training step)."""
        self._calls: dict[str, list[torch.Tensor]] = {}  # name -> [batch heads token h w]
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._hw: dict[str, tuple[int, int]] = {}
        self.num_captured = 0  # captured calls since reset: layers × UNet forwards

    @property
    def captured_layers(self) -> list[str]:
        return list(self._counts)

    @property
    def captured_resolutions(self) -> list[int]:
        return sorted({min(hw) for hw in self._hw.values()})

    # -- what to capture

    def query_hw(self, query_len: int) -> tuple[int, int]:
        """(h, w) of a query map of `query_len` pixels in the current UNet call."""
        if exists(self.latent_hw):
            for h, w in _pyramid(*self.latent_hw):
                if h * w == query_len:
                    return h, w
            raise ValueError(
                f"query length {query_len} matches no level of the {self.latent_hw} latent; "
                "is this UNet downsampling by other than 2?"
            )
        side = math.isqrt(query_len)
        if side * side != query_len:
            raise ValueError(
                f"query length {query_len} is not square and the latent size is unknown; "
                "run the UNet inside capture_attention(unet, store) so the store sees it."
            )
        return side, side

    @contextmanager
    def recording(self, model: torch.nn.Module, latent_hw, record=lambda: True) -> Iterator["AttentionStore"]:
        """Forward hooks on `model` (the UNet or transformer) that tell the store each call's latent (h, w),
        `latent_hw(module, args, kwargs)`, and record only inside a call (gradient checkpointing re-runs the
        processors during backward) for which `record()` says so."""

        def before_forward(module, args, kwargs):
            self.latent_hw = latent_hw(module, args, kwargs)
            self._recording = record()

        def after_forward(module, args, kwargs, output):
            self._recording = False

        hooks = [model.register_forward_pre_hook(before_forward, with_kwargs=True),
                 model.register_forward_hook(after_forward, with_kwargs=True, always_call=True)]
        self._recording = False
        try:
            yield self
        finally:
            for hook in hooks:
                hook.remove()
            self._recording = True

    def wants(self, hw: tuple[int, int]) -> bool:
        return self.resolutions is None or min(hw) in self.resolutions

    # -- recording (called by CaptureAttnProcessor)

    def record(self, name: str, probs: torch.Tensor, hw: tuple[int, int]) -> None:
        """Store `probs` ``batch heads query token`` of layer `name` as maps."""
        if not self._recording:
            return
        probs = probs[self._batch_slice(probs.shape[0])]
        if not self.with_grad:
            probs = probs.detach()
        probs = self._select_tokens(probs)
        b, heads, q, t = probs.shape
        h, w = hw
        maps = probs.float().transpose(-1, -2).reshape(b, heads, t, h, w)  # batch heads token h w
        if self.accumulate:
            self._sums[name] = maps if name not in self._sums else self._sums[name] + maps
        else:
            self._calls.setdefault(name, []).append(maps)
        self._counts[name] = self._counts.get(name, 0) + 1
        self._hw[name] = hw
        self.num_captured += 1

    def _batch_slice(self, batch: int) -> slice:
        if self.batch_slice is None:
            return slice(None)
        if self.batch_slice == "cond":
            return slice(batch // 2, None)
        if self.batch_slice == "uncond":
            return slice(0, batch // 2)
        return self.batch_slice

    def _select_tokens(self, probs: torch.Tensor) -> torch.Tensor:
        if self.token_indices is None:
            return probs
        idx = torch.as_tensor(self.token_indices, dtype=torch.long, device=probs.device)
        b, heads, q, t = probs.shape
        if idx.numel() and (idx.min() < 0 or idx.max() >= t):
            raise ValueError(f"token_indices {idx.tolist()} out of range for {t} tokens.")
        if idx.ndim == 1:
            return probs[..., idx]
        if idx.ndim == 2 and idx.shape[0] == b:
            return probs.gather(-1, idx[:, None, None, :].expand(b, heads, q, idx.shape[1]))
        raise ValueError(
            f"token_indices of shape {tuple(idx.shape)}: use (k,) or (batch, k) with batch={b}."
        )

    # -- reading

    def layer_maps(self) -> dict[str, torch.Tensor]:
        """Per layer: mean over its calls, ``batch heads token h w``."""
        out = {}
        for name, count in self._counts.items():
            if self.accumulate:
                out[name] = self._sums[name] / count
            else:
                calls = self._calls[name]
                out[name] = calls[0] if len(calls) == 1 else torch.stack(calls).mean(0)
        return out

    def maps(self, resolution: int | None = None) -> torch.Tensor:
        """Mean over heads and layers at `resolution`: ``batch token h w``.

        `resolution` is the short side of the map; None is allowed when one
        resolution was captured. Each layer counts once, whatever its number
        of calls (DisenDiff averages 5 layers × 8 heads = 40 maps).
        """
        captured = self.captured_resolutions
        if resolution is None:
            if len(captured) != 1:
                raise ValueError(
                    f"maps(): captured resolutions are {captured}; pass one of them."
                )
            resolution = captured[0]
        per_layer = [
            m.mean(1) for name, m in self.layer_maps().items() if min(self._hw[name]) == resolution
        ]
        if not per_layer:
            raise ValueError(
                f"no maps at resolution {resolution} (captured: {captured}); did the UNet run "
                "inside capture_attention(unet, store), and does the store ask for it?"
            )
        shapes = {tuple(m.shape) for m in per_layer}
        if len(shapes) > 1:
            raise ValueError(f"layers at resolution {resolution} differ in shape: {sorted(shapes)}")
        return per_layer[0] if len(per_layer) == 1 else torch.stack(per_layer).mean(0)


# ---------------------------------------------------------------- processor


def attention_probabilities(
    attn: Attention, query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(Q·Kᵀ·attn.scale + bias) in float32: ``batch heads query token``.

    Float32 whatever the model dtype: these maps feed losses and min-max
    normalisation, and fp16 logits overflow (the reason for SD 2's
    upcast_attention). AttnProcessor2_0 lets SDPA use 1/sqrt(head_dim);
    attn.scale equals that for every UNet attention (scale_qk=True).
    """
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
    if exists(bias):
        scores = scores + bias.float()
    return scores.softmax(dim=-1)


class CaptureAttnProcessor:
    """AttnProcessor2_0's computation with explicit attention probabilities.

    On a cross-attention call whose query map the store wants, it computes
    the probabilities, passes them to ``store.record(name, ...)`` and returns
    what AttnProcessor2_0 returns (within float tolerance). Every other call
    goes to `fallback`, the layer's previous processor.
    """

    def __init__(self, store: AttentionStore, name: str, fallback=None):
        self.store = store
        self.name = name
        self.fallback = fallback if exists(fallback) else AttnProcessor2_0()

    # outside torch.compile's graph (models/compiled.py): a new processor every step, writing maps into a
    # Python store, would otherwise retrace its block each step; the rest of the block stays compiled
    @torch.compiler.disable
    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if hidden_states.ndim == 4:
            hw = tuple(hidden_states.shape[-2:])
        else:
            hw = self.store.query_hw(hidden_states.shape[1])
        if encoder_hidden_states is None or not self.store.wants(hw):
            if temb is not None:  # not every plain processor takes temb (SlicedAttnProcessor)
                kwargs["temb"] = temb
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

        # From here: AttnProcessor2_0.__call__ with SDPA written out.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, key_len, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        # batch len (heads dim) -> batch heads len dim
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        probs = attention_probabilities(attn, query, key, attention_mask)  # batch heads query token
        self.store.record(self.name, probs, hw)
        hidden_states = torch.matmul(probs.to(value.dtype), value)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# ---------------------------------------------------------------- install


def _is_cross_attention(name: str) -> bool:
    return name.endswith("attn2.processor")


@contextmanager
def capture_attention(unet: torch.nn.Module, store: AttentionStore) -> Iterator[AttentionStore]:
    """Install capture processors on `unet`'s attn2 layers; restore on exit.

    Every attn2 layer gets a CaptureAttnProcessor; on calls at resolutions
    the store does not want it runs the layer's previous processor, so the
    choice is made from the real query size (robust to any block layout and
    to non-square latents). A forward pre-hook tells the store the latent
    (h, w) of each call.
    """
    if not hasattr(unet, "attn_processors"):
        raise TypeError(f"{type(unet).__name__} has no attn_processors; pass a diffusers UNet.")
    previous = dict(unet.attn_processors)  # name -> processor
    installed = {}
    for name, proc in previous.items():
        if not _is_cross_attention(name):
            installed[name] = proc
            continue
        if isinstance(proc, CaptureAttnProcessor):
            raise ValueError(f"{name} is already capturing: one capture_attention per UNet at a time.")
        # Exact types: a subclass may change the math that capture would bypass.
        if type(proc) not in PLAIN_PROCESSORS:
            raise UserError(
                f"cannot capture attention on {name}: its processor {type(proc).__name__} is not "
                "plain softmax attention and capture would bypass it. Capture before installing "
                "it, or subclass CaptureAttnProcessor for it."
            )
        installed[name] = CaptureAttnProcessor(store, name.removesuffix(".processor"), fallback=proc)
    if not any(isinstance(p, CaptureAttnProcessor) for p in installed.values()):
        raise ValueError(f"{type(unet).__name__} has no cross-attention (attn2) layers to capture.")

    def sample_hw(module, args, kwargs):
        return tuple((args[0] if args else kwargs["sample"]).shape[-2:])

    # set_attn_processor pops from the dict it is given: always pass a copy.
    unet.set_attn_processor(dict(installed))
    try:
        with store.recording(unet, sample_hw):
            yield store
    finally:
        unet.set_attn_processor(dict(previous))


# ---------------------------------------------------------------- map ops


def cross_attention_sides(unet_config, latent_side: int) -> list[int]:
    """The query-map sides at which the UNet has cross-attention, for a square latent of
    `latent_side` (SD 1.5 at 64: [64, 32, 16, 8], mid block last; SDXL at 128: [64, 32, 32])."""
    sides = [latent_side // 2**i for i, kind in enumerate(unet_config.down_block_types) if "CrossAttn" in kind]
    if "CrossAttn" in (unet_config.mid_block_type or ""):
        sides.append(latent_side // 2 ** (len(unet_config.down_block_types) - 1))
    return sides


def calibration_level(unet_config, latent_side: int) -> int:
    """The cross-attention level playing the role of SD 1.5's 16x16: the deepest level with cross-attention
    in the down (and up) blocks, the mid block left out. SD 1.5 at 64: 16; SD 2 at 96: 24; SDXL at 128: 32,
    its ten-layer level — a quarter of the latent side on each. ToyWorld's quarter would be its mid block
    (4x4, one layer), where the calibration pushed L_bind above a weight-0 control's; its 8x8 level took it
    below (docs/evidence.md, DisenDiff)."""
    sides = [latent_side // 2**i for i, kind in enumerate(unet_config.down_block_types) if "CrossAttn" in kind]
    return min(sides) if sides else min(cross_attention_sides(unet_config, latent_side))


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − min) / (max − min + eps) per map over its last two dims ``... h w``."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - lo) / (hi - lo + eps)


def gaussian_kernel_1d(kernel_size: int = 3, sigma: float = 0.5**0.5) -> torch.Tensor:
    """Normalised 1-D Gaussian; the defaults give DisenDiff's [0.2119, 0.5761, 0.2119]."""
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).float()


def gaussian_smooth(
    maps: torch.Tensor, kernel_size: int = 3, sigma: float = 0.5**0.5
) -> torch.Tensor:
    """DisenDiff's G: reflect padding then a separable Gaussian, ``... h w`` → same.

    σ = 1/√2 makes the 3-tap weights [0.2119, 0.5761, 0.2119] of the
    reference code. Maps must be larger than kernel_size // 2 on each side.
    """
    *lead, h, w = maps.shape
    pad = kernel_size // 2
    k = gaussian_kernel_1d(kernel_size, sigma).to(maps.device, maps.dtype)
    x = maps.reshape(-1, 1, h, w)
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))  # along w
    x = F.conv2d(x, k.view(1, 1, -1, 1))  # along h
    return x.reshape(*lead, h, w)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize masks ``... H W`` to ``... h w`` as float: area when shrinking, else bilinear.

    Area averaging keeps the fraction of each map pixel the mask covers, so
    a 512² mask becomes a soft 16² mask (FastComposer uses antialiased
    bilinear for the same purpose).
    """
    *lead, H, W = mask.shape
    h, w = size
    x = mask.float().reshape(-1, 1, H, W)
    if (H, W) != (h, w):
        if h <= H and w <= W:
            x = F.interpolate(x, size=(h, w), mode="area")
        else:
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.reshape(*lead, h, w)


__all__ = [
    "AttentionStore",
    "CaptureAttnProcessor",
    "attention_probabilities",
    "capture_attention",
    "gaussian_kernel_1d",
    "gaussian_smooth",
    "minmax_normalize",
    "resize_mask",
]
