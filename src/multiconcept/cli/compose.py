"""`multiconcept compose`: images of given subjects with no per-subject training (FastComposer)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .options import DeviceOpt, DtypeOpt, number, out


def compose(
    prompt: str = typer.Argument(..., help="subjects marked after their nouns, "
                                           "e.g. 'a star <img> and a circle <img> on a gray background'"),
    subject: List[str] = typer.Option([], "--subject", "-s", help="IMG or IMG:MASK (white = subject), one per marker, "
                                                                  "in marker order"),
    model: Path = typer.Option(..., "--model", help="FastComposer model folder (train-encoder or convert-fastcomposer)"),
    alpha: float = number(0.7, help="share of steps conditioned on the subjects; the first 1-alpha are text-only", minimum=0),
    guidance: float = number(5.0, help="classifier-free guidance scale", minimum=0),
    steps: int = number(50, help="denoising steps", minimum=1),
    scheduler: str = typer.Option("ddim", help="ddim | pndm | euler | euler-a | dpm | ddpm"),
    seed: int = number(0, help="image i uses seed + i", minimum=0),
    n: int = number(1, "-n", help="images", minimum=1),
    output: Path = typer.Option(Path("out"), "--out", "-o", help="folder for the PNGs"),
    base: Optional[str] = typer.Option(None, "--base", help="base pipeline; default: the one the model names"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Generate images of given subjects with no per-subject training (FastComposer)."""
    from ..workflows.compose import ComposeSettings
    from ..workflows.compose import compose as run

    settings = ComposeSettings(steps=steps, guidance=guidance, alpha=alpha, scheduler=scheduler)
    for p in run(prompt, subject, model, n=n, seed=seed, out_dir=output, settings=settings, base=base, device=device,
                 dtype=dtype):
        out.print(str(p))
