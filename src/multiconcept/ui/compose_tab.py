"""The Compose tab: tuning-free images of given subjects, FastComposer or Subject-Diffusion:
subject images with a mask or a box each, a prompt with an <img> marker after each subject's
noun, a model folder (empty: ToyWorld's shipped model of the chosen method), and
for Subject-Diffusion where each subject goes. Composing is `multiconcept.api.compose`;
the model folder says which method it is.
"""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from .. import api
from ..errors import UserError
from ..workflows.compose import SHIPPED
from .common import Page, error_html, status_html

SUBJECTS = 3
KINDS = {"FastComposer": "fastcomposer", "Subject-Diffusion": "subject-diffusion"}  # the tab's choice -> method


def model_folder(kind: str, folder: str | None) -> Path:
    """The folder typed, or ToyWorld's shipped model of the method when none is."""
    folder = (folder or "").strip()
    return Path(folder).expanduser() if folder else SHIPPED[KINDS[kind]]


def model_note(kind: str, folder: str | None) -> str:
    """Which model composes, and what to do when it is not there."""
    where = model_folder(kind, folder)
    if not (folder or "").strip():
        return status_html(f"ToyWorld's shipped {kind} model." if where.is_dir() else
                           f"ToyWorld's {kind} model is not in this install: type a model folder "
                           "(multiconcept train-encoder makes one).")
    return status_html(f"Model folder {where}." if where.is_dir() else
                       f"No model at {where}: type another folder, or leave it empty for ToyWorld's shipped one.")


def subject_specs(kind: str, rows: list[tuple]) -> tuple[list[str], list[str | None]]:
    """'IMG', 'IMG:MASK' or 'IMG:x0,y0,x1,y1' per given subject, as `multiconcept compose --subject` takes them,
    and each one's --location (Subject-Diffusion's; None: where it stands in its own image)."""
    specs, places = [], []
    for k, (image, mask, box, place) in enumerate(rows):
        box, place = (box or "").strip(), (place or "").strip()
        if not image:
            if mask or box or place:
                raise UserError(f"subject {k + 1} has a mask, box or place but no image: upload its image too")
            continue
        if mask and box:
            raise UserError(f"subject {k + 1} has both a mask and a box: give one of them")
        if (box or place) and kind != "Subject-Diffusion":
            raise UserError(f"subject {k + 1}: boxes and places are Subject-Diffusion's; FastComposer takes a mask")
        specs.append(f"{image}:{mask or box}" if (mask or box) else str(image))
        places.append(place or None)
    return specs, places


def build(page: Page) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            kind = gr.Radio(list(KINDS), value="FastComposer", label="method", elem_id="compose-kind")
            model = gr.Textbox(page.compose_model, label="model folder (empty: ToyWorld's shipped model)",
                               elem_id="compose-model")
            note = gr.HTML(model_note("FastComposer", page.compose_model), elem_id="compose-note")
            prompt = gr.Textbox("a robot <img> and a robot <img> on a gray background", lines=2, elem_id="compose-prompt",
                                label="prompt: <img> after each subject's noun, in the order of the subjects")
            subjects = []
            for k in range(SUBJECTS):
                with gr.Group():
                    with gr.Row():
                        subjects += [gr.File(label=f"subject {k + 1}", file_types=["image"], height=120),
                                     gr.File(label="its mask (optional, white = subject)", file_types=["image"],
                                             height=120)]
                    with gr.Row():
                        subjects += [gr.Textbox(label="or its box in the image: x0,y0,x1,y1 pixels (Subject-Diffusion)"),
                                     gr.Textbox(label="where it goes: x0,y0,x1,y1 fractions (Subject-Diffusion)")]
            with gr.Row():
                alpha = gr.Slider(0, 1, value=0.7, step=0.05, label="FastComposer: alpha (share of steps that see "
                                                                    "the subjects)")
                image_guidance = gr.Slider(0, 10, value=1.5, step=0.1, label="Subject-Diffusion: image guidance")
            with gr.Row():
                guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="guidance (FastComposer 5, Subject-Diffusion 7.5)")
                steps = gr.Slider(1, 100, value=50, step=1, label="steps")
            with gr.Row():
                seed = gr.Number(0, label="first seed", precision=0, minimum=0)
                n = gr.Slider(1, 8, value=4, step=1, label="images")
            run = gr.Button("Compose", variant="primary", elem_id="compose-button")
            status = gr.HTML("", elem_id="compose-status")
        with gr.Column(scale=3):
            grid = gr.Gallery(label="images", columns=4, elem_id="compose-grid")

    def switch(choice):
        folder = page.compose_model if choice == "FastComposer" else ""
        return folder, model_note(choice, folder), 5.0 if choice == "FastComposer" else 7.5

    kind.change(switch, kind, [model, note, guidance])
    model.change(model_note, [kind, model], note)

    def compose(choice, folder, text, a, s_i, scale, n_steps, first, count, *fields):
        t0 = time.monotonic()
        try:
            specs, places = subject_specs(choice, [fields[i:i + 4] for i in range(0, len(fields), 4)])
            where = model_folder(choice, folder)
            if not where.is_dir():
                raise UserError(f"no model at {where}: type a model folder (multiconcept train-encoder makes one)")
            if choice == "FastComposer":
                settings = api.ComposeSettings(steps=int(n_steps), guidance=float(scale), alpha=float(a))
                places = []
            else:
                settings = api.SubjectComposeSettings(steps=int(n_steps), guidance=float(scale), image_guidance=float(s_i))
                places = places if any(places) else []
            images = api.compose(text, specs, where, n=int(count), seed=int(first), settings=settings,
                                 locations=places, device=page.device)  # the base the model names
        except UserError as e:
            return error_html(e), gr.skip()
        return (status_html(f"{len(images)} images in {time.monotonic() - t0:.0f} s"),
                [(img, f"seed {int(first) + i}") for i, img in enumerate(images)])

    run.click(compose, [kind, model, prompt, alpha, image_guidance, guidance, steps, seed, n, *subjects], [status, grid],
              concurrency_limit=1, concurrency_id="generate")
