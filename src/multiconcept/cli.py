"""The `multiconcept` command: parse, validate, call a workflow, print.

Every UserError and every usage error (unknown option or verb, a bad or
missing value) becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import UserError, require

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multi-concept personalised text-to-image diffusion.")
toyworld_app = typer.Typer(no_args_is_help=True, help="The embedded synthetic world: build its models.")
app.add_typer(toyworld_app, name="toyworld")
out = Console()
err = Console(stderr=True)


def quiet_libraries() -> None:
    """Keep diffusers' and transformers' loading bars, deprecation notes and
    advice off the terminal, so a bad input's error is the first line a user sees."""
    for var, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(var, value)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)


@app.callback()
def root(
    verbose: bool = typer.Option(False, "--verbose", help="show libraries' progress bars and warnings"),
    max_image_side: Optional[int] = typer.Option(
        None, "--max-image-side", help="longest image side accepted, in pixels (default 8192; env MULTICONCEPT_MAX_IMAGE_SIDE)"),
):
    if not verbose:
        quiet_libraries()
    if max_image_side is not None:
        from .images import limits, parse_side

        limits.max_side = parse_side(max_image_side, "--max-image-side")


def _check_number(value, *, minimum=None, above=None):
    if value is None:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    if minimum is not None and value < minimum:
        raise typer.BadParameter(f"{value} is below the minimum {minimum}")
    if above is not None and value <= above:
        raise typer.BadParameter(f"{value} must be greater than {above}")
    return value


def number(default, *decls: str, help: str, minimum=None, above=None):
    """An int or float option that must be finite and in range, checked as it arrives."""
    return typer.Option(default, *decls, help=help,
                        callback=lambda v: _check_number(v, minimum=minimum, above=above))


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


IMAGE_RULES = ("Images: PNG, JPEG, WebP or BMP, at least 32 and at most 8192 pixels on a side (--max-image-side); "
               "transparent pixels count as white in images and as black in masks; a mask is white on black.")


@app.command(help="Learn concepts from images; write one bundle.\n\n" + IMAGE_RULES)
def learn(
    method: str = typer.Option(..., "--method", "-m", help="textual-inversion | custom-diffusion | lora | ... (see `multiconcept methods`)"),
    concept: List[str] = typer.Option(..., "--concept", "-c", help="TOKEN=CLASS, e.g. '<cat1>=cat'; repeat for several"),
    image: List[str] = typer.Option(..., "--image", "-i", help="image or folder holding every concept, or TOKEN=PATH for one concept's images"),
    mask: List[str] = typer.Option([], "--mask", help="TOKEN=PATH, one per image of that concept, in order (white = concept)"),
    output: Path = typer.Option(..., "--out", "-o", help="bundle file to write (.safetensors); an existing one needs --overwrite"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing bundle at --out"),
    base: Optional[str] = BaseOpt,
    steps: Optional[int] = number(None, "--steps", help="optimiser steps (default: the method's)", minimum=1),
    lr: Optional[float] = number(None, "--lr", help="learning rate (default: the method's)", above=0),
    batch_size: Optional[int] = number(None, "--batch-size", help="images per micro-batch", minimum=1),
    grad_accum: Optional[int] = number(None, "--grad-accum", help="micro-batches per optimiser step", minimum=1),
    seed: int = number(0, "--seed", help="seed for data order, noise and timesteps", minimum=0),
    mixed_precision: str = typer.Option("no", help="no | fp16 | bf16"),
    reg_dir: Optional[Path] = typer.Option(None, help="regularisation images, each with a .txt caption beside it"),
    reg_generate: int = number(0, "--reg-generate", help="draw this many class-prompt images with the base as regularisation", minimum=0),
    param: List[str] = typer.Option([], "--param", "-p", help="method setting KEY=VALUE (see `multiconcept methods NAME`)"),
    resume: bool = typer.Option(False, help="continue from the checkpoint beside --out"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    progress: bool = typer.Option(True, help="show a progress bar"),
):
    from .workflows.learn import learn as run

    overrides = key_values(param, "--param")
    for k, v in (("steps", steps), ("lr", lr), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if v is not None:
            overrides[k] = str(v)
    overrides["seed"] = str(seed)
    overrides["mixed_precision"] = mixed_precision
    path = run(method, concept, image, mask, output, base=base, overrides=overrides, reg_dir=reg_dir,
               reg_generate=reg_generate, resume=resume, device=device, dtype=dtype, progress=progress,
               overwrite=overwrite)
    out.print(f"wrote {path}")


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="e.g. 'photo of a <cat1> cat and <dog1> dog on the beach'"),
    bundle: List[Path] = typer.Option([], "--bundle", "-b", help="bundle file; repeat to combine"),
    n: int = number(4, "-n", help="images", minimum=1),
    seed: int = number(0, "--seed", help="image i uses seed + i", minimum=0),
    output: Path = typer.Option(Path("out"), "--out", "-o", help="folder for the PNGs"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace PNGs of the same seeds already in --out"),
    steps: int = number(50, "--steps", help="denoising steps", minimum=1),
    guidance: float = number(6.0, "--guidance", help="classifier-free guidance scale", minimum=0),
    scheduler: str = typer.Option("ddim", help="ddim | pndm | euler | euler-a | dpm | ddpm"),
    negative: str = typer.Option("", help="negative prompt"),
    attention_maps: bool = typer.Option(False, "--attention-maps", help="also write per-token heatmaps to OUT/attention"),
    lora: List[Path] = typer.Option([], "--lora", help="a diffusers-format LoRA .safetensors (e.g. a style) added on top"),
    lora_scale: float = number(1.0, "--lora-scale", help="weight of every --lora"),
    init_image: Optional[Path] = typer.Option(None, "--init-image", help="inpaint into this image (needs --inpaint-mask)"),
    inpaint_mask: Optional[Path] = typer.Option(None, "--inpaint-mask", help="white = the region to fill"),
    base: Optional[str] = BaseOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Generate images with learned concepts (optionally inpainted into another image)."""
    from .images import read_image, read_mask
    from .workflows.generate import (Inpaint, SampleSettings, add_lora, check_prompt_tokens, generate as run,
                                     load_with_bundles, planned_paths)

    settings = SampleSettings(steps=steps, guidance=guidance, scheduler=scheduler, negative_prompt=negative)
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
    check_prompt_tokens(prompt, [str(b) for b in bundle])
    loaded = load_with_bundles(base, [str(b) for b in bundle], device=device, dtype=dtype)
    for f in lora:
        add_lora(loaded, f, lora_scale)
    paths = run(prompt, loaded, n, seed, output, settings, attention_maps=attention_maps, inpaint=inpaint)
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
    from .bundle import load_bundle
    from .export import FORMATS, check_out_dir, export_diffusers
    from .models import load_base

    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    check_out_dir(output)
    header = load_bundle(bundle).header()  # a corrupt bundle is refused before the base loads
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
         steps: Optional[int] = number(None, help="training steps (default: the demo's budget)", minimum=1)):
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


def _click_errors() -> tuple[type, type]:
    """click's UsageError and ClickException, from wherever this typer takes click
    (typer >= 0.29 vendors its own copy, so `import click` would name other classes)."""
    mro = {c.__name__: c for c in typer.BadParameter.__mro__}
    return mro["UsageError"], mro["ClickException"]


def _fail(message: str, code: int = 2) -> None:
    err.print(f"error: {' '.join(message.split())}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    usage_error, click_error = _click_errors()
    try:
        app(args=argv, prog_name="multiconcept", standalone_mode=False)
    except UserError as e:
        _fail(str(e))
    except usage_error as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # typer has printed the help already
            sys.exit(0)
        where = e.ctx.command_path if e.ctx is not None else "multiconcept"
        _fail(f"{e.format_message()} (see `{where} --help`)")
    except click_error as e:
        _fail(e.format_message())
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except OSError as e:
        # the machine's answer (a full disk, a folder we may not write), not a bug of ours
        _fail(f"{e.strerror or e} ({e.filename}): free space or fix the permissions" if e.filename else str(e))


if __name__ == "__main__":
    # run as `python -m multiconcept.cli` this file is __main__, a second copy: the verbs in
    # multiconcept.commands register on the package's copy, so run that one
    from multiconcept.cli import main as package_main

    package_main()
