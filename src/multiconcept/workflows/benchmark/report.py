"""The benchmark's offline HTML report.

Sections: settings (enough to repeat the run), each source with its masks
and the reference crops, the metric table (Combined / Concept 1 / Concept 2
/ Mean per method), charts of alignment against leakage, image grids per
prompt and per-token attention heatmaps. Everything is inlined; nothing is
fetched when the page is opened.
"""

from __future__ import annotations

import html
import io
from pathlib import Path

from PIL import Image

from ... import report

SECTIONS = ("Settings", "Sources: reference and masks", "Results", "Alignment vs leakage",
            "Image grids per prompt", "Attention heatmaps")


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4f}"


def with_sem(value, sem) -> str:
    return _fmt(value) + ("" if value is None or sem is None else f" ± {sem:.4f}")


def results_table(results: dict) -> str:
    """Mean ± standard error over (source, seed) units."""
    columns = results["columns"]
    rows = []
    for method, entry in results["table"].items():
        errors = results.get("sem", {}).get(method, {})
        for key, vals in entry.items():
            rows.append([method, results["rows"][key]] + [with_sem(vals.get(c), errors.get(key, {}).get(c)) for c in columns])
    return report.table(["method", "metric"] + [c.title() for c in columns], rows)


def per_source_table(results: dict) -> str:
    columns = results["columns"]
    metrics = [("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("leakage_clip_i", "leakage CLIP-I"),
               ("toyworld_leak", "ToyWorld leak"), ("toyworld_identity", "ToyWorld identity")]
    rows = []
    for c in results["cells"]:
        for key, label in metrics:
            vals = [c["summary"].get(col, {}).get(key) for col in columns]
            if any(v is not None for v in vals):
                rows.append([c["source"], c["method"], label] + [_fmt(v) for v in vals])
    return report.table(["source", "method", "metric"] + [c.title() for c in columns], rows)


def charts(results: dict) -> str:
    """Alignment against leakage, one colour per method: a point per source and
    a large marker for the method's mean (matplotlib, inlined PNG)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return report.note("matplotlib is not installed: pip install 'multiconcept[report]' for the charts.")
    panels = [("leakage_clip_i", "leakage: CLIP-I to the other concept (lower is better)", "clip_i", "image alignment (CLIP-I)"),
              ("clip_t", "text alignment (CLIP-T, raw cosine)", "clip_i", "image alignment (CLIP-I)")]
    if any(c["summary"].get("mean", {}).get("toyworld_leak") is not None for c in results["cells"]):
        panels.insert(1, ("toyworld_leak", "ToyWorld leakage: the other concept's parts (lower is better)",
                          "clip_i", "image alignment (CLIP-I)"))
    def has_data(xkey, ykey):
        return any(c["summary"].get("mean", {}).get(xkey) is not None and c["summary"]["mean"].get(ykey) is not None
                   for c in results["cells"])

    panels = [p for p in panels if has_data(p[0], p[2])]
    if not panels:
        return report.note("no alignment figures to chart")
    fig = Figure(figsize=(3.5 * len(panels), 3.3), dpi=100)
    FigureCanvasAgg(fig)
    methods = list(results["table"])
    colours = [f"C{i % 10}" for i in range(len(methods))]
    for k, (xkey, xlabel, ykey, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for method, colour in zip(methods, colours):
            pts = [(c["summary"]["mean"].get(xkey), c["summary"]["mean"].get(ykey))
                   for c in results["cells"] if c["method"] == method]
            pts = [(x, y) for x, y in pts if x is not None and y is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, s=18, color=colour, alpha=0.5)
            ax.scatter([sum(xs) / len(xs)], [sum(ys) / len(ys)], s=120, color=colour, edgecolor="black",
                       label=method, marker="o")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.locator_params(nbins=4)
        ax.ticklabel_format(useOffset=False)
        ax.grid(alpha=0.3)
        if k == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    img = Image.open(io.BytesIO(buf.getvalue()))
    return (f'<img alt="alignment vs leakage" style="max-width:100%" src="{report.data_uri(img)}">'
            + report.note("Each small point is one source (mean over its prompts' columns), the large marker the "
                          "method's mean over sources. Up and to the left is better."))


def _source_section(cells) -> str:
    from ...data import load_image, load_mask
    from ..sources import concept_crop

    parts, seen = [], set()
    for cell, _ in cells:
        src = cell.source
        if src.name in seen:
            continue
        seen.add(src.name)
        image = load_image(src.image)
        figs = [report.figure(image, f"{src.name} ({src.world})")]
        for c in src.concepts:
            mask = load_mask(c.mask, image.size)
            figs.append(report.figure(mask, f"mask {c.token} = {c.class_word}"))
            figs.append(report.figure(concept_crop(image, mask), f"reference crop {c.token}"))
        sig = "; ".join(f"{c.token}: {c.signature.full_description()}" for c in src.concepts if c.signature)
        parts.append(report.row(figs) + (report.note(f"ground truth: {sig}") if sig else ""))
    return "".join(parts)


def _thumb(path: Path, title: str, size: int = 64) -> str:
    return (f'<img class="px" style="margin:1px" width="{size}" height="{size}" title="{html.escape(title)}" '
            f'src="{report.data_uri(path)}">')


def _grids(cells, seeds, results: dict) -> str:
    """Per source a table: one row per prompt, the methods side by side, seeds in
    order, each with its prompt's mean image / text alignment (and leakage)."""
    prompt_scores = {(c["source"], c["method"], p["prompt"]): p for c in results["cells"] for p in c["prompts"]}
    by_source: dict[str, list] = {}
    for cell, _ in cells:
        by_source.setdefault(cell.source.name, []).append(cell)
    parts = []
    for name, group in by_source.items():
        head = "".join(f"<th>{html.escape(c.method)}</th>" for c in group)
        rows = []
        for prompt in group[0].prompts:
            tds = []
            for cell in group:
                d = cell.image_dir(prompt)
                sc = prompt_scores.get((name, cell.method, prompt.text), {})
                line = " · ".join(f"{label} {sc[k]:.3f}" for k, label in (("clip_i", "I"), ("clip_t", "T"),
                                                                           ("leakage_clip_i", "leak"))
                                  if sc.get(k) is not None)
                tds.append("<td>" + "".join(_thumb(d / f"{s:06d}.png", f"{cell.method} seed {s}") for s in seeds
                                            if (d / f"{s:06d}.png").is_file())
                           + f'<br><span class="note">{html.escape(line)}</span></td>')
            rows.append(f"<tr><td><b>{html.escape(prompt.kind)}</b><br><code>{html.escape(prompt.text)}</code></td>"
                        + "".join(tds) + "</tr>")
        parts.append(f"<h3>{html.escape(name)}</h3><table><tr><th>prompt</th>{head}</tr>{''.join(rows)}</table>"
                     + report.note(f"seeds {', '.join(map(str, seeds))} from left to right in every cell; under them "
                                   f"the prompt's mean CLIP-I (I), CLIP-T (T) and CLIP-I leakage (leak)"))
    return "".join(parts)


def _heatmaps(cells, seeds) -> str:
    parts = []
    for cell, _ in cells:
        first_of_kind = {}
        for p in cell.prompts:
            first_of_kind.setdefault(p.kind, p)
        for kind, prompt in first_of_kind.items():
            d = cell.image_dir(prompt)
            maps = sorted((d / "attention").glob(f"{seeds[0]:06d}_*.png"))
            if not maps:
                continue
            figs = [report.figure(d / f"{seeds[0]:06d}.png", "image", 80)]
            figs += [report.figure(m, m.stem.split("_", 2)[-1], 80) for m in maps]
            parts.append(report.prompt_line(f"{cell.source.name} / {cell.method} / {kind}", prompt.text) + report.row(figs))
    return "".join(parts) or report.note("no heatmaps were recorded")


def _settings(results: dict, run: dict) -> str:
    s, m = results["settings"], results["models"]
    rows = [
        ["methods", ", ".join(s["methods"])], ["protocol", s["protocol"]],
        ["protocol files", ", ".join(sorted({c["protocol_file"] for c in results["cells"]}))],
        ["sources", ", ".join(x["name"] for x in results["sources"])],
        ["base", f"{s['base'] or 'toyworld'} (fingerprint {s['base_fingerprint']})"],
        ["training", f"steps {s['steps'] or 'method default'}, seed {s['train_seed']}, "
                     f"params {dict(s['params']) or 'none'}"],
        ["sampler", f"{s['scheduler']}, {s['sample_steps']} steps, guidance {s['guidance']}"],
        ["seeds (every prompt)", ", ".join(map(str, s["seeds"]))], ["images per prompt", len(s["seeds"])],
        ["CLIP", m["clip"]["name"]], ["DINO", m["dino"]["name"] if m["dino"] else "not used"],
        ["text alignment scale", f"{m['scale']} = {m['scale_formula']} (raw cosine always in results.json)"],
        ["CLIP-T text prefix", repr(m["text_prefix"])],
        ["executor", run.get("executor", "")],
    ]
    rows += [[f"stage {k}", f"{v['ran']} of {v['jobs']} jobs run, {v['seconds']} s"] for k, v in run.get("stages", {}).items()]
    return report.table(["setting", "value"], rows)


def write_report(out: Path, results: dict, cells, run: dict) -> Path:
    seeds = results["settings"]["seeds"]
    body = {
        "Settings": _settings(results, run),
        "Sources: reference and masks": _source_section(cells),
        "Results": results_table(results) + report.note(
            "Image alignment: the whole source image for Combined prompts, the concept's masked crop for single-concept "
            "prompts. Leakage: alignment of single-concept generations to the OTHER concept's crop, and on ToyWorld "
            "the share of images whose objects carry the other concept's colours (exact, from the analytic checker). "
            "Lower leakage is better. Mean = mean of the columns.") + "<h3>Per source</h3>" + per_source_table(results),
        "Alignment vs leakage": charts(results),
        "Image grids per prompt": _grids(cells, seeds, results),
        "Attention heatmaps": _heatmaps(cells, seeds) + report.note(
            "Per-token cross-attention of the first seed of the first prompt of each kind, averaged over layers."),
    }
    return report.write_page(out / "report.html", "multiconcept benchmark", [report.section(k, body[k]) for k in SECTIONS])
