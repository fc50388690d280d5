"""`multiconcept export`: a bundle as files other tools load."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .options import BaseOpt, out


def export(bundle: Path = typer.Argument(..., help="a bundle file"),
           format: str = typer.Option("diffusers", "--format", help="diffusers"),
           output: Path = typer.Option(..., "--out", "-o", help="folder to write"),
           base: Optional[str] = BaseOpt):
    """Write a bundle as files plain diffusers loads (textual inversion, attn procs, LoRA)."""
    from ..bundle import load_bundle
    from ..export import FORMATS, check_out_dir, export_diffusers
    from ..models import load_base

    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    check_out_dir(output)
    header = load_bundle(bundle).header()  # a corrupt bundle is refused before the base loads
    b = load_base(base if base is not None else header["base_name"])
    for p in export_diffusers(bundle, b, output):
        out.print(str(p))
