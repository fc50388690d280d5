"""`multiconcept learn`: images (+ masks) -> one bundle."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .options import BaseConfigOpt, BaseOpt, CompileOpt, DeviceOpt, DtypeOpt, base_source, key_values, main_process, number, out

IMAGE_RULES = ("Images: PNG, JPEG, WebP or BMP, at least 32 and at most 8192 pixels on a side (--max-image-side); "
               "transparent pixels count as white in images and as black in masks; a mask is white on black.")


def learn(
    method: str = typer.Option(..., "--method", "-m", help="textual-inversion | custom-diffusion | lora | ... "
                                                           "(see `multiconcept methods`)"),
    concept: List[str] = typer.Option(..., "--concept", "-c", help="TOKEN=CLASS, e.g. '<cat1>=cat'; repeat for several"),
    image: List[str] = typer.Option(..., "--image", "-i", help="image or folder holding every concept, "
                                                               "or TOKEN=PATH for one concept's images"),
    mask: List[str] = typer.Option([], "--mask", help="TOKEN=PATH, one per image of that concept, in order (white = concept)"),
    output: Path = typer.Option(..., "--out", "-o", help="bundle file to write (.safetensors); "
                                                         "an existing one needs --overwrite"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing bundle at --out"),
    base: Optional[str] = BaseOpt,
    base_config: Optional[str] = BaseConfigOpt,
    steps: Optional[int] = number(None, "--steps", help="optimiser steps (default: the method's)", minimum=1),
    lr: Optional[float] = number(None, "--lr", help="learning rate (default: the method's)", above=0),
    batch_size: Optional[int] = number(None, "--batch-size", help="images per micro-batch", minimum=1),
    grad_accum: Optional[int] = number(None, "--grad-accum", help="micro-batches per optimiser step", minimum=1),
    seed: int = number(0, "--seed", help="seed for data order, noise and timesteps", minimum=0),
    mixed_precision: str = typer.Option("no", help="no | fp16 | bf16"),
    reg_dir: Optional[Path] = typer.Option(None, help="regularisation images, each with a .txt caption beside it"),
    reg_generate: int = number(0, "--reg-generate", help="draw this many class-prompt images with the base as regularisation",
                               minimum=0),
    reg_steps: int = number(50, "--reg-steps", help="denoising steps per --reg-generate image (diffusers' scripts: 50)",
                            minimum=1),
    param: List[str] = typer.Option([], "--param", "-p", help="method setting KEY=VALUE (see `multiconcept methods NAME`)"),
    resume: bool = typer.Option(False, help="continue from the checkpoint beside --out"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    progress: bool = typer.Option(True, help="show a progress bar"),
    compile: str = CompileOpt,
):
    from ..workflows.learn import learn as run

    overrides = key_values(param, "--param")
    for k, v in (("steps", steps), ("lr", lr), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if v is not None:
            overrides[k] = str(v)
    overrides["seed"] = str(seed)
    overrides["mixed_precision"] = mixed_precision
    overrides["compile"] = compile
    path = run(method, concept, image, mask, output, base=base_source(base, base_config), overrides=overrides,
               reg_dir=reg_dir, reg_generate=reg_generate, reg_steps=reg_steps, resume=resume, device=device, dtype=dtype,
               progress=progress, overwrite=overwrite)
    if main_process():
        out.print(f"wrote {path}")


learn.__doc__ = "Learn concepts from images; write one bundle.\n\n" + IMAGE_RULES
