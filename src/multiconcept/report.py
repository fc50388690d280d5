"""Self-contained HTML pages (images inlined as data URIs, no network)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from .bundle import atomic_write
from .images import read_image

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.row{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
figure{margin:0;text-align:center;font-size:.8em}
img.px{image-rendering:pixelated}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.note{color:#666;font-size:.9em}"""


def data_uri(img: Image.Image | str | Path) -> str:
    if not isinstance(img, Image.Image):
        img = read_image(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def figure(img, caption: str = "", size: int = 128) -> str:
    return (f'<figure><img class="px" width="{size}" height="{size}" src="{data_uri(img)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def prompt_line(label: str, prompt: str) -> str:
    """'label: prompt' with the prompt as code; both escaped, since a concept token (<s1>) is an HTML tag."""
    return f"<p>{html.escape(label)}: <code>{html.escape(prompt)}</code></p>"


def row(figures: list[str]) -> str:
    return '<div class="row">' + "".join(figures) + "</div>"


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def section(title: str, body: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n{body}\n"


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def write_page(path: str | Path, title: str, sections: list[str]) -> Path:
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>\n" + "".join(sections) + "</body></html>")
    return atomic_write(path, lambda tmp: Path(tmp).write_text(doc, encoding="utf-8"))
