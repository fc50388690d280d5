"""How one tensor of an original single-file layout is made from a diffusers model's tensors, and taken apart again.

The original code (CompVis latent-diffusion, Stability's SGM and MM-DiT, Black Forest Labs' FLUX) often keeps in
one tensor what diffusers keeps in several, or stores it otherwise: q, k and v stacked in one projection, an
attention projection as a 1x1 convolution, OpenCLIP's text projection transposed, a continuous AdaLN's two halves
in the other order. A `Source` says which, once, for the writer (`build`) and the reader (`split`) alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HOWS = ("copy", "conv1x1", "transpose", "stack", "swap")


@dataclass(frozen=True)
class Source:
    """How one original tensor is made from these `component.parameter` weights of the pipeline: copied ("copy"),
    as a 1x1 convolution ("conv1x1"), transposed ("transpose"), stacked along the output rows in this order
    ("stack"), or with its two halves swapped ("swap": the original's continuous AdaLN projects to (shift, scale),
    diffusers' AdaLayerNormContinuous to (scale, shift))."""

    params: tuple[str, ...]
    how: str = "copy"


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], 0)


def build(source: Source, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The original tensor from the pipeline's `tensors` ({component.parameter: tensor})."""
    parts = [tensors[p] for p in source.params]
    if source.how == "stack":
        return torch.cat(parts, 0)
    t = parts[0]
    if source.how == "conv1x1":
        return t[:, :, None, None]
    if source.how == "transpose":
        return t.T
    if source.how == "swap":
        return _swap_halves(t)
    return t


def split(source: Source, t: torch.Tensor, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """`build`'s inverse: {component.parameter: tensor} from the original tensor `t`, each part cut to its shape in
    `shapes` (a stacked tensor's rows are its parts' rows in order, whatever the model's widths)."""
    if source.how == "stack":
        rows = [shapes[p][0] for p in source.params]
        return dict(zip(source.params, t.split(rows, 0)))
    (param,) = source.params
    if source.how == "conv1x1":
        return {param: t[:, :, 0, 0]}
    if source.how == "transpose":
        return {param: t.T}
    if source.how == "swap":
        return {param: _swap_halves(t)}
    return {param: t}
