"""`multiconcept dataset build`: subject datasets (caption, nouns, boxes, masks) for tuning-free encoders."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..datasets import defaults as D
from .options import DeviceOpt, DtypeOpt, key_values, out

app = typer.Typer(no_args_is_help=True, help="Subject datasets for tuning-free encoders: build them.")


@app.command("build")
def build_cmd(
    source: str = typer.Argument(..., help="image folder, list file (one path per line), a WebDataset .tar, a folder "
                                           "of tars, or a quoted glob such as 'laion/0*.tar'"),
    output: Path = typer.Option(..., "--out", "-o", help="folder for shards/, index.parquet, stats.json, rejects.jsonl; "
                                                          "re-running with the same settings resumes"),
    captioner: str = typer.Option(D.CAPTIONER, help="BLIP, BLIP-2 or Florence-2 hub id or "
                                  "folder; 'source' keeps the source's .txt; 'toyworld' its ground truth"),
    nouns: str = typer.Option(D.NOUNS, help="spacy[:MODEL] (install its model yourself) | vocab:FILE "
                              "(one noun per line) | grounding (Florence-2's phrases) | toyworld"),
    detector: str = typer.Option(D.DETECTOR, help="Grounding DINO or OWLv2 hub id or folder"),
    segmenter: str = typer.Option(D.SEGMENTER, help="SAM hub id or folder (SAM 2 needs torchvision: refused)"),
    box_threshold: float = typer.Option(D.BOX_THRESHOLD, help="detector box score threshold (published 0.25; OWLv2 wants ~0.1)"),
    text_threshold: float = typer.Option(D.TEXT_THRESHOLD, help="Grounding DINO's text-token threshold (published 0.2)"),
    nms: str = typer.Option(str(D.NMS_IOU), help="class-agnostic NMS IoU (published 0.5), or 'off'"),
    filters: str = typer.Option("published", help="filter profile: published | toyworld (64 px, 1-3 objects) | off"),
    filter_: List[str] = typer.Option([], "--filter", help="one filter KEY=VALUE over the profile, 'off' to disable, "
                                      "e.g. --filter min_long_side=512 (see the list in `dataset build --help`)"),
    batch_size: int = typer.Option(8, help="images per model call"),
    shard_size: int = typer.Option(1000, help="images per output shard from a folder or list (a tar keeps its own)"),
    mask_format: str = typer.Option("png", help="png (one PNG per entity) | rle (COCO RLE in the json; needs pycocotools)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads per process"),
    # `--ray [ADDRESS]` cannot be: typer 0.29 has no options with an optional value, so the address is its own option
    ray: bool = typer.Option(False, "--ray", help="run on Ray (a local Ray unless --ray-address names a cluster)"),
    ray_address: Optional[str] = typer.Option(None, help="the Ray cluster to join: ray://host:10001, or auto "
                                              "(the cluster this machine belongs to); implies --ray"),
    ray_workers: int = typer.Option(2, help="Ray actors, each loading every model once"),
    ray_gpus: float = typer.Option(0.0, help="GPUs per Ray actor"),
    ray_cpus: float = typer.Option(1.0, help="CPUs per Ray actor"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    progress: bool = typer.Option(True, help="show per-stage images/s as shards are written"),
):
    """Caption -> nouns -> boxes -> masks -> filters -> WebDataset shards + Parquet index (Subject-Diffusion's SDD)."""
    from ..datasets.filters import FilterSettings
    from ..datasets.pipeline import StageSpec
    from ..errors import UserError
    from ..workflows.dataset import BuildSettings, build

    try:
        nms_iou = None if nms.lower() == "off" else float(nms)
    except ValueError as e:
        raise UserError(f"--nms {nms}: give an IoU such as 0.5, or 'off'") from e
    settings = FilterSettings.profile(filters).with_overrides(key_values(filter_, "--filter"))
    spec = StageSpec(captioner, nouns, detector, segmenter, box_threshold, text_threshold, nms_iou, settings, device, dtype)
    cfg = BuildSettings(spec, batch_size, shard_size, mask_format, threads, ray or ray_address is not None,
                        ray_address, ray_workers, ray_gpus, ray_cpus)

    last = {"shard": None, "line": ""}

    def show(shard, tally):
        rates = " ".join(f"{k} {v['images_per_s']:.1f}" for k, v in tally.report()["stages"].items()
                         if v["images_per_s"] is not None)
        if last["shard"] not in (None, shard):  # a shard is finished when the next one starts
            out.print(last["line"], highlight=False)
        last["shard"] = shard
        last["line"] = (f"shard {shard}: {tally.images} images so far, {tally.kept} kept, {tally.rejected} rejected "
                        f"| images/s {rates}")

    report = build(source, output, cfg, progress=show if progress else None)
    if last["line"]:
        out.print(last["line"], highlight=False)
    img = report["images"]
    out.print(f"{output}: {report['shards']} shards, {img['kept']} of {img['in']} images kept "
              f"({report['entities_kept']} entities), {img['rejected']} rejected (rejects.jsonl); details in stats.json",
              highlight=False)


def _filter_help() -> str:
    from dataclasses import fields

    from ..datasets.filters import FilterSettings

    return "; ".join(f"{f.name} (default {f.default}): {f.metadata['help']}" for f in fields(FilterSettings))


build_cmd.__doc__ += "\n\nFilters (--filter KEY=VALUE): " + _filter_help()
