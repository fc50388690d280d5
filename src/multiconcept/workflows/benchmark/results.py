"""results.json: the cells' scores gathered into one table per source, with the settings that made them."""

from __future__ import annotations

import json
from dataclasses import asdict

from ...protocols import COMBINED
from ..scoring import models_block
from ..sources import Source
from .jobs import Cell, cached_scorers
from .settings import RESULTS_VERSION, BenchmarkSettings

ALIGNMENT_ROWS = (  # (results key, per-image metric, what it is)
    ("image_alignment", "clip_i", "CLIP-I"),
    ("image_alignment_per_subject", "clip_i_subject_mean", "CLIP-I to each subject's crop, mean (multi-subject)"),
    ("multi_subject_fidelity", "fidelity_clip_i", "multi-subject fidelity: each subject's detection vs its crop, CLIP-I "
     "(missing or confused = 0)"),
    ("text_alignment", "clip_t", "CLIP-T (raw cosine)"),
    ("dino", "dino", "DINO"),
    ("leakage", "leakage_clip_i", "leakage: CLIP-I to the other concept"),
    ("leakage_dino", "leakage_dino", "leakage: DINO to the other concept"),
    ("toyworld_colour_leak", "toyworld_colour_leak", "ToyWorld leakage: share with the other concept's colours"),
    ("toyworld_object_leak", "toyworld_object_leak", "ToyWorld leakage: share with the other concept's object"),
    ("toyworld_present", "toyworld_present", "ToyWorld: share showing the prompted concepts' colours"),
)


def column_names(source: Source) -> dict[str, str]:
    """Per-source kinds → positional columns, so sources with other tokens line up."""
    names = {COMBINED: "combined"}
    names.update({c.token: f"concept {i + 1}" for i, c in enumerate(source.concepts)})
    return names


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def collect_results(cells: list[tuple[Cell, dict]], settings: BenchmarkSettings, fingerprint: str,
                    sources: list[Source]) -> dict:
    from ...metrics import SCALES

    out_cells = []
    for cell, digests in cells:
        scores = json.loads(cell.scores.read_text())
        names = column_names(cell.source)
        summary = {names.get(k, k): v for k, v in scores["summary"].items() if k != "columns"}
        out_cells.append({"source": cell.source.name, "method": cell.method, "protocol_file": cell.protocol_file,
                          "tokens": cell.source.tokens, "summary": summary, "prompts": scores["prompts"]})
    columns = []
    for c in out_cells:
        for k in c["summary"]:
            if k not in columns and k not in ("mean", "none"):
                columns.append(k)
    columns = sorted(columns, key=lambda k: (k != "combined", k)) + ["mean"]
    if settings.scale != "raw":
        rows = ALIGNMENT_ROWS[:4] + ((f"text_alignment_{settings.scale}", f"clip_t_{settings.scale}",
                                      f"CLIP-T, {SCALES[settings.scale][0]}"),) + ALIGNMENT_ROWS[4:]
    else:
        rows = ALIGNMENT_ROWS
    table: dict = {}
    for method in settings.methods:
        mine = [c for c in out_cells if c["method"] == method]
        entry = {}
        for key, metric, label in rows:
            vals = {col: _mean(c["summary"].get(col, {}).get(metric) for c in mine) for col in columns}
            if any(v is not None for v in vals.values()):
                entry[key] = vals
        table[method] = entry
    return {
        "version": RESULTS_VERSION,
        "settings": {**{k: v for k, v in asdict(settings).items() if k not in ("threads", "device")},
                     "base_fingerprint": fingerprint},
        "models": models_block(cached_scorers(settings.clip, settings.dino, settings.device), settings.scale,
                               settings.text_prefix),
        "sources": [{"name": s.name, **s.to_dict()} for s in sources],
        "columns": columns,
        "rows": {key: label for key, _, label in rows},
        "table": table,
        "cells": out_cells,
    }
