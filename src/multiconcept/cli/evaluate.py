"""`multiconcept evaluate`: score generations against references (CLIP-T, CLIP-I, DINO, leakage)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..errors import UserError
from .options import BaseConfigOpt, BaseOpt, ClipOpt, DinoOpt, PrefixOpt, ScaleOpt, base_source, number, out


def _summary_table(summary: dict, title: str) -> Table:
    columns = summary["columns"] + ["mean"]
    t = Table("metric", *[c.title() if c in ("combined", "mean") else c for c in columns], title=title)
    metrics = [k for k in ("clip_i", "clip_t", "clip_t_clipscore", "clip_t_100", "dino", "fidelity_clip_i", "fidelity_dino",
                           "fidelity_missing", "fidelity_confused", "leakage_clip_i",
                           "leakage_dino", "toyworld_leak", "toyworld_identity", "toyworld_present")
               if any(summary[c].get(k) is not None for c in columns)]
    for k in metrics:
        t.add_row(k, *["–" if summary[c].get(k) is None else f"{summary[c][k]:.4f}" for c in columns])
    return t


def evaluate(
    gen_dir: Path = typer.Argument(..., help="folder of PNGs written by `multiconcept generate` (searched recursively)"),
    reference: List[str] = typer.Option(..., "--reference", "-r", help="source image, folder, source folder "
                                        "(concepts.json), or TOKEN=PATH for one concept's images; repeatable"),
    reference_mask: List[str] = typer.Option([], "--reference-mask", help="TOKEN=MASK over the source image: that "
                                             "concept's reference is its masked crop; repeatable"),
    clip: Optional[str] = ClipOpt,
    dino: Optional[str] = DinoOpt,
    scale: str = ScaleOpt,
    text_prefix: str = PrefixOpt,
    output: Path = typer.Option(Path("results.json"), "--out", "-o", help="JSON file to write"),
    batch_size: int = number(64, help="images per model call", minimum=1),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | mps"),
    overfitting: bool = typer.Option(False, "--overfitting", help="add Infusion's overfitting metrics (needs the bundles)"),
    bundle: List[Path] = typer.Option([], "--bundle", "-b", help="bundle file for --overfitting (default: the ones the "
                                      "metadata names, found beside GEN_DIR)"),
    base: Optional[str] = BaseOpt,
    base_config: Optional[str] = BaseConfigOpt,
    seed: int = number(0, help="seed for --overfitting's samples", minimum=0),
    detector: Optional[str] = typer.Option(None, "--detector", help="OWLv2 or Grounding DINO checkpoint (folder or hub "
                                           "id, e.g. google/owlv2-base-patch16-ensemble) that finds each subject for the "
                                           "multi-subject fidelity; ToyWorld images use the analytic checker"),
    detector_threshold: float = number(0.1, "--detector-threshold", minimum=0.0,
                                       help="detector box threshold (0.1: OWLv2's usual; Grounding DINO's is 0.25)"),
):
    """Score generations: CLIP-T, CLIP-I, DINO, leakage, multi-subject fidelity; writes JSON."""
    from ..workflows.evaluate import evaluate as run

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    result = run(gen_dir, reference, reference_mask, clip=clip, dino=dino, scale=scale, text_prefix=text_prefix,
                 out=output, device=device, batch_size=batch_size, overfitting=overfitting,
                 bundles=[str(b) for b in bundle], base=base_source(base, base_config), seed=seed, detector=detector,
                 detector_threshold=detector_threshold)
    out.print(_summary_table(result["summary"], f"{len(result['images'])} images, CLIP {result['models']['clip']['name']}"))
    if "overfitting" in result:
        out.print("overfitting: " + json.dumps(result["overfitting"])[:400])
    out.print(f"wrote {output}")
