"""The diffusers lines in every README that make the base's pipeline (`pipe = ...`), for any kind of base.

A folder or hub id: `from_pretrained`. A single file (the base itself, or a checkpoint baked from it):
`from_single_file`, naming the diffusers configs that fit it (`--base-config`, or the folder the base was loaded
from) so it loads offline; FLUX.2 [klein]'s file is its transformer alone and Flux2KleinPipeline has no
`from_single_file` in diffusers 0.42, so the transformer comes from the file and the rest from the pipeline. A T5
read from a single file is switched to inference: diffusers 0.42 leaves it in training mode, its dropout on.
"""

from __future__ import annotations

from ..models import Base
from ..models.single_file import SUFFIX

# the component of a single file's T5, per architecture
T5_IN_FILE = {"flux1": "text_encoder_2", "sd3": "text_encoder_3"}


def pipeline_lines(base: Base, checkpoint: str | None = None) -> tuple[tuple[str, ...], list[str]]:
    """(the diffusers classes the lines use, the lines that make `pipe`) for the base, or for `checkpoint`: a single
    file of the base's architecture (a baked one)."""
    pipeline = type(base.pipe).__name__
    file = checkpoint or (base.name if base.name.endswith(SUFFIX) else None)
    if file is None:
        return (pipeline,), [f'pipe = {pipeline}.from_pretrained("{base.name}")']
    config = base.base_config or (None if base.name.endswith(SUFFIX) else base.name)
    if base.architecture == "flux2":
        return ("Flux2Transformer2DModel", pipeline), [
            f'transformer = Flux2Transformer2DModel.from_single_file("{file}", config="{config}", subfolder="transformer")',
            f'pipe = {pipeline}.from_pretrained("{config}", transformer=transformer)']
    lines = [f'pipe = {pipeline}.from_single_file("{file}"' + (f', config="{config}")' if config else ")")]
    if base.architecture == "flux1":
        lines.insert(0, "# diffusers 0.42 reads a FLUX.1 transformer from a single file at FLUX.1's own widths (3072) only")
    t5 = T5_IN_FILE.get(base.architecture)
    if t5 is not None and getattr(base.pipe, t5, None) is not None:
        lines.append(f"pipe.{t5}.eval()  # diffusers 0.42 leaves a single file's T5 in training mode: its dropout would be on")
    return (pipeline,), lines
