"""`--compile on|off`: torch.compile of a denoiser's forward (and so its backward), and undoing it.

What compiles, measured on ToyWorld's UNet (CPU, 2 threads; docs/speed.md):
- training (`scope="blocks"`): the blocks the model declares repeated (diffusers' ``_repeated_blocks``:
  the UNet's ``BasicTransformerBlock``, FLUX's and SD3's transformer blocks), each compiled once and
  reused for every copy (diffusers' ``compile_repeated_blocks``); a model that declares none compiles
  whole. The whole UNet's forward and backward took 115 s to compile cold for about the same Custom
  Diffusion step as its repeated blocks, which took 29 s;
- sampling (`scope="model"`): the whole denoiser, forward only: 44 s cold, and 0.59 s per image against
  0.74 s eager (50 DDIM steps, batch 4), where the repeated blocks alone gave no measurable gain.

What stays eager, per module, and why:
- attention capture (DisenDiff's losses, FastComposer's L_loc, `generate --attention-maps`): its
  processor is new every step and writes maps into a Python store, so it runs outside the graph
  (``torch.compiler.disable`` in attention.py / joint_attention.py); the rest of each block compiles;
- Infusion's value residuals: hooks whose rows change with every caption, likewise left out of the graph;
- nothing else is excluded: LoRA (peft layers), Custom Diffusion's K/V and its start-token hook, and
  Subject-Diffusion's gated layers are traced with the block that holds them.

A compiled step agrees with an eager one to float tolerance, not bit for bit, so the setting is part
of a run's checkpoint digest: a resumed run compiles as the interrupted one did.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import UserError

COMPILE_MODES = ("off", "on")


def compile_denoiser(model: torch.nn.Module, mode: str, scope: str = "blocks") -> Callable[[], None]:
    """Compile `model` in place when `mode` is ``on``: its repeated blocks (``scope="blocks"``, training;
    the whole model where it declares none) or the whole model (``scope="model"``, sampling). Returns
    what undoes it (nothing to undo for ``off``). Parameters stay the module's own, so optimisers,
    state dicts and checkpoints see the same tensors either way."""
    if mode not in COMPILE_MODES:
        raise UserError(f"compile must be on or off, got {mode!r}: fix --compile")
    if mode == "off":
        return lambda: None
    if scope == "blocks" and getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks()
    else:
        model.compile()
    targets = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]

    def undo() -> None:
        for m in targets:
            m._compiled_call_impl = None  # what nn.Module.compile set; the eager forward is back

    return undo


def is_compiled(model: torch.nn.Module) -> bool:
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
