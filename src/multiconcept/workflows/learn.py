"""learn: images (+ masks) → one bundle. Shared by the CLI, the demo and the API."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..data import ConceptSet, build_concept_set, class_caption, generate_regularisation, load_regularisation
from ..errors import require
from ..methods import get_method
from ..methods.finetune import train
from ..methods.settings import apply_overrides, apply_values
from ..models import Base, SingleFile, load_base
from ..prompts import parse_concept
from ..training import Progress, make_accelerator

# diffusers' DreamBooth and Custom Diffusion scripts draw class images at the pipeline's default steps (SD: 50)
REG_STEPS = 50


def check_output(out: str | Path, *, overwrite: bool) -> None:
    """Refuse a bundle path that training could only fail to write, before training."""
    out = Path(out)
    require(out.suffix == ".safetensors", f"--out {out} must end in .safetensors: bundles are safetensors files")
    require(not out.is_dir(), f"--out {out} is a folder: name the bundle file, e.g. {out / 'concepts.safetensors'}")
    require(overwrite or not out.exists(),
            f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    parent = next((p for p in out.parents if p.exists()), None)
    require(parent is None or parent.is_dir(), f"--out {out} lies under {parent}, which is a file: choose another --out")


def learn(method: str, concepts: list[str], images: list[str], masks: list[str], out: str | Path, *,
          overrides: dict[str, str] | None = None, **kw) -> Path | None:
    """`learn_concepts` from the command line's specs: 'TOKEN=CLASS', 'PATH' or 'TOKEN=PATH', --param strings."""
    check_output(out, overwrite=kw.get("overwrite", True))
    cfg = apply_overrides(get_method(method).Config(), overrides or {})  # unknown method: fail before anything loads
    data = build_concept_set([parse_concept(c) for c in concepts], images, masks)
    return learn_concepts(method, data, out, config=cfg, **kw)


def learn_concepts(method: str, data: ConceptSet, out: str | Path, *, config=None, settings: dict | None = None,
                   base: Base | str | SingleFile | None = None, reg_dir: str | Path | None = None, reg_generate: int = 0,
                   reg_steps: int = REG_STEPS, resume: bool = False, device: str = "auto", dtype: str = "fp32",
                   progress: bool = True,
                   work_dir: str | Path | None = None, stop_after: int | None = None, overwrite: bool = True,
                   on_step: Callable[[Progress], None] | None = None,
                   cancel: Callable[[], bool] | None = None) -> Path | None:
    """Learn `data`'s concepts with `method`; write the bundle to `out`. `config` is the method's
    Config, or `settings` typed values over its defaults. Returns `out`, or None when the run
    stopped early (`stop_after`, `cancel`: the checkpoint beside `out` holds the state)."""
    check_output(out, overwrite=overwrite)
    cls = get_method(method)
    cfg = config if config is not None else apply_values(cls.Config(), settings or {})
    if not isinstance(base, Base):
        if device == "auto":  # under `accelerate launch`, each process's own GPU
            device = str(make_accelerator(cfg.mixed_precision).device)
        base = load_base(base, device=device, dtype=dtype)
    reg = []
    if reg_dir is not None:
        reg = load_regularisation(reg_dir)
    if reg_generate:
        folder = Path(out).with_name(Path(out).stem + ".reg")
        flow = {"max_sequence_length": base.sequence_length} if base.flow is not None else {}
        reg += generate_regularisation(base.pipe, class_caption(data.concepts), reg_generate, folder, seed=cfg.seed,
                                       steps=reg_steps, **flow)
    return train(cls, base, data, cfg, out, reg=reg, resume=resume, progress=progress, work_dir=work_dir,
                 stop_after=stop_after, on_step=on_step, cancel=cancel)
