"""results.json: the cells' scores gathered into one table per source, with the settings that made them.

The unit of the error bars is a (source, seed) pair: its value in a column is the mean over that column's
prompts, the table's value the mean over units and `sem` its standard error. `units` keeps every unit's
value, so two methods can be compared pairwise on the same sources and seeds (`paired_units`).
"""

from __future__ import annotations

import json
from dataclasses import asdict

from ...metrics.stats import mean_sem, paired_difference
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
    ("toyworld_leak", "toyworld_leak", "ToyWorld leakage: most of the other concept's distinguishing parts on a subject"),
    ("toyworld_identity", "toyworld_identity", "ToyWorld identity: share of the prompted concepts' parts drawn right"),
    ("toyworld_present", "toyworld_present", "ToyWorld: share showing every prompted concept's kind"),
)


def column_names(source: Source) -> dict[str, str]:
    """Per-source kinds → positional columns, so sources with other tokens line up."""
    names = {COMBINED: "combined"}
    names.update({c.token: f"concept {i + 1}" for i, c in enumerate(source.concepts)})
    return names


def collect_results(cells: list[tuple[Cell, dict]], settings: BenchmarkSettings, fingerprint: str,
                    sources: list[Source]) -> dict:
    from ...metrics import SCALES

    out_cells = []
    scored = [(cell, json.loads(cell.scores.read_text())) for cell, _ in cells]  # each file read once
    for cell, scores in scored:
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
    values = _unit_values(scored, rows)
    table: dict = {}
    sem: dict = {}
    units: dict = {}
    for method in settings.methods:
        entry, errors, kept = {}, {}, {}
        for key, _, _ in rows:
            per_col = values.get(method, {}).get(key, {})
            if not per_col:
                continue
            kept[key] = {col: {u: sum(v) / len(v) for u, v in per_col[col].items()} for col in per_col}
            by_unit: dict[str, list[float]] = {}
            for col in per_col:
                for u, v in kept[key][col].items():
                    by_unit.setdefault(u, []).append(v)
            kept[key]["mean"] = {u: sum(v) / len(v) for u, v in by_unit.items()}
            estimates = {col: mean_sem(list(kept[key][col].values())) for col in columns if col in kept[key]}
            entry[key] = {col: estimates[col].mean if col in estimates else None for col in columns}
            errors[key] = {col: estimates[col].sem if col in estimates else None for col in columns}
        table[method], sem[method], units[method] = entry, errors, kept
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
        "sem": sem,
        "units": units,
        "cells": out_cells,
    }


def _unit_values(scored: list[tuple[Cell, dict]], rows) -> dict:
    """method → metric key → column → "source/seed" → the values of that unit's images."""
    out: dict = {}
    for cell, scores in scored:
        names = column_names(cell.source)
        for r in scores["images"]:
            if r["kind"] == "none":
                continue
            unit = f"{cell.source.name}/seed {r['seed']}"
            for key, metric, _ in rows:
                if r.get(metric) is not None:
                    (out.setdefault(cell.method, {}).setdefault(key, {}).setdefault(names.get(r["kind"], r["kind"]), {})
                     .setdefault(unit, []).append(float(r[metric])))
    return out


def paired_units(a: dict[str, float], b: dict[str, float]):
    """The paired difference a − b over the (source, seed) units both have (`units[method][key][column]`)."""
    shared = sorted(set(a) & set(b))
    return paired_difference([a[u] for u in shared], [b[u] for u in shared])
