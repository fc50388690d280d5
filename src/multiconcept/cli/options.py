"""What every verb shares: the consoles, option types that check their values, KEY=VALUE parsing."""

from __future__ import annotations

import logging
import math
import os
import warnings

import typer
from rich.console import Console

from ..errors import UserError

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
    # bitsandbytes (in the lock for 8-bit AdamW) warns at import on CPUs with AVX512-BF16 that its optional
    # hub kernel (the `kernels` package) is missing; it falls back to its own CPU code, so nothing is lost
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


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


BaseOpt = typer.Option(None, "--base", help="pipeline folder (SD, SDXL, FLUX.1, FLUX.2 klein, SD3), single-file checkpoint "
                                             "(FILE.safetensors: SD 1.x, 2.x, SDXL, FLUX.1, SD3, FLUX.2 klein's transformer), "
                                             "hub id, 'tiny', 'tiny-sdxl', "
                                             "'tiny-flux', 'tiny-flux2', 'tiny-sd3' (random test models) or 'toyworld' (default)")
BaseConfigOpt = typer.Option(None, "--base-config", help="with --base FILE.safetensors: the diffusers pipeline folder or hub "
                                                         "id whose configs fit it (default: the one diffusers picks for "
                                                         "the file, from the hub)")


def base_source(base: str | None, config: str | None):
    """--base and --base-config as the one value the workflows take: the name, or a SingleFile with its configs."""
    from pathlib import Path

    from ..models import SingleFile, is_checkpoint_path

    if config is None:
        return base
    if base is None or not is_checkpoint_path(base):
        raise UserError("--base-config goes with a single-file checkpoint (--base FILE.safetensors): pass one, "
                        "or leave --base-config out")
    return SingleFile(Path(base), config)
CompileOpt = typer.Option("off", "--compile", help="on | off: torch.compile the UNet (transformer): its repeated blocks "
                                                   "when training, all of it when sampling; the first run of new shapes "
                                                   "compiles (tens of seconds on a CPU), later ones read the cache "
                                                   "(docs/speed.md)")
DeviceOpt = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps")
DtypeOpt = typer.Option("fp32", help="fp32 | fp16 | bf16 (weights of the frozen base)")


def main_process() -> bool:
    """False in every process but the first under `accelerate launch` / torchrun, which stay quiet."""
    return os.environ.get("RANK", "0") == "0"


def key_values(pairs: list[str], what: str) -> dict[str, str]:
    """["k=v", ...] from repeated --param style options -> {k: v}; one-line error otherwise."""
    d = {}
    for p in pairs or []:
        if "=" not in p:
            raise UserError(f"{what} {p!r} must be KEY=VALUE, e.g. steps=100")
        k, v = p.split("=", 1)
        d[k.strip()] = v.strip()
    return d


# scoring models, shared by evaluate and benchmark
ClipOpt = typer.Option(None, "--clip", help="CLIPModel folder or hub id (default: the ToyWorld evaluator, when built)")
DinoOpt = typer.Option(None, "--dino", help="ViT/DINO folder or hub id, e.g. facebook/dino-vits16 (default: no DINO)")
ScaleOpt = typer.Option("raw", "--scale", help="text alignment scale: raw | clipscore (2.5*max(cos,0)) | 100 (100*max(cos,0))")
PrefixOpt = typer.Option("", "--text-prefix", help="put before the prompt for CLIP-T; DisenDiff uses 'A photo depicts '")
