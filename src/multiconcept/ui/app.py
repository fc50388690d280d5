"""The page: three tabs over one work folder."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from . import compose_tab, generate_tab, learn_tab
from .common import Page

INTRO = ("**multiconcept**: learn your own concepts from a photo (Learn), put them into new images (Generate), "
         "or compose subjects with no training (Compose). Base: {base}.")


def build(*, work: Path, base: str | None = None, compose_model: str = "",
          device: str = "auto") -> gr.Blocks:
    page = Page(work=work, base=base, device=device, compose_model=compose_model)
    with gr.Blocks(title="multiconcept", analytics_enabled=False) as demo:
        gr.Markdown(INTRO.format(base=base or "the embedded ToyWorld model (64 px)"))
        with gr.Tab("Learn", id="learn"):
            learned, event = learn_tab.build(page)
        with gr.Tab("Generate", id="generate"):
            generate_tab.build(page, learned, event)
        with gr.Tab("Compose", id="compose"):
            compose_tab.build(page)
    return demo
