"""`multiconcept generate`: a prompt + bundles -> PNGs (optionally inpainted)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError, require
from .options import BaseConfigOpt, BaseOpt, CompileOpt, DeviceOpt, DtypeOpt, base_source, number, out


def generate(
    prompt: str = typer.Argument(..., help="e.g. 'photo of a <cat1> cat and <dog1> dog on the beach'"),
    bundle: List[Path] = typer.Option([], "--bundle", "-b", help="bundle file; repeat to combine"),
    n: int = number(4, "-n", help="images", minimum=1),
    seed: int = number(0, "--seed", help="image i uses seed + i", minimum=0),
    output: Path = typer.Option(Path("out"), "--out", "-o", help="folder for the PNGs"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace PNGs of the same seeds already in --out"),
    steps: int = number(50, "--steps", help="denoising steps", minimum=1),
    guidance: float = number(6.0, "--guidance", help="classifier-free guidance scale (FLUX.1 [dev]: its distilled "
                             "guidance input; with --negative also true guidance)", minimum=0),
    scheduler: str = typer.Option("auto", help="auto (ddim; flow-euler on FLUX / SD3) | ddim | pndm | euler | euler-a | "
                                  "dpm | ddpm | flow-euler"),
    negative: str = typer.Option("", help="negative prompt"),
    attention_maps: bool = typer.Option(False, "--attention-maps", help="also write per-token heatmaps to OUT/attention"),
    lora: List[Path] = typer.Option([], "--lora", help="a LoRA .safetensors in diffusers', kohya's, A1111's or ComfyUI's "
                                    "layout (e.g. a style, or an export), added on top"),
    embedding: List[str] = typer.Option([], "--embedding", help="a textual-inversion .safetensors (kohya/A1111/ComfyUI/"
                                        "diffusers): FILE is the token <FILE's name>; '<tok>=FILE' picks the token"),
    lora_scale: float = number(1.0, "--lora-scale", help="weight of every --lora"),
    init_image: Optional[Path] = typer.Option(None, "--init-image", help="inpaint into this image (needs --inpaint-mask)"),
    inpaint_mask: Optional[Path] = typer.Option(None, "--inpaint-mask", help="white = the region to fill"),
    vae_slicing: bool = typer.Option(False, "--vae-slicing", help="decode the images one at a time (less memory, same images)"),
    vae_tiling: bool = typer.Option(False, "--vae-tiling", help="decode in overlapping tiles (large images on small GPUs; "
                                    "seams can show)"),
    base: Optional[str] = BaseOpt,
    base_config: Optional[str] = BaseConfigOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    compile: str = CompileOpt,
):
    """Generate images with learned concepts (optionally inpainted into another image)."""
    from ..images import read_image, read_mask
    from ..workflows.external import add_embedding, add_lora
    from ..workflows.generate import (
        Inpaint,
        SampleSettings,
        check_prompt_tokens,
        load_with_bundles,
        planned_paths,
    )
    from ..workflows.generate import generate as run

    settings = SampleSettings(steps=steps, guidance=guidance, scheduler=scheduler, negative_prompt=negative,
                              vae_slicing=vae_slicing, vae_tiling=vae_tiling, compile=compile)
    if (init_image is None) != (inpaint_mask is None):
        raise UserError("inpainting needs both --init-image and --inpaint-mask")
    require(not output.exists() or output.is_dir(), f"--out {output} is a file: give a folder for the PNGs")
    if not overwrite:
        clash = [p for p in planned_paths(output, n, seed) if p.exists()]
        if clash:
            raise UserError(f"{clash[0]} already exists: pass --overwrite to replace it, or pick another --out or --seed")
    inpaint = None
    if init_image:
        source = read_image(init_image, role="init image")
        inpaint = Inpaint(source, read_mask(inpaint_mask, source.size, role="inpainting mask"))
    check_prompt_tokens(prompt, [str(b) for b in bundle], embedding)
    loaded = load_with_bundles(base_source(base, base_config), [str(b) for b in bundle], device=device, dtype=dtype)
    for f in lora:
        add_lora(loaded, f, lora_scale)
    for e in embedding:
        add_embedding(loaded, e)
    paths = run(prompt, loaded, n, seed, output, settings, attention_maps=attention_maps, inpaint=inpaint)
    for p in paths:
        out.print(str(p))
