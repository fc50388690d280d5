"""`multiconcept ui`: the web page (gradio, the `ui` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .options import BaseConfigOpt, BaseOpt, DeviceOpt, base_source, number


def ui(
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on; beyond loopback needs --auth"),
    port: int = number(7860, "--port", help="port to listen on", minimum=1),
    auth: Optional[str] = typer.Option(None, "--auth", help="USER:PASS the page asks for (gradio's login)"),
    share: bool = typer.Option(False, "--share", help="also make a public share link (gradio's; needs --auth)"),
    base: Optional[str] = BaseOpt,
    base_config: Optional[str] = BaseConfigOpt,
    work: Optional[Path] = typer.Option(None, "--work", help="folder for the jobs' inputs, bundles and images "
                                                             "(default: a new temporary folder)"),
    max_upload_mb: int = number(100, "--max-upload-mb", help="largest upload accepted, in MB", minimum=1),
    compose_model: str = typer.Option("", "--compose-model",
                                      help="the Compose tab's FastComposer model folder (default: ToyWorld's shipped)"),
    device: str = DeviceOpt,
):
    """Learn, generate and compose concepts in the browser. Images obey the same limits as the other
    verbs (--max-image-side before the verb); one training job runs at a time, the rest queue."""
    from ..ui.launch import check_exposure, no_calls_home

    check_exposure(host, auth, share)  # before the slow import
    no_calls_home()
    try:
        import gradio  # noqa: F401
    except ImportError as e:
        raise UserError("the web page needs gradio: pip install 'multiconcept[ui]'") from e
    from ..ui.launch import serve

    serve(host=host, port=port, auth=auth, share=share, base=base_source(base, base_config), work=work,
          max_upload_mb=max_upload_mb, compose_model=compose_model, device=device)
