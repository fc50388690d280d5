"""bake: bundles merged into a single-file checkpoint A1111 and ComfyUI load, their tokens as embedding files beside it."""

from __future__ import annotations

from pathlib import Path

from ..bundle import read_header
from ..errors import require
from ..export.checkpoint import DTYPES, Baked, bake_checkpoint
from ..export.kohya import refuse_infusion
from ..models import Base, SingleFile, load_base


def bake(bundle_paths: list[str | Path], out: str | Path, *, base: Base | str | SingleFile | None = None,
         dtype: str = "fp32", save_dtype: str | None = None, overwrite: bool = False) -> Baked:
    """Write `out` (a .safetensors checkpoint: `base` with the bundles' weight changes added), the tokens'
    embedding files and a README beside it (export/checkpoint.py). `base`: default, the one the first bundle
    names; `dtype`: the weights it loads in; `save_dtype`: the checkpoint's (None: as loaded). Bad input is
    refused before the base loads where it can be known then."""
    out = Path(out)
    require(bool(bundle_paths), "bake needs at least one bundle")
    require(out.suffix == ".safetensors", f"-o {out} must name a .safetensors file (the checkpoint to write)")
    require(save_dtype is None or save_dtype in DTYPES, f"unknown --save-dtype {save_dtype!r}: choose one of "
                                                         f"{', '.join(DTYPES)}")
    require(overwrite or not out.exists(), f"{out} already exists: pass --overwrite to replace it, or choose another -o")
    headers = [read_header(p) for p in bundle_paths]
    for p, h in zip(bundle_paths, headers):
        refuse_infusion(h["method"], p)
    if not isinstance(base, Base):
        base = load_base(base if base is not None else headers[0]["base_name"], device="cpu", dtype=dtype)
    return bake_checkpoint(bundle_paths, base, out, save_dtype, overwrite=overwrite)
