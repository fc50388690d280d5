"""`multiconcept train-encoder`: train a tuning-free subject model (FastComposer, Subject-Diffusion)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import require
from .options import BaseConfigOpt, BaseOpt, CompileOpt, DeviceOpt, DtypeOpt, base_source, key_values, main_process, number, out

ENCODER_METHODS = ("fastcomposer", "subject-diffusion")


def train_encoder(
    method: str = typer.Option(..., "--method", "-m", help="tuning-free model to train: fastcomposer | "
                                                                 "subject-diffusion"),
    data: str = typer.Option(..., "--data", help="'toyworld' (rendered on the fly); a folder `multiconcept "
                                                 "dataset build` wrote or its http(s) URL, or WebDataset tars ('DIR/*.tar', "
                                                 "'https://host/{00000..00099}.tar'), streamed; or a folder with "
                                                 "subjects.jsonl (one {image, caption, subjects: [{label, mask, box?}]} "
                                                 "per line)"),
    output: Path = typer.Option(..., "--out", "-o", help="model folder to write"),
    base: Optional[str] = BaseOpt,
    base_config: Optional[str] = BaseConfigOpt,
    image_encoder: Optional[str] = typer.Option(None, "--image-encoder", help="CLIP folder or hub id; default: ToyWorld's "
                                                                               "encoder CLIP, or a tiny tower on --base tiny"),
    steps: Optional[int] = number(None, help="optimiser steps (default: the paper's; FastComposer 150k, "
                                                            "Subject-Diffusion 450k)", minimum=1),
    lr: Optional[float] = number(None, help="learning rate (papers: FastComposer 1e-5, Subject-Diffusion "
                                                         "3e-5; ToyWorld needs ~1e-4)", above=0),
    batch_size: Optional[int] = number(None, help="images per micro-batch and process", minimum=1),
    grad_accum: Optional[int] = number(None, help="micro-batches per optimiser step", minimum=1),
    loc_weight: Optional[float] = number(None, help="λ of the localisation loss (FastComposer 1e-3, Subject-"
                                                                  "Diffusion 0.01; 0 = off)", minimum=0),
    seed: int = number(0, help="seed for data, crops, noise and timesteps", minimum=0),
    mixed_precision: str = typer.Option("no", help="no | fp16 | bf16"),
    param: List[str] = typer.Option([], "--param", "-p", help="setting KEY=VALUE, e.g. vision_layers=0 (see `multiconcept "
                                                              "methods` for the fine-tuning ones; FastComposerConfig / "
                                                              "SubjectDiffusionConfig for these)"),
    max_minutes: Optional[float] = number(None, help="stop after this many minutes of training (summed over resumed runs) "
                                                      "and write the model so far", above=0),
    resume: bool = typer.Option(False, help="continue from the checkpoint in --out (a streamed dataset from the same "
                                            "sample)"),
    workers: int = number(0, help="DataLoader processes decoding and augmenting streamed samples, per process "
                                  "(0: in the training process)", minimum=0),
    sample_log: bool = typer.Option(False, help="streamed data: append each micro-batch's step, position and sample "
                                                "keys to OUT/samples.jsonl"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    progress: bool = typer.Option(True, help="show a progress bar"),
    compile: str = CompileOpt,
):
    """Train a tuning-free subject model (FastComposer, Subject-Diffusion) on subject-annotated images."""
    from ..methods.fastcomposer import FastComposerConfig
    from ..methods.settings import apply_overrides
    from ..methods.subject_diffusion import SubjectDiffusionConfig
    from ..workflows.train_encoder import train_encoder as run
    from ..workflows.train_subject_diffusion import train_subject_diffusion

    require(method in ENCODER_METHODS, f"unknown encoder method {method!r}: choose one of {', '.join(ENCODER_METHODS)}")
    overrides = key_values(param, "--param")
    for k, v in (("steps", steps), ("lr", lr), ("batch_size", batch_size), ("grad_accum", grad_accum),
                 ("loc_weight", loc_weight)):
        if v is not None:
            overrides[k] = str(v)
    overrides["seed"] = str(seed)
    overrides["mixed_precision"] = mixed_precision
    overrides["compile"] = compile
    if method == "subject-diffusion":
        run, cfg = train_subject_diffusion, apply_overrides(SubjectDiffusionConfig(), overrides)
    else:
        cfg = apply_overrides(FastComposerConfig(), overrides)
    path = run(data, output, base=base_source(base, base_config), cfg=cfg, image_encoder=image_encoder, resume=resume,
               progress=progress, max_minutes=max_minutes, device=device, dtype=dtype, workers=workers,
               sample_log=sample_log)
    if main_process():
        out.print(f"wrote {path}")
