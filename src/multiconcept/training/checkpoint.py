"""The one checkpoint format: every resumable run (fine-tuning a method,
training an encoder, building ToyWorld) writes and reads this.

One safetensors file: the job's tensors under ``state/``, the optimiser's
under ``opt/<param index>/<name>`` (``<name>/<inner>`` for a nested dict), and JSON metadata (format, step, settings
digest, training seconds, the job's extra JSON state). Written atomically, so a
kill leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..bundle import atomic_write
from ..errors import UserError

FORMAT = "multiconcept-checkpoint/2"


def start_over(path: Path) -> str:
    return f"delete {path} to start over (or run without --resume)"


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, *, step: int,
                    digest: str, seconds: float, extra: dict | None = None) -> None:
    tensors = {f"state/{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    seen: set[int] = set()
    for idx, st in optimizer.state_dict()["state"].items():
        for name, val in _flat(st):
            t = torch.as_tensor(val).detach().cpu().contiguous()
            if t.numel() and t.data_ptr() in seen:  # bitsandbytes shares its quantisation maps between parameters
                t = t.clone()
            seen.add(t.data_ptr())
            tensors[f"opt/{idx}/{name}"] = t
    meta = {"format": FORMAT, "step": str(step), "digest": digest, "seconds": repr(float(seconds)),
            "extra": json.dumps(extra or {})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer, digest: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The job's tensors and {step, seconds, extra}; the optimiser's state is loaded in place."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise UserError(f"checkpoint {path} was written by an earlier multiconcept, in another format: "
                                f"{start_over(path.parent)}")
            if meta.get("digest") != digest:
                raise UserError(f"checkpoint {path} was made with other settings, method or base: use the same ones, "
                                f"or {start_over(path.parent)}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = {"step": int(meta["step"]), "seconds": float(meta["seconds"]), "extra": json.loads(meta["extra"])}
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("opt/"):
                _, idx, name = k.split("/", 2)
                *outer, last = name.split("/")
                entry = state.setdefault(int(idx), {})
                for part in outer:
                    entry = entry.setdefault(part, {})
                entry[last] = v
        sd = optimizer.state_dict()
        sd["state"] = state
        optimizer.load_state_dict(sd)
    except UserError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}): {start_over(path.parent)}") from e
    return {k[len("state/"):]: v for k, v in tensors.items() if k.startswith("state/")}, info


def _flat(state: dict, prefix: str = ""):
    """(name, value) of an optimiser's per-parameter state; nested dicts (bitsandbytes keeps its 8-bit
    blocks and their scales in one) become a/b names."""
    for name, val in state.items():
        if isinstance(val, dict):
            yield from _flat(val, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}", val


def remove_stale_temps(target: Path) -> None:
    """Temp files of `target` left by a process killed while writing it (see bundle.atomic_write)."""
    if target.parent.is_dir():
        for tmp in target.parent.glob(f".{target.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def discard_checkpoint(path: Path, remove_folder: bool = False) -> None:
    """A finished run's checkpoint (and its folder, when it was the run's own and is now empty)."""
    path.unlink(missing_ok=True)
    remove_stale_temps(path)
    if remove_folder:
        try:
            path.parent.rmdir()
        except OSError:  # the user's own files are in it
            pass
