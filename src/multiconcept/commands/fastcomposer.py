"""FastComposer verbs: train-encoder, compose, convert-fastcomposer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from ..cli import BaseOpt, DeviceOpt, DtypeOpt, app, key_values, out, number
from ..errors import UserError, require

ENCODER_METHODS = ("fastcomposer",)


@app.command("train-encoder")
def train_encoder(
    method: str = typer.Option(..., "--method", "-m", help="tuning-free model to train: fastcomposer"),
    data: str = typer.Option(..., "--data", help="'toyworld' (rendered on the fly) or a folder with subjects.jsonl "
                                                 "(one {image, caption, subjects: [{label, mask, box?}]} per line)"),
    output: Path = typer.Option(..., "--out", "-o", help="model folder to write"),
    base: Optional[str] = BaseOpt,
    image_encoder: Optional[str] = typer.Option(None, "--image-encoder", help="CLIP folder or hub id; default: ToyWorld's "
                                                                               "evaluator, or a tiny tower on --base tiny"),
    steps: Optional[int] = number(None, help="optimiser steps (default: the paper's 150k)", minimum=1),
    lr: Optional[float] = number(None, help="learning rate (paper 1e-5; ToyWorld needs ~1e-4)", above=0),
    batch_size: Optional[int] = number(None, help="images per micro-batch and process", minimum=1),
    grad_accum: Optional[int] = number(None, help="micro-batches per optimiser step", minimum=1),
    loc_weight: Optional[float] = number(None, help="λ of the localisation loss (paper 1e-3; 0 = off)", minimum=0),
    seed: int = number(0, help="seed for data, crops, noise and timesteps", minimum=0),
    mixed_precision: str = typer.Option("no", help="no | fp16 | bf16"),
    param: List[str] = typer.Option([], "--param", "-p", help="setting KEY=VALUE, e.g. vision_layers=0 (see `multiconcept methods` "
                                                              "for the fine-tuning ones; FastComposerConfig for these)"),
    max_minutes: Optional[float] = number(None, help="stop after this many minutes and write the model so far", above=0),
    resume: bool = typer.Option(False, help="continue from the checkpoint in --out"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    progress: bool = typer.Option(True, help="show a progress bar"),
):
    """Train a tuning-free subject encoder (FastComposer) on subject-annotated images."""
    from ..methods.fastcomposer import FastComposerConfig, apply_settings
    from ..workflows.train_encoder import train_encoder as run

    require(method in ENCODER_METHODS, f"unknown encoder method {method!r}: choose one of {', '.join(ENCODER_METHODS)}")
    require(data == "toyworld" or Path(data).is_dir(), f"--data {data} is neither 'toyworld' nor a folder: pass one of them")
    overrides = key_values(param, "--param")
    for k, v in (("steps", steps), ("lr", lr), ("batch_size", batch_size), ("grad_accum", grad_accum), ("loc_weight", loc_weight)):
        if v is not None:
            overrides[k] = str(v)
    overrides["seed"] = str(seed)
    overrides["mixed_precision"] = mixed_precision
    cfg = apply_settings(FastComposerConfig(), overrides)
    require(max_minutes is None or max_minutes > 0, f"--max-minutes must be positive, got {max_minutes}")
    path = run(data, output, base=base, cfg=cfg, image_encoder=image_encoder, resume=resume, progress=progress,
               max_minutes=max_minutes, device=device, dtype=dtype)
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch / torchrun only the main process speaks
        out.print(f"wrote {path}")


@app.command()
def compose(
    prompt: str = typer.Argument(..., help="subjects marked after their nouns, e.g. 'a star <img> and a circle <img> on a gray background'"),
    subject: List[str] = typer.Option([], "--subject", "-s", help="IMG or IMG:MASK (white = subject), one per marker, in marker order"),
    model: Path = typer.Option(..., "--model", help="FastComposer model folder (train-encoder or convert-fastcomposer)"),
    alpha: float = number(0.7, help="share of steps conditioned on the subjects; the first 1-alpha are text-only", minimum=0),
    guidance: float = number(5.0, help="classifier-free guidance scale", minimum=0),
    steps: int = number(50, help="denoising steps", minimum=1),
    scheduler: str = typer.Option("ddim", help="ddim | pndm | euler | euler-a | dpm | ddpm"),
    seed: int = number(0, help="image i uses seed + i", minimum=0),
    n: int = number(1, "-n", help="images", minimum=1),
    output: Path = typer.Option(Path("out"), "--out", "-o", help="folder for the PNGs"),
    base: Optional[str] = typer.Option(None, "--base", help="base pipeline; default: the one the model names"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Generate images of given subjects with no per-subject training (FastComposer)."""
    from ..workflows.compose import ComposeSettings, compose as run

    settings = ComposeSettings(steps=steps, guidance=guidance, alpha=alpha, scheduler=scheduler)
    for p in run(prompt, subject, model, n=n, seed=seed, out_dir=output, settings=settings, base=base, device=device, dtype=dtype):
        out.print(str(p))


@app.command("convert-fastcomposer")
def convert_fastcomposer(
    ckpt: Path = typer.Argument(..., help="the released FastComposer state dict (.bin / .pt), loaded weights-only"),
    output: Path = typer.Option(..., "--out", "-o", help="model folder to write"),
    base: Optional[str] = typer.Option(None, "--base", help="check the UNet against this base and record its fingerprint "
                                                            "(e.g. a local SD 1.5 folder)"),
    vision_heads: Optional[int] = number(None, help="attention heads of the vision tower (default: width / 64, as CLIP)", minimum=1),
):
    """Convert the official FastComposer checkpoint to safetensors in current diffusers/transformers names."""
    from ..convert import convert_fastcomposer as run

    if vision_heads is not None and vision_heads < 1:
        raise UserError(f"--vision-heads must be at least 1, got {vision_heads}")
    out.print(f"wrote {run(ckpt, output, base=base, vision_heads=vision_heads)}")
