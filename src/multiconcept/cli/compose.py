"""`multiconcept compose`: images of given subjects with no per-subject training (FastComposer, Subject-Diffusion)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .options import BaseConfigOpt, DeviceOpt, DtypeOpt, base_source, number, out


def compose(
    prompt: str = typer.Argument(..., help="subjects marked after their nouns, "
                                           "e.g. 'a star <img> and a circle <img> on a gray background'"),
    subject: List[str] = typer.Option([], "--subject", "-s", help="IMG or IMG:MASK (white = subject), one per marker, "
                                                                  "in marker order; Subject-Diffusion also IMG:x0,y0,x1,y1 "
                                                                  "(a box in pixels)"),
    model: Optional[Path] = typer.Option(None, "--model", help="model folder (train-encoder or convert-fastcomposer); "
                                                               "default: ToyWorld's shipped model of --method"),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="fastcomposer | subject-diffusion; default: what "
                                                                      "the model folder holds"),
    location: List[str] = typer.Option([], "--location", help="Subject-Diffusion: where subject i goes, x0,y0,x1,y1 as "
                                                              "fractions of the canvas, or 'ref' (its place in its own "
                                                              "image, the default); one per subject, in order"),
    alpha: float = number(0.7, help="FastComposer: share of steps conditioned on the subjects; the first 1-alpha are "
                                    "text-only", minimum=0),
    guidance: Optional[float] = number(None, help="classifier-free guidance scale (FastComposer 5); Subject-Diffusion: "
                                                  "the text scale s_T (7.5)", minimum=0),
    image_guidance: float = number(1.5, help="Subject-Diffusion: the image scale s_I", minimum=0),
    interpolation: float = number(1.0, help="Subject-Diffusion: share of steps that read the subject clauses; then the "
                                            "plain caption (text-image interpolation)", minimum=0),
    steps: int = number(50, help="denoising steps", minimum=1),
    scheduler: str = typer.Option("ddim", help="ddim | pndm | euler | euler-a | dpm | ddpm"),
    seed: int = number(0, help="image i uses seed + i", minimum=0),
    n: int = number(1, "-n", help="images", minimum=1),
    output: Path = typer.Option(Path("out"), "--out", "-o", help="folder for the PNGs"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace PNGs of the same seeds already in --out"),
    base: Optional[str] = typer.Option(None, "--base", help="base pipeline; default: the one the model names"),
    base_config: Optional[str] = BaseConfigOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Generate images of given subjects with no per-subject training (FastComposer, Subject-Diffusion)."""
    from ..errors import UserError, require
    from ..workflows.compose import compose_any
    from ..workflows.generate import planned_paths

    require(not output.exists() or output.is_dir(), f"--out {output} is a file: give a folder for the PNGs")
    clash = [] if overwrite else [p for p in planned_paths(output, n, seed) if p.exists()]
    if clash:
        raise UserError(f"{clash[0]} already exists: pass --overwrite to replace it, or pick another --out or --seed")
    for p in compose_any(prompt, subject, model, method=method, locations=location, alpha=alpha, guidance=guidance,
                         image_guidance=image_guidance, interpolation=interpolation, steps=steps, scheduler=scheduler,
                         n=n, seed=seed, out_dir=output, base=base_source(base, base_config), device=device, dtype=dtype):
        out.print(str(p))
