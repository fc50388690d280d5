"""Bundles: one `.safetensors` file per learning run.

Tensors are named by what they are:
- ``token_embedding/<tok>``: a new token's text-encoder input row;
- ``unet_delta/<param name>``: W_trained − W_base for a trained UNet weight
  (deltas so several bundles can be summed on one base);
- ``lora/<peft key>``: LoRA factors (config in the header);
- method-specific prefixes (``value_residual/...`` for Infusion, ...).
The header (safetensors metadata, one JSON string) carries the method,
tokens, class words, base fingerprint, hyper-parameters and format version.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import UserError, require

FORMAT_VERSION = 1
HEADER_KEY = "multiconcept"


@dataclass
class Bundle:
    method: str
    tokens: list[str]
    class_words: list[str]
    base_name: str
    base_fingerprint: str
    hyperparameters: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # method-specific settings (e.g. LoRA config)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def header(self) -> dict:
        h = asdict(self)
        h.pop("tensors")
        return h

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        n = len(prefix)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import: os.umask can only be read by setting it, which races with threads


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp_path) then rename onto `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a written file gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_bundle(bundle: Bundle, path: str | Path) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in bundle.tensors.items()}
    meta = {HEADER_KEY: json.dumps(bundle.header(), sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_header(path: str | Path) -> dict:
    path = Path(path)
    require(path.is_file(), f"bundle {path} does not exist: check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable .safetensors bundle ({e}): pass a file written by `multiconcept learn`") from e
    require(HEADER_KEY in meta, f"{path} is a safetensors file but not a multiconcept bundle (no header): pass a file written by `multiconcept learn`")
    try:
        header = json.loads(meta[HEADER_KEY])
    except json.JSONDecodeError as e:
        raise UserError(f"bundle {path} has a damaged header: re-run `multiconcept learn`") from e
    v = header.get("format_version")
    require(v == FORMAT_VERSION, f"bundle {path} has format version {v}; this multiconcept reads {FORMAT_VERSION}: upgrade multiconcept or re-learn")
    return header


def load_bundle(path: str | Path) -> Bundle:
    header = read_header(path)
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    fields = {k: header[k] for k in Bundle.__dataclass_fields__ if k in header and k != "tensors"}
    return Bundle(tensors=tensors, **fields)


def check_base(bundle: Bundle, base, path: str = "") -> None:
    require(
        bundle.base_fingerprint == base.fingerprint,
        f"bundle {path or bundle.tokens} was learned on base {bundle.base_name!r} (fingerprint {bundle.base_fingerprint}) "
        f"but the loaded base is {base.name!r} ({base.fingerprint}): pass --base {bundle.base_name}",
    )


def describe(path: str | Path) -> dict:
    """What `multiconcept inspect` prints: the header and every tensor's shape, dtype and bytes."""
    header = read_header(path)
    rows, total = [], 0
    with safe_open(str(path), framework="pt") as f:
        for k in sorted(f.keys()):
            sl = f.get_slice(k)
            shape = sl.get_shape()
            dtype = sl.get_dtype()
            n = 1
            for s in shape:
                n *= s
            nbytes = n * _DTYPE_BYTES.get(dtype, 4)
            total += nbytes
            rows.append({"name": k, "shape": shape, "dtype": dtype, "bytes": nbytes})
    return {"header": header, "tensors": rows, "tensor_bytes": total, "file_bytes": Path(path).stat().st_size}


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
