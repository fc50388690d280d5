"""export: a bundle as files diffusers, AUTOMATIC1111, ComfyUI or kohya's sd-scripts load."""

from __future__ import annotations

from pathlib import Path

from ..bundle import load_bundle
from ..errors import require
from ..export import DEFAULT_RANK, FORMATS, ToolExport, check_out_dir, export_diffusers, export_for_tools
from ..export.kohya import refuse_infusion
from ..models import Base, SingleFile, load_base


def parse_rank(text: str | int) -> int | None:
    """'full' (exact: every layer at its full rank) -> None; else an int >= 1."""
    if str(text).strip().lower() == "full":
        return None
    try:
        rank = int(text)
    except ValueError:
        rank = 0
    require(rank >= 1, f"rank {text!r} must be a whole number >= 1 or 'full'")
    return rank


def export_bundle(bundle_path: str | Path, out_dir: str | Path, format: str = "diffusers", *,
                  rank: int | str = DEFAULT_RANK, base: Base | str | SingleFile | None = None) -> ToolExport:
    """Write `bundle_path` for `format` (diffusers | a1111 | comfyui | kohya) into `out_dir`. Bad input is refused
    before the base loads where it can be known then (format, rank, output path, a corrupt or Infusion bundle)."""
    require(format in FORMATS, f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    rank = parse_rank(rank)
    check_out_dir(Path(out_dir))
    bundle = load_bundle(bundle_path)
    refuse_infusion(bundle.method, bundle_path)
    if not isinstance(base, Base):
        base = load_base(base if base is not None else bundle.base_name)
    if format == "diffusers":
        return ToolExport(export_diffusers(bundle_path, base, out_dir, rank), {}, None, rank=rank)
    return export_for_tools(bundle_path, base, out_dir, format, rank)
