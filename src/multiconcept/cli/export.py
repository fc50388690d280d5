"""`multiconcept export`: a bundle as files other tools load."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import BaseConfigOpt, BaseOpt, base_source, out


def export(bundle: Path = typer.Argument(..., help="a bundle file"),
           format: str = typer.Option("diffusers", "--format",
                                      help="diffusers | a1111 | comfyui | kohya (the last three write the same files)"),
           output: Path = typer.Option(..., "--out", "-o", help="folder to write"),
           rank: Optional[str] = typer.Option(None, "--rank", help="rank of the LoRA a Custom Diffusion / DisenDiff "
                                              "bundle becomes for a1111/comfyui/kohya (default 16; 'full': exact)"),
           base: Optional[str] = BaseOpt,
           base_config: Optional[str] = BaseConfigOpt):
    """Write a bundle as files diffusers, AUTOMATIC1111, ComfyUI or kohya's sd-scripts load (+ a README)."""
    from ..export import DEFAULT_RANK
    from ..workflows.export import export_bundle

    result = export_bundle(bundle, output, format, rank=DEFAULT_RANK if rank is None else rank,
                           base=base_source(base, base_config))
    for p in result.paths:
        out.print(str(p))
    if result.svd is not None:
        worst = result.svd.worst
        out.print(f"LoRA by truncated SVD at rank {'full' if result.rank is None else result.rank}: relative Frobenius "
                  f"error {result.svd.relative_error:.4g} over all layers, worst {worst.relative_error:.4g} "
                  f"({worst.name}); per layer in README.md", highlight=False)
