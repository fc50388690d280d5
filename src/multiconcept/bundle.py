"""Bundles: one `.safetensors` file per learning run.

Tensors are named by what they are:
- ``token_embedding/<tok>``: a new token's text-encoder input row;
- ``unet_delta/<param name>``: W_trained − W_base for a trained UNet weight
  (deltas so several bundles can be summed on one base); ``transformer_delta/``
  on a flow transformer base (FLUX, SD3);
- ``lora/<peft key>``: LoRA factors (config in the header);
- method-specific prefixes (``value_residual/...`` for Infusion, ...).
The header (safetensors metadata, one JSON string) carries the method,
tokens, class words, base fingerprint and architecture (sd1, sd2, sdxl; ""
in bundles written before it was recorded), the base's weights digest ({grid: digest},
models/fingerprint.py; {} in bundles written before it), hyper-parameters and format version.
An SDXL bundle holds each token's row for both text encoders:
``token_embedding/<tok>`` (the first, CLIP ViT-L) and ``token_embedding_2/<tok>``.
Beside it, ``multiconcept_sha256`` holds `content_digest` of that header text
and every tensor, checked on load: a flipped byte anywhere is "corrupt", not
black images. Bundles written before the digest existed load unchecked; a
separate key (not a header field) so older readers ignore it.
Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import UserError, is_file, require

FORMAT_VERSION = 1
HEADER_KEY = "multiconcept"
# the digest is a field of the header, not a metadata key of its own: safetensors writes
# metadata keys in no fixed order, and one key keeps a re-saved bundle byte-identical
DIGEST_FIELD = "content_sha256"

# Trained values sit orders of magnitude below this: CLIP token embeddings and attention weights are
# |x| < 1.2 on SD 1.5, ToyWorld and the tiny base, their deltas and LoRA factors smaller still, and
# Infusion's value residuals live on the scale of CLIP's hidden states (outliers ~30). Above 1e4 a
# value is a corrupt byte or a diverged run, and in fp16 it is within 7x of overflow (65504), which
# is what turns images black.
SUSPICIOUS_ABS = 1e4

log = logging.getLogger(__name__)


def delta_prefix(denoiser: str) -> str:
    """Bundle prefix of a weight delta of the base's denoiser ("unet" or "transformer"): unet_delta/, ..."""
    return f"{denoiser}_delta/"


def embedding_prefix(encoder: int) -> str:
    """Bundle prefix of token rows for text encoder `encoder` (0-based): token_embedding/, token_embedding_2/."""
    return "token_embedding" + (f"_{encoder + 1}" if encoder else "") + "/"


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
    architecture: str = ""  # the base's (models.architecture_of); "" = not recorded (older bundles)
    base_weights: dict = field(default_factory=dict)  # the base's weights_digest; {} = not recorded (older bundles)

    def header(self) -> dict:
        h = asdict(self)
        h.pop("tensors")
        return h

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        n = len(prefix)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def token_rows(self, encoders: int) -> dict[str, list[torch.Tensor]]:
        """{token: [its row in each of the first `encoders` text encoders]}, for tokens every one of them holds."""
        per = [self.with_prefix(embedding_prefix(k)) for k in range(encoders)]
        return {t: [rows[t] for rows in per] for t in per[0] if all(t in rows for rows in per)}

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


_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


def content_digest(header_text: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the header's JSON text, then per tensor (sorted by name) its name, safetensors dtype,
    shape and little-endian bytes, each field length-prefixed.

    Defined on what the bundle holds rather than on the file's layout (tensor order, alignment
    padding), so any writer of the same content gets the same digest; length prefixes keep one
    field from running into the next (name "ab" + dtype "c" differs from "a" + "bc").
    """
    h = hashlib.sha256(b"multiconcept-bundle-digest-1\n")

    def put(b) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    put(header_text.encode("utf-8", "surrogatepass"))
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        put(name.encode("utf-8", "surrogatepass"))
        put(_DTYPE_NAMES.get(t.dtype, str(t.dtype)).encode())
        put(json.dumps(list(t.shape)).encode())
        put(t.reshape(-1).view(torch.uint8).numpy())  # a 1-D uint8 array: len() is its byte count
    return h.hexdigest()


def save_bundle(bundle: Bundle, path: str | Path) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in bundle.tensors.items()}
    header = bundle.header()
    header[DIGEST_FIELD] = content_digest(json.dumps(header, sort_keys=True), tensors)
    meta = {HEADER_KEY: json.dumps(header, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


# what every header must hold, and its JSON type: a header that parses but lacks a field must be
# refused here, not become a KeyError in whichever command reads that field first
_HEADER_FIELDS = {"method": str, "tokens": list, "class_words": list, "base_name": str, "base_fingerprint": str,
                  "hyperparameters": dict, "extra": dict}


def _read_metadata(path: Path) -> dict:
    require(is_file(path), f"bundle {path} does not exist: check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable .safetensors bundle ({_first_line(e)}): it is truncated, corrupt or "
                        f"another kind of file; pass a bundle `multiconcept learn` wrote, or restore a copy") from e


def _first_line(e: BaseException, limit: int = 120) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]


def _parse_header(path: Path, meta: dict) -> dict:
    require(HEADER_KEY in meta, f"{path} is a safetensors file but not a multiconcept bundle (no header): "
                                "pass a file written by `multiconcept learn`")
    damaged = f"bundle {path} has a damaged header"
    try:
        header = json.loads(meta[HEADER_KEY])
    except (ValueError, RecursionError) as e:  # JSONDecodeError, and ints over Python's digit limit
        raise UserError(f"{damaged} ({type(e).__name__}): re-learn it or restore a copy") from e
    require(isinstance(header, dict), f"{damaged} (a JSON {type(header).__name__}, not an object): re-learn it or restore a copy")
    v = header.get("format_version")
    # bool is an int in Python: `true` must not pass for version 1
    if not (type(v) is int and v == FORMAT_VERSION):
        raise UserError(f"bundle {path} has format version {v!r}; this multiconcept reads {FORMAT_VERSION}: "
                        "upgrade multiconcept or re-learn")
    for key, kind in _HEADER_FIELDS.items():
        require(isinstance(header.get(key), kind),
                f"{damaged} ({key!r} is missing or not a JSON {kind.__name__}): re-learn it or restore a copy")
    require(isinstance(header.get("architecture", ""), str),
            f"{damaged} ('architecture' is not a JSON string): re-learn it or restore a copy")
    weights = header.get("base_weights", {})
    require(isinstance(weights, dict) and all(isinstance(v, str) for v in weights.values()),
            f"{damaged} ('base_weights' is not a JSON object of strings): re-learn it or restore a copy")
    for key in ("tokens", "class_words"):
        require(all(isinstance(x, str) for x in header[key]),
                f"{damaged} ({key!r} holds a non-string): re-learn it or restore a copy")
    require(len(header["tokens"]) == len(header["class_words"]),
            f"{damaged} ({len(header['tokens'])} tokens but {len(header['class_words'])} class words): "
            "re-learn it or restore a copy")
    return header


def read_header(path: str | Path) -> dict:
    path = Path(path)
    return _parse_header(path, _read_metadata(path))


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(f"bundle {path} is corrupt ({why}): re-learn it or restore a copy")


def _load_checked(path: Path) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(header, tensors, integrity) with integrity "verified" or "unchecked" (no digest: an older bundle).

    Refuses a digest mismatch and non-finite values; warns about values no training produces.
    """
    meta = _read_metadata(path)
    header = _parse_header(path, meta)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _corrupt(path, f"its tensors cannot be read: {_first_line(e)}") from e
    stored = header.pop(DIGEST_FIELD, None)
    integrity = "unchecked"
    if stored is not None:
        actual = content_digest(json.dumps(header, sort_keys=True), tensors)
        if stored != actual:
            raise _corrupt(path, f"content sha256 is {actual[:12]}..., its header says {str(stored)[:12]}...")
        integrity = "verified"
    for name in sorted(tensors):
        t = tensors[name]
        if not t.is_floating_point() or t.numel() == 0:
            continue
        if not bool(torch.isfinite(t).all()):
            if integrity == "verified":  # the bytes are the ones training wrote: it diverged
                raise UserError(f"bundle {path} holds NaN or infinite values in {name} (training diverged): "
                                f"re-learn it, e.g. with a lower --lr")
            raise _corrupt(path, f"{name} holds NaN or infinite values")
        peak = float(t.abs().max())
        if peak > SUSPICIOUS_ABS:
            log.warning(f"warning: bundle {path}: {name} has values up to {peak:.3g}, far beyond what training "
                        f"produces (|x| <= {SUSPICIOUS_ABS:g}); images may come out black: re-learn it if they do")
    return header, tensors, integrity


def load_bundle(path: str | Path) -> Bundle:
    header, tensors, _ = _load_checked(Path(path))
    fields = {k: header[k] for k in Bundle.__dataclass_fields__ if k in header and k != "tensors"}
    return Bundle(tensors=tensors, **fields)


def check_base(bundle: Bundle, base, path: str = "") -> None:
    from .models import ARCHITECTURES
    from .models.fingerprint import same_weights

    arch = bundle.architecture
    if arch and arch != base.architecture:
        have = ARCHITECTURES.get(base.architecture, base.architecture)
        raise UserError(f"bundle {path or bundle.tokens} was learned on an {ARCHITECTURES.get(arch, arch)} base "
                        f"({bundle.base_name!r}) but the loaded base {base.name!r} is {have}: "
                        f"pass --base {bundle.base_name}, or re-learn the concepts on this base")
    # The same name with another print: the base behind the name was rebuilt (a new ToyWorld, a re-downloaded
    # checkpoint), so passing its name again cannot help.
    fix = ("learn the concepts again on this base" if bundle.base_name == base.name
           else f"pass --base {bundle.base_name}")
    require(
        bundle.base_fingerprint == base.fingerprint,
        f"bundle {path or bundle.tokens} was learned on base {bundle.base_name!r} (fingerprint {bundle.base_fingerprint}) "
        f"but the loaded base is {base.name!r} ({base.fingerprint}): {fix}",
    )
    require(same_weights(bundle.base_weights, base.weights),
            f"bundle {path or bundle.tokens} was learned on base {bundle.base_name!r}, whose weights differ from those of "
            f"the loaded base {base.name!r} (same configs and statistics, other weights: a fine-tune of it?): "
            f"pass --base {bundle.base_name}")


def describe(path: str | Path) -> dict:
    """What `multiconcept inspect` prints: the header, integrity and every tensor's shape, dtype and bytes."""
    path = Path(path)
    header, tensors, integrity = _load_checked(path)
    rows = [{"name": k, "shape": list(t.shape), "dtype": _DTYPE_NAMES.get(t.dtype, str(t.dtype)),
             "bytes": t.numel() * t.element_size()} for k, t in sorted(tensors.items())]
    return {"header": header, "integrity": integrity, "tensors": rows,
            "tensor_bytes": sum(r["bytes"] for r in rows), "file_bytes": path.stat().st_size}
