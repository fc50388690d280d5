"""`multiconcept convert-fastcomposer`: the released FastComposer checkpoint in safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .options import number, out


def convert_fastcomposer(
    ckpt: Path = typer.Argument(..., help="the released FastComposer state dict (.bin / .pt), loaded weights-only"),
    output: Path = typer.Option(..., "--out", "-o", help="model folder to write"),
    base: Optional[str] = typer.Option(None, "--base", help="check the UNet against this base and record its fingerprint "
                                                            "(e.g. a local SD 1.5 folder)"),
    vision_heads: Optional[int] = number(None, help="attention heads of the vision tower (default: width / 64, as CLIP)",
                                         minimum=1),
):
    """Convert the official FastComposer checkpoint to safetensors in current diffusers/transformers names."""
    from ..workflows.convert import convert_fastcomposer as run

    if vision_heads is not None and vision_heads < 1:
        raise UserError(f"--vision-heads must be at least 1, got {vision_heads}")
    out.print(f"wrote {run(ckpt, output, base=base, vision_heads=vision_heads)}")
