"""The Compose tab: tuning-free images of given subjects (FastComposer): subject images with
optional masks, a prompt with an <img> marker after each subject's noun, a model folder.

Subject-Diffusion joins this tab when its model lands. ToyWorld's FastComposer
is built, not shipped: with no model folder, the tab says which make target
builds one. Composing is `multiconcept.api.compose`.
"""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from .. import api
from ..errors import UserError
from .common import Page, error_html, status_html

SUBJECTS = 3
BUILD_HINT = ("ToyWorld's FastComposer is built, not shipped: `make fastcomposer` builds it into "
              "models/fastcomposer-toyworld (about 60 min on 2 cores, resumable), or `multiconcept "
              "convert-fastcomposer` converts the released checkpoint (Stable Diffusion 1.5).")


def model_note(folder: str) -> str:
    """Whether a model folder is there, and how to get one when it is not."""
    where = Path((folder or "").strip() or ".").expanduser()
    if where.is_dir():
        return status_html(f"Model folder {where}.")
    return status_html(f"No model at {where} yet. {BUILD_HINT}")


def subject_specs(files: list[tuple[str | None, str | None]]) -> list[str]:
    """'IMG' or 'IMG:MASK' per given subject, in order, as `multiconcept compose --subject` takes them."""
    specs = []
    for k, (image, mask) in enumerate(files):
        if image:
            specs.append(f"{image}:{mask}" if mask else str(image))
        elif mask:
            raise UserError(f"subject {k + 1} has a mask but no image: upload its image too")
    return specs


def build(page: Page) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            kind = gr.Radio(["FastComposer"], value="FastComposer", label="model kind",
                            info="Subject-Diffusion joins here when its model lands")
            model = gr.Textbox(page.compose_model, label="model folder", elem_id="compose-model")
            note = gr.HTML(model_note(page.compose_model), elem_id="compose-note")
            prompt = gr.Textbox("a star <img> and a circle <img> on a gray background", lines=2, elem_id="compose-prompt",
                                label="prompt: <img> after each subject's noun, in the order of the subjects")
            subjects = []
            for k in range(SUBJECTS):
                with gr.Row():
                    subjects += [gr.File(label=f"subject {k + 1}", file_types=["image"]),
                                 gr.File(label="its mask (optional, white = subject)", file_types=["image"])]
            with gr.Row():
                alpha = gr.Slider(0, 1, value=0.7, step=0.05, label="alpha (share of steps that see the subjects)")
                guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="guidance")
            with gr.Row():
                steps = gr.Slider(1, 100, value=50, step=1, label="steps")
                seed = gr.Number(0, label="first seed", precision=0, minimum=0)
                n = gr.Slider(1, 8, value=4, step=1, label="images")
            run = gr.Button("Compose", variant="primary", elem_id="compose-button")
            status = gr.HTML("", elem_id="compose-status")
        with gr.Column(scale=3):
            grid = gr.Gallery(label="images", columns=4, elem_id="compose-grid")

    model.change(model_note, model, note)

    def compose(_kind, folder, text, a, scale, n_steps, first, count, *files):
        t0 = time.monotonic()
        try:
            specs = subject_specs(list(zip(files[::2], files[1::2])))
            if not Path((folder or "").strip() or ".").expanduser().is_dir():
                raise UserError(f"no FastComposer model at {folder}: {BUILD_HINT}")
            images = api.compose(text, specs, folder.strip(), n=int(count), seed=int(first), device=page.device,
                                 settings=api.ComposeSettings(steps=int(n_steps), guidance=float(scale), alpha=float(a)))
        except UserError as e:
            return error_html(e), gr.skip()
        return (status_html(f"{len(images)} images in {time.monotonic() - t0:.0f} s"),
                [(img, f"seed {int(first) + i}") for i, img in enumerate(images)])

    run.click(compose, [kind, model, prompt, alpha, guidance, steps, seed, n, *subjects], [status, grid],
              concurrency_limit=1, concurrency_id="generate")
