"""What the tabs share: the page's settings and its cancel events, and the status box."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from ..models import SingleFile
from .jobs import Cancels


@dataclass
class Page:
    work: Path  # jobs' inputs and outputs (bundles, images), served to the page
    base: str | SingleFile | None = None  # as --base (and --base-config) give it; None: the embedded ToyWorld base
    device: str = "auto"
    compose_model: str = ""  # empty: ToyWorld's shipped model of the chosen method
    cancels: Cancels = field(default_factory=Cancels)

    def open_job(self, request: gr.Request) -> None:
        self.cancels.open(request.session_hash)

    def cancel_job(self, request: gr.Request):
        if self.cancels.cancel(request.session_hash):
            return status_html("Cancelling: the job stops after its current step ...")
        return gr.skip()


def status_html(text: str, done: int | None = None, total: int | None = None) -> str:
    bar = f'<progress value="{done}" max="{total}" style="width:100%"></progress>' if total else ""
    return f'{bar}<p class="mc-status">{html.escape(text)}</p>'


def error_html(e: Exception | str) -> str:
    """A UserError's one line, as the command line prints it."""
    line = " ".join(str(e).split())
    return f'<p class="mc-error" style="color:#c62828"><b>error:</b> {html.escape(line)}</p>'
