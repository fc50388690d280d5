"""learn: images (+ masks) → one bundle. Shared by the CLI, the demo and the API."""

from __future__ import annotations

from pathlib import Path

from ..data import build_concept_set, class_caption, generate_regularisation, load_regularisation
from ..errors import require
from ..methods import get_method
from ..methods.base import apply_overrides
from ..models import Base, load_base
from ..prompts import parse_concept
from ..train import train


def learn(method: str, concepts: list[str], images: list[str], masks: list[str], out: str | Path, *,
          base: Base | str | None = None, overrides: dict[str, str] | None = None, reg_dir: str | Path | None = None,
          reg_generate: int = 0, resume: bool = False, device: str = "auto", dtype: str = "fp32",
          progress: bool = True, work_dir: str | Path | None = None, stop_after: int | None = None) -> Path | None:
    cls = get_method(method)  # unknown method: fail before loading anything
    cfg = apply_overrides(cls.Config(), overrides or {})
    require(cfg.steps >= 1, f"steps must be at least 1, got {cfg.steps}")
    data = build_concept_set([parse_concept(c) for c in concepts], images, masks)
    if not isinstance(base, Base):
        base = load_base(base, device=device, dtype=dtype)
    reg = []
    if reg_dir is not None:
        reg = load_regularisation(reg_dir)
    if reg_generate:
        prompt = class_caption(data.concepts)
        reg += generate_regularisation(base.pipe, prompt, reg_generate, Path(out).with_name(Path(out).stem + ".reg"), seed=cfg.seed)
    return train(cls, base, data, cfg, out, reg=reg, resume=resume, progress=progress, work_dir=work_dir,
                 stop_after=stop_after)
