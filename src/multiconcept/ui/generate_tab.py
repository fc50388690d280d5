"""The Generate tab: bundles (just learned, uploaded or from a folder), a prompt with their tokens,
seeds, steps, guidance and how many images; the grid, each token's attention map and the metadata.

Generation is `multiconcept.api.generate_files`, which writes what `multiconcept
generate --attention-maps` writes (PNGs with their settings, per-token heatmaps).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import gradio as gr

from .. import api
from ..errors import UserError
from .common import Page, error_html, status_html


def bundle_choices(learned: str | None, uploaded: list[str] | None, folder: str | None) -> list[tuple[str, str]]:
    """(label, path) of every bundle on offer: the one just learned, the uploaded ones, a folder's."""
    found = [("just learned: " + Path(learned).name, learned)] if learned and Path(learned).is_file() else []
    found += [("uploaded: " + Path(p).name, p) for p in uploaded or []]
    if folder and folder.strip():
        where = Path(folder.strip()).expanduser()
        if not where.is_dir():
            raise UserError(f"bundle folder {where} is not a folder: give a folder holding .safetensors bundles")
        found += [(str(p), str(p)) for p in sorted(where.glob("*.safetensors"))]
    return found


def describe(bundles: list[str] | None, prompt: str) -> tuple[str, str]:
    """Markdown naming each bundle's tokens and class words, and a prompt holding them when none is given."""
    concepts = []
    for path in bundles or []:
        b = api.load_bundle(path)
        concepts += [(t, c, b.method) for t, c in zip(b.tokens, b.class_words)]
    if not concepts:
        return "No bundle chosen: the prompt uses the base alone.", prompt
    offered = ", ".join(f"`{t}` ({c}, {m})" for t, c, m in concepts)
    suggestion = " and ".join(f"a {t} {c}" for t, c, _ in concepts)
    return f"Tokens: {offered}", prompt if prompt.strip() else suggestion


def build(page: Page, learned: gr.State, learned_event) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            bundles = gr.Dropdown([], multiselect=True, label="bundles", elem_id="gen-bundles")
            uploads = gr.File(label="upload bundles (.safetensors)", file_count="multiple", file_types=[".safetensors"])
            with gr.Row():
                folder = gr.Textbox(label="or a folder of bundles on this machine", scale=3)
                scan = gr.Button("Find", scale=1)
            tokens = gr.Markdown("No bundle chosen: the prompt uses the base alone.", elem_id="gen-tokens")
            prompt = gr.Textbox(label="prompt", lines=2, elem_id="gen-prompt")
            with gr.Row():
                seed = gr.Number(0, label="first seed", precision=0, minimum=0)
                n = gr.Slider(1, 8, value=4, step=1, label="images", elem_id="gen-n")
            with gr.Row():
                steps = gr.Slider(1, 100, value=25, step=1, label="steps", elem_id="gen-steps")
                guidance = gr.Slider(0, 15, value=4.0, step=0.5, label="guidance")
            run = gr.Button("Generate", variant="primary", elem_id="generate-button")
            status = gr.HTML("", elem_id="gen-status")
        with gr.Column(scale=3):
            grid = gr.Gallery(label="images (select one for its attention maps and metadata)", columns=4,
                              elem_id="gen-grid", height=300)
            attention = gr.Gallery(label="attention per prompt token", columns=6, height=200, elem_id="gen-attention")
            metadata = gr.JSON(label="metadata", elem_id="gen-metadata")
    results = gr.State([])

    def offer(learned_path, uploaded, where, chosen):
        try:
            choices = bundle_choices(learned_path, uploaded, where)
        except UserError as e:
            return gr.skip(), error_html(e)
        paths = [p for _, p in choices]
        keep = [c for c in chosen or [] if c in paths]
        fresh = [learned_path] if learned_path in paths and learned_path not in keep else []
        return gr.update(choices=choices, value=keep + fresh), ""

    def show_tokens(chosen, text):
        try:
            offered, suggestion = describe(chosen, text or "")
        except UserError as e:
            return error_html(e), gr.skip()
        # a prompt already typed is never replaced (this event may answer after the typing)
        return offered, gr.skip() if (text or "").strip() else suggestion

    learned_event.then(offer, [learned, uploads, folder, bundles], [bundles, status])
    uploads.change(offer, [learned, uploads, folder, bundles], [bundles, status])
    scan.click(offer, [learned, uploads, folder, bundles], [bundles, status])
    bundles.change(show_tokens, [bundles, prompt], [tokens, prompt])

    def generate(chosen, text, first, count, n_steps, scale):
        out = page.work / "generate" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        t0 = time.monotonic()
        try:
            made = api.generate_files(text, chosen or [], out, n=int(count), seed=int(first), attention_maps=True,
                                      sampling=api.SampleSettings(steps=int(n_steps), guidance=float(scale)),
                                      base=page.base, device=page.device)
        except UserError as e:
            return error_html(e), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        items = [{"path": str(g.path), "attention": [(str(p), label) for label, p in g.attention],
                  "metadata": g.metadata} for g in made]
        return (status_html(f"{len(made)} images in {time.monotonic() - t0:.0f} s, written to {out}"),
                [(i["path"], f"seed {g.seed}") for i, g in zip(items, made)], items, *picked(items, 0))

    def picked(items, index):
        if not items:
            return [], None
        item = items[min(index, len(items) - 1)]
        return [(p, label) for p, label in item["attention"]], item["metadata"]

    def select(items, evt: gr.SelectData):
        return picked(items, evt.index if isinstance(evt.index, int) else 0)

    run.click(generate, [bundles, prompt, seed, n, steps, guidance], [status, grid, results, attention, metadata],
              concurrency_limit=1, concurrency_id="generate")
    grid.select(select, results, [attention, metadata])
