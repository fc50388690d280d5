"""The `multiconcept` command: parse, validate, call a workflow, print.

Every UserError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys

# library chatter (e.g. "CLIPImageProcessor requires torchvision") is not the user's business
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multi-concept personalised text-to-image diffusion.")
toyworld_app = typer.Typer(no_args_is_help=True, help="The embedded synthetic world: build its models.")
app.add_typer(toyworld_app, name="toyworld")
out = Console()
err = Console(stderr=True)

BaseOpt = typer.Option(None, "--base", help="pipeline folder, hub id, 'tiny' (random test model) or 'toyworld' (default)")
DeviceOpt = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps")
DtypeOpt = typer.Option("fp32", help="fp32 | fp16 | bf16 (weights of the frozen base)")


def key_values(pairs: list[str], what: str) -> dict[str, str]:
    """["k=v", ...] from repeated --param style options -> {k: v}; one-line error otherwise."""
    d = {}
    for p in pairs or []:
        if "=" not in p:
            raise UserError(f"{what} {p!r} must be KEY=VALUE, e.g. steps=100")
        k, v = p.split("=", 1)
        d[k.strip()] = v.strip()
    return d


@app.command()
def learn(
    method: str = typer.Option(..., "--method", "-m", help="textual-inversion | custom-diffusion | lora | ... (see `multiconcept methods`)"),
    concept: List[str] = typer.Option(..., "--concept", "-c", help="TOKEN=CLASS, e.g. '<cat1>=cat'; repeat for several"),
    image: List[str] = typer.Option(..., "--image", "-i", help="image or folder holding every concept, or TOKEN=PATH for one concept's images"),
    mask: List[str] = typer.Option([], "--mask", help="TOKEN=PATH, one per image of that concept, in order (white = concept)"),
    output: Path = typer.Option(..., "--out", "-o", help="bundle file to write (.safetensors)"),
    base: Optional[str] = BaseOpt,
    steps: Optional[int] = typer.Option(None, help="optimiser steps (default: the method's)"),
    lr: Optional[float] = typer.Option(None, help="learning rate (default: the method's)"),
    batch_size: Optional[int] = typer.Option(None, help="images per micro-batch"),
    grad_accum: Optional[int] = typer.Option(None, help="micro-batches per optimiser step"),
    seed: int = typer.Option(0, help="seed for data order, noise and timesteps"),
    mixed_precision: str = typer.Option("no", help="no | fp16 | bf16"),
    reg_dir: Optional[Path] = typer.Option(None, help="regularisation images, each with a .txt caption beside it"),
    reg_generate: int = typer.Option(0, help="draw this many class-prompt images with the base as regularisation"),
    param: List[str] = typer.Option([], "--param", "-p", help="method setting KEY=VALUE (see `multiconcept methods NAME`)"),
    resume: bool = typer.Option(False, help="continue from the checkpoint beside --out"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    progress: bool = typer.Option(True, help="show a progress bar"),
):
    """Learn concepts from images; write one bundle."""
    from .workflows.learn import learn as run

    if output.suffix != ".safetensors":
        raise UserError(f"--out {output} must end in .safetensors: bundles are safetensors files")
    overrides = key_values(param, "--param")
    for k, v in (("steps", steps), ("lr", lr), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if v is not None:
            overrides[k] = str(v)
    overrides["seed"] = str(seed)
    overrides["mixed_precision"] = mixed_precision
    path = run(method, concept, image, mask, output, base=base, overrides=overrides, reg_dir=reg_dir,
               reg_generate=reg_generate, resume=resume, device=device, dtype=dtype, progress=progress)
    out.print(f"wrote {path}")


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="e.g. 'photo of a <cat1> cat and <dog1> dog on the beach'"),
    bundle: List[Path] = typer.Option([], "--bundle", "-b", help="bundle file; repeat to combine"),
    n: int = typer.Option(4, "-n", help="images"),
    seed: int = typer.Option(0, help="image i uses seed + i"),
    output: Path = typer.Option(Path("out"), "--out", "-o", help="folder for the PNGs"),
    steps: int = typer.Option(50, help="denoising steps"),
    guidance: float = typer.Option(6.0, help="classifier-free guidance scale"),
    scheduler: str = typer.Option("ddim", help="ddim | pndm | euler | euler-a | dpm | ddpm"),
    negative: str = typer.Option("", help="negative prompt"),
    attention_maps: bool = typer.Option(False, "--attention-maps", help="also write per-token heatmaps to OUT/attention"),
    lora: List[Path] = typer.Option([], "--lora", help="a diffusers-format LoRA .safetensors (e.g. a style) added on top"),
    lora_scale: float = typer.Option(1.0, help="weight of every --lora"),
    init_image: Optional[Path] = typer.Option(None, "--init-image", help="inpaint into this image (needs --inpaint-mask)"),
    inpaint_mask: Optional[Path] = typer.Option(None, "--inpaint-mask", help="white = the region to fill"),
    base: Optional[str] = BaseOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Generate images with learned concepts (optionally inpainted into another image)."""
    from .data import load_image
    from .workflows.generate import Inpaint, SampleSettings, add_lora, generate as run, load_with_bundles

    if (init_image is None) != (inpaint_mask is None):
        raise UserError("inpainting needs both --init-image and --inpaint-mask")
    inpaint = Inpaint(load_image(init_image), load_image(inpaint_mask)) if init_image else None
    loaded = load_with_bundles(base, [str(b) for b in bundle], device=device, dtype=dtype)
    for f in lora:
        add_lora(loaded, f, lora_scale)
    paths = run(prompt, loaded, n, seed, output, SampleSettings(steps=steps, guidance=guidance, scheduler=scheduler,
                                                                negative_prompt=negative), attention_maps=attention_maps,
                inpaint=inpaint)
    for p in paths:
        out.print(str(p))


@app.command()
def inspect(bundle: Path = typer.Argument(..., help="a bundle file"),
            as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Show a bundle's header and tensors (shapes, bytes)."""
    from .bundle import describe

    d = describe(bundle)
    if as_json:
        print(json.dumps(d, indent=1))
        return
    h = d["header"]
    out.print(f"[bold]{bundle}[/bold]  method={h['method']}  format={h['format_version']}")
    out.print(f"tokens: {', '.join(f'{t} ({c})' for t, c in zip(h['tokens'], h['class_words']))}")
    out.print(f"base: {h['base_name']}  fingerprint {h['base_fingerprint']}")
    out.print("integrity: " + ("verified (content sha256 matches)" if d["integrity"] == "verified"
                               else "unchecked (written before bundles carried a digest)"))
    out.print("hyper-parameters: " + ", ".join(f"{k}={v}" for k, v in sorted(h["hyperparameters"].items())))
    if h.get("extra"):
        out.print("extra: " + json.dumps(h["extra"]))
    t = Table("tensor", "shape", "dtype", "bytes")
    for r in d["tensors"][:40]:
        t.add_row(r["name"], "x".join(map(str, r["shape"])), r["dtype"], f"{r['bytes']:,}")
    if len(d["tensors"]) > 40:
        t.add_row(f"... {len(d['tensors']) - 40} more", "", "", "")
    out.print(t)
    out.print(f"tensor bytes: {d['tensor_bytes']:,} ({d['tensor_bytes'] / 1024:.1f} KiB); file bytes: {d['file_bytes']:,}")


@app.command()
def export(bundle: Path = typer.Argument(..., help="a bundle file"),
           format: str = typer.Option("diffusers", "--format", help="diffusers"),
           output: Path = typer.Option(..., "--out", "-o", help="folder to write"),
           base: Optional[str] = BaseOpt):
    """Write a bundle as files plain diffusers loads (textual inversion, attn procs, LoRA)."""
    from .export import FORMATS, export_diffusers
    from .models import load_base

    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    from .bundle import read_header

    header = read_header(bundle)
    b = load_base(base if base is not None else header["base_name"])
    for p in export_diffusers(bundle, b, output):
        out.print(str(p))


@app.command()
def methods(name: Optional[str] = typer.Argument(None, help="a method name for its settings")):
    """List methods, or one method's settings with defaults and help."""
    from .methods import METHODS, get_method
    from .methods.base import config_help

    if name is None:
        for m in sorted(METHODS):
            out.print(f"{m}: {(METHODS[m].__module__ and sys.modules[METHODS[m].__module__].__doc__ or '').strip().splitlines()[0]}")
        return
    cls = get_method(name)
    t = Table("setting (--param KEY=VALUE)", "default", "help", title=name)
    for k, default, help_ in config_help(cls.Config):
        t.add_row(k, str(default), help_)
    out.print(t)


@app.command()
def demo(output: Path = typer.Option(Path("demo-out"), "--out", "-o", help="folder for the page and images"),
         base: Optional[str] = BaseOpt,
         steps: Optional[int] = typer.Option(None, help="training steps (default: the demo's budget)")):
    """The main job: learn two concepts from one image, generate, write an HTML page."""
    from .workflows.demo import run_demo

    page = run_demo(output, base=base, steps=steps)
    out.print(f"demo page: {page}")


def _load_command_modules() -> None:
    import importlib
    import pkgutil

    from . import commands

    for mod in sorted(m.name for m in pkgutil.iter_modules(commands.__path__)):
        importlib.import_module(f"{commands.__name__}.{mod}")


_load_command_modules()


def main() -> None:
    import click

    try:
        app(standalone_mode=False)
    except UserError as e:
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    # run as `python -m multiconcept.cli` this file is __main__, a second copy: the verbs in
    # multiconcept.commands register on the package's copy, so run that one
    from multiconcept.cli import main as package_main

    package_main()
