"""Loading a stage's transformers model and processor from a hub id or a local folder.

Which class to build is read from the checkpoint's config (`model_type`), so a stage is chosen by naming
its checkpoint: `--captioner Salesforce/blip2-opt-2.7b` is BLIP-2, a folder holding a BLIP config is BLIP.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError, require
from ..models import quiet_loading


def model_source(name: str, flag: str) -> str:
    """A local folder (must hold config.json) or a hub id, as transformers accepts it."""
    path = Path(name)
    if path.exists():
        require(path.is_dir() and (path / "config.json").is_file(),
                f"{flag} {name} is not a transformers model folder (no config.json): pass a folder written by "
                "save_pretrained, or a hub id")
        return str(path)
    require(not name.startswith((".", "/", "~")) and name.count("/") <= 1,
            f"{flag} {name} does not exist: check the path, or give a hub id such as Salesforce/blip-image-captioning-large")
    return name


def model_type(source: str, flag: str) -> str:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source).model_type
    except (OSError, ValueError) as e:
        raise UserError(f"could not load {flag} {source!r} ({_first_line(e)}): pass a local model folder, "
                        "or a hub id with network access") from e


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load(model_cls, processor_cls, source: str, flag: str, device: torch.device, dtype: torch.dtype):
    """(model in eval mode on `device`, processor); any loading failure is one UserError line."""
    try:
        with quiet_loading():
            model = model_cls.from_pretrained(source, dtype=dtype).to(device).eval()
            processor = processor_cls.from_pretrained(source)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"could not load {flag} {source!r} ({_first_line(e)}): the folder needs the model weights "
                        "and its processor files (save both with save_pretrained)") from e
    return model, processor
