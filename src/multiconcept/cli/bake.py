"""`multiconcept bake`: bundles merged into a single-file checkpoint for AUTOMATIC1111, ComfyUI and kohya."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .options import BaseConfigOpt, BaseOpt, DtypeOpt, base_source, out


def bake(bundle: List[Path] = typer.Argument(..., help="bundle files (Custom Diffusion, DisenDiff, LoRA, Textual Inversion)"),
         output: Path = typer.Option(..., "--out", "-o", help="the checkpoint to write (.safetensors); the tokens' "
                                                              "embeddings/ and a README go beside it"),
         base: Optional[str] = BaseOpt,
         base_config: Optional[str] = BaseConfigOpt,
         dtype: str = DtypeOpt,
         save_dtype: Optional[str] = typer.Option(None, "--save-dtype", help="fp32 | fp16 | bf16: the checkpoint's "
                                                  "tensors (default: as loaded; fp16 halves an fp32 file)"),
         overwrite: bool = typer.Option(False, "--overwrite", help="replace the checkpoint, README and embeddings")):
    """Merge bundles' weight changes into a single-file checkpoint A1111 and ComfyUI load (+ embeddings, README)."""
    from ..workflows.bake import bake as run

    result = run([str(b) for b in bundle], output, base=base_source(base, base_config), dtype=dtype,
                 save_dtype=save_dtype, overwrite=overwrite)
    for p in result.paths:
        out.print(str(p))
    out.print(f"{result.changed} weight tensors changed; {len(result.embeddings)} token(s) as embedding files",
              highlight=False)
