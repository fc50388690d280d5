"""The `multiconcept` Typer app and its root options (before any verb)."""

from __future__ import annotations

from typing import Optional

import typer

from .options import quiet_libraries

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multi-concept personalised text-to-image diffusion.")


@app.callback()
def root(
    verbose: bool = typer.Option(False, "--verbose", help="show libraries' progress bars and warnings"),
    max_image_side: Optional[int] = typer.Option(
        None, "--max-image-side", help="longest image side accepted, in pixels (default 8192; env MULTICONCEPT_MAX_IMAGE_SIDE)"),
):
    if not verbose:
        quiet_libraries()
    if max_image_side is not None:
        from ..images import limits, parse_side

        limits.max_side = parse_side(max_image_side, "--max-image-side")
