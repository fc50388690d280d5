"""The Learn tab: an image (or a few per concept), a token, class word and mask per concept,
a method and its settings; progress with the loss and attention heatmaps; the bundle.

Every action is `multiconcept.api`: reading images by the command line's rules,
`learn` with its `on_step` and `cancel`, `parse_settings` for the settings typed
as text (--param's rules).
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import gradio as gr
import pandas as pd

from .. import api
from ..errors import UserError
from .common import Page, error_html, status_html
from .jobs import Every, run_streaming
from .masks import PAINT_SIDE, editor_value, mask_from_editor

MAX_CONCEPTS = 3
BRUSH = gr.Brush(default_size=max(4, PAINT_SIDE // 32), colors=["rgb(255, 40, 140)"], color_mode="fixed")


def settings_help(method: str) -> str:
    rows = "\n".join(f"| `{s.name}` | `{s.default}` | {s.help} |" for s in api.method_settings(method))
    return f"{api.methods().get(method, '')}\n\n| setting | default | help |\n|---|---|---|\n{rows}"


def method_defaults(method: str) -> tuple[int, float, str]:
    d = {s.name: s.default for s in api.method_settings(method)}
    return d["steps"], d["lr"], " | ".join(d["templates"])


class ConceptInputs:
    """One concept's widgets."""

    def __init__(self, k: int):
        with gr.Group(visible=k < 2) as self.box:
            with gr.Row():
                self.token = gr.Textbox(value=f"<s{k + 1}>", label=f"concept {k + 1}: token", elem_id=f"token-{k}")
                self.class_word = gr.Textbox(label="class word", placeholder="e.g. cat", elem_id=f"class-{k}")
            self.editor = gr.ImageEditor(label="paint over it on the image", sources=(), transforms=(), brush=BRUSH,
                                         layers=gr.LayerOptions(allow_additional_layers=False), type="numpy",
                                         image_mode="RGBA", elem_id=f"paint-{k}", buttons=[], height=420)
            with gr.Row():
                self.mask = gr.File(label="or upload its mask (white = the concept)", file_types=["image"],
                                    elem_id=f"mask-{k}")
                self.images = gr.File(label="or its own images", file_count="multiple", file_types=["image"],
                                      elem_id=f"images-{k}")

    @property
    def inputs(self) -> list:
        return [self.token, self.class_word, self.editor, self.mask, self.images]


def build(page: Page):
    """The tab's widgets and events; returns the State holding the last learned bundle's path, and
    the learning event (the Generate tab follows it)."""
    learned = gr.State(None)
    methods = list(api.methods())
    steps0, lr0, templates0 = method_defaults("disendiff")
    with gr.Row():
        with gr.Column(scale=3):
            image = gr.File(label="image holding the concepts (PNG, JPEG, WebP, BMP)", file_types=["image"],
                            elem_id="learn-image")
            count = gr.Radio([1, 2, 3], value=2, label="concepts")
            concepts = [ConceptInputs(k) for k in range(MAX_CONCEPTS)]
        with gr.Column(scale=2):
            method = gr.Dropdown(methods, value="disendiff", label="method", elem_id="method")
            with gr.Accordion("the method's settings", open=False):
                help_md = gr.Markdown(settings_help("disendiff"))
            with gr.Row():
                steps = gr.Number(steps0, label="steps", precision=0, minimum=1, elem_id="steps")
                lr = gr.Number(lr0, label="learning rate", minimum=0, elem_id="lr")
                seed = gr.Number(0, label="seed", precision=0, minimum=0)
            templates = gr.Textbox(templates0, label="caption templates ({} = the concepts; | between several)",
                                   elem_id="templates")
            more = gr.Textbox("", label="more settings, KEY=VALUE per line (see the table above)", lines=3,
                              elem_id="more-settings")
            with gr.Row():
                start = gr.Button("Learn", variant="primary", elem_id="learn-button")
                stop = gr.Button("Cancel", elem_id="cancel-button")
            status = gr.HTML(status_html("Upload an image, name and paint each concept, then press Learn."),
                             elem_id="learn-status")
            loss = gr.LinePlot(x="step", y="loss", label="loss", height=200)
            heatmaps = gr.Gallery(label="attention while learning (token and class word per concept)", columns=4,
                                  height=220, elem_id="learn-heatmaps")
            used = gr.Gallery(label="what it learns from (the image and each concept's mask)", columns=4, height=160,
                              elem_id="learn-inputs")
            bundle = gr.File(label="bundle", elem_id="learn-bundle")

    count.change(lambda n: [gr.update(visible=k < n) for k in range(MAX_CONCEPTS)], count, [c.box for c in concepts])
    method.change(lambda m: (settings_help(m), *method_defaults(m)), method, [help_md, steps, lr, templates])
    image.change(lambda p: show_image(p), image, [status, *[c.editor for c in concepts]])

    fields = [image, count, method, steps, lr, seed, templates, more] + [w for c in concepts for w in c.inputs]
    def run(request: gr.Request, *values):
        yield from learn(page, *values, request=request)

    event = start.click(page.open_job, None, None, queue=False).then(
        run, fields, [status, loss, heatmaps, used, bundle, learned], concurrency_limit=1, concurrency_id="learn")
    stop.click(page.cancel_job, None, status, queue=False)
    return learned, event


def show_image(path: str | None):
    """Check an uploaded image by the command line's rules and put it in every concept's paint box."""
    if not path:
        return [status_html("Upload an image, name and paint each concept, then press Learn.")] + \
               [None] * MAX_CONCEPTS
    try:
        img = api.read_image(path, role="image", min_side=32)
    except UserError as e:
        return [error_html(e)] + [None] * MAX_CONCEPTS
    return [status_html(f"{img.size[0]}x{img.size[1]} image: paint each concept over it, or upload its mask.")] + \
        [editor_value(img) for _ in range(MAX_CONCEPTS)]


def gather(job: Path, image, count, method, steps, lr, seed, templates, more, *per_concept):
    """The concepts, sources and settings of a request, the inputs saved in `job` (the masks as the
    PNGs the workflow reads). Raises UserError with the command line's messages."""
    count = int(count)
    groups = [per_concept[5 * k: 5 * k + 5] for k in range(count)]
    concepts, masks, own = [], {}, []
    inputs = job / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    picture = None
    if image:
        picture = api.read_image(image, role="image", min_side=32)
        picture.save(inputs / "image.png")
    for k, (token, class_word, painted, mask_file, images) in enumerate(groups):
        token, class_word = (token or "").strip(), (class_word or "").strip()
        if not token or not class_word:
            raise UserError(f"concept {k + 1} needs a token and a class word, e.g. <cat1> and cat")
        concepts.append(api.Concept(token, class_word))
        mask = None
        if mask_file:
            if picture is None:
                raise UserError(f"the mask of {token} needs the image it belongs to: upload the image first")
            mask = api.read_mask(mask_file, picture.size, role=f"mask of {token}")
        elif picture is not None:
            mask = mask_from_editor(painted, picture.size)
        if mask is not None:
            masks[token] = inputs / f"mask_{k + 1}.png"
            mask.save(masks[token])
        own += [api.Source(p, concepts=(token,)) for p in images or []]
    sources = ([api.Source(inputs / "image.png", masks=masks)] if picture is not None else []) + own
    if not sources:
        raise UserError("no image given: upload the image holding the concepts, or each concept's own images")
    text = {"steps": str(int(steps)), "lr": str(lr), "seed": str(int(seed)), "templates": templates}
    for line in (more or "").splitlines():
        if line.strip():
            if "=" not in line:
                raise UserError(f"setting {line.strip()!r} must be KEY=VALUE, e.g. steps=100")
            key, value = line.split("=", 1)
            text[key.strip()] = value.strip()
    settings = api.parse_settings(method, text)
    return concepts, sources, settings, [inputs / "image.png"] * (picture is not None) + list(masks.values())


def learn(page: Page, *args, request: gr.Request | None = None):
    visitor = request.session_hash if request is not None else "local"
    cancel = page.cancels.get(visitor)
    job = page.work / "learn" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    keep = gr.skip()
    try:
        if cancel.is_set():
            yield status_html("Cancelled before it started."), keep, keep, keep, keep, keep
            return
        try:
            concepts, sources, settings, shown = gather(job, *args)
        except UserError as e:
            shutil.rmtree(job, ignore_errors=True)
            yield error_html(e), keep, keep, keep, None, keep
            return
        method, out = args[2], job / "concepts.safetensors"
        picture = api.read_image(shown[0]) if shown else None
        yield (status_html("Loading the base model ..."), None, [], [(str(p), p.stem) for p in shown], None, keep)
        redraw, rows, t0 = Every(1.0), [], time.monotonic()

        def work(report):
            def on_step(p: api.Progress):
                rows.append({"step": p.step, "loss": p.logs.get("loss", float("nan"))})
                # the page redraws about once a second: a browser redrawing every step takes CPU from training
                if redraw() or p.step == p.total:
                    report((p, [(img, label) for label, img in api.attention_images(p, picture)]))

            return api.learn(method, concepts, sources, out, base=page.base, settings=settings, on_step=on_step,
                             cancel=cancel.is_set, device=page.device)

        maps = []
        for kind, value in run_streaming(work, cancel):
            if kind == "error":
                shutil.rmtree(job, ignore_errors=True)
                yield error_html(value), keep, keep, keep, None, keep
                return
            if kind == "report":
                p, maps = value
                yield (status_html(f"step {p.step}/{p.total}, loss {p.logs.get('loss', float('nan')):.4f}, "
                                   f"{p.seconds:.0f} s", p.step, p.total), pd.DataFrame(list(rows)), maps, keep, keep,
                       keep)
            elif value is None:  # cancelled: the checkpoint and inputs go; nothing is left half-written
                shutil.rmtree(job, ignore_errors=True)
                yield status_html("Cancelled: nothing was written."), keep, keep, keep, None, keep
                return
            else:
                seconds = time.monotonic() - t0
                yield (status_html(f"Learned {', '.join(c.token for c in concepts)} in {seconds:.0f} s: "
                                   f"the bundle is below, and in the Generate tab.", 1, 1),
                       pd.DataFrame(rows), maps, keep, str(out), str(out))
    finally:
        page.cancels.close(visitor)
