"""`multiconcept demo`: the main job, end to end, as an offline HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import BaseOpt, number, out


def demo(output: Path = typer.Option(Path("demo-out"), "--out", "-o", help="folder for the page and images"),
         base: Optional[str] = BaseOpt,
         steps: Optional[int] = number(None, help="training steps (default: the demo's budget)", minimum=1),
         compile: str = typer.Option("off", "--compile", help="on | off: torch.compile the training's UNet "
                                     "blocks (the demo's few images are sampled eager; docs/speed.md)")):
    """The main job: learn two concepts from one image, generate, write an HTML page."""
    from ..workflows.demo import run_demo

    page = run_demo(output, base=base, steps=steps, compile=compile)
    out.print(f"demo page: {page}")
