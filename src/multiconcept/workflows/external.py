"""Files from other tools on top of the bundles: LoRAs (diffusers or kohya / A1111 / ComfyUI layout) and
textual-inversion embeddings (kohya's / A1111's / ComfyUI's single-tensor safetensors, or diffusers').

Both go through diffusers' own loaders (`load_lora_weights` converts kohya's keys, `load_textual_inversion`
adds the token); this module checks the file first, so a bad one is one line naming it, not a traceback.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError, gist, require
from ..export.flow import embedding_keys
from ..prompts import set_token_rows


def read_tensor_file(path: Path, role: str, fix: str) -> dict[str, torch.Tensor]:
    """A readable safetensors file of finite tensors, or a UserError naming `role` {path} and `fix`
    (diffusers' loaders raise OSError, ValueError, KeyError, ... and log several lines of their own)."""
    from safetensors import SafetensorError, safe_open

    from ..errors import is_file

    require(path.suffix == ".safetensors" and is_file(path), f"{role} {path} must be an existing .safetensors file ({fix})")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{role} {path} is corrupt or not a safetensors file ({gist(e)}): "
                        f"download it again, or pass {fix}") from e
    require(bool(tensors), f"{role} {path} holds no tensors: pass {fix}")
    bad = next((k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    require(bad is None, f"{role} {path} holds NaN or infinite values in {bad}: it is corrupt; download it again")
    return tensors


LORA_FIX = "a diffusers/kohya LoRA .safetensors"


def check_lora_file(path: Path) -> None:
    read_tensor_file(Path(path), "LoRA", LORA_FIX)


def add_lora(loaded, path: str | Path, scale: float = 1.0) -> None:
    """Add a LoRA file (diffusers' or kohya's layout, e.g. a style LoRA) on top of the loaded bundles."""
    from diffusers.utils import logging as diffusers_logging

    path = Path(path)
    first_key = next(iter(read_tensor_file(path, "LoRA", LORA_FIX)))
    pipe = loaded.base.pipe
    name = f"extra_{len(loaded.base.lora_adapters)}"
    verbosity = diffusers_logging.get_verbosity()
    # a failed load is logged by diffusers as several lines; the one-line error below says it instead
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    except Exception as e:  # noqa: BLE001 - a user's file: whatever diffusers/peft raise means "does not fit"
        raise UserError(f"LoRA {path} does not fit this base ({gist(e)}): use a LoRA made for it") from e
    finally:
        diffusers_logging.set_verbosity(verbosity)
    # keys diffusers does not recognise load as nothing, silently
    require(any(name in names for names in pipe.get_list_adapters().values()),
            f"LoRA {path} changes no layer of this base (its keys, e.g. {first_key!r}, match none): "
            f"use a diffusers/kohya LoRA made for this base")
    loaded.base.lora_adapters[name] = scale
    pipe.set_adapters(list(loaded.base.lora_adapters), adapter_weights=list(loaded.base.lora_adapters.values()))
    loaded.extra_loras.append(path.name)


EMBEDDING_FIX = "a textual-inversion embedding .safetensors (kohya/A1111/ComfyUI: one tensor, e.g. emb_params)"


def embedding_token(spec: str) -> tuple[str, Path]:
    """'--embedding FILE' -> ('<FILE's stem>', FILE), as A1111 names an embedding after its file;
    '--embedding <tok>=FILE' chooses the token."""
    from ..data import split_token_path

    token, path = split_token_path(spec)
    path = Path(path)
    token = token or f"<{path.stem}>"
    require(" " not in token and "|" not in token,
            f"embedding {path} would be the token {token!r}, which a prompt cannot name: pass '<name>={path}'")
    return token, path


def check_embedding_tokens(bundle_paths: list[str], embeddings: list[str]) -> None:
    """Refuse an embedding whose token a bundle or another embedding already defines, from the bundles'
    headers, before any model loads."""
    from ..bundle import read_header

    owners = {t: str(p) for p in bundle_paths for t in read_header(p)["tokens"]}
    for spec in embeddings:
        token, path = embedding_token(spec)
        require(token not in owners, f"{token} is defined by both {owners.get(token)} and {path}: load one of them, "
                                     f"or give this one another token ('<name>={path}')")
        owners[token] = str(path)


def embedding_vectors(path: Path, widths: list[int], keys: tuple[str, ...] | None = None) -> list[torch.Tensor]:
    """Per text encoder of the base (their input widths), the [n, width] vectors of an embedding file:
    one tensor for a one-encoder base (kohya's `emb_params`, A1111's and ComfyUI's safetensors,
    diffusers' {token: row}); SDXL's pair, `clip_l` for the first encoder and `clip_g` for the second;
    a flow transformer's, one per `keys` (export/flow.py: FLUX.1's `clip_l` and `t5`, ...)."""
    tensors = read_tensor_file(path, "embedding", EMBEDDING_FIX)
    pair = {"clip_l", "clip_g"} <= set(tensors)
    if keys is not None:
        missing = [k for k in keys if k not in tensors]
        require(not missing, f"embedding {path} lacks {', '.join(missing)} (this base reads one row per text encoder: "
                             f"{', '.join(keys)}): use an embedding made for this base")
        vectors = [tensors[k] for k in keys]
    elif len(widths) == 2:
        require(pair, f"embedding {path} is not an SDXL embedding (it lacks clip_l and clip_g, one row set per text "
                      f"encoder): this base is SDXL; use an embedding made for SDXL")
        vectors = [tensors["clip_l"], tensors["clip_g"]]
    else:
        require(not pair, f"embedding {path} is for SDXL (clip_l and clip_g): this base has one text encoder; "
                          f"use an SD 1.x/2.x embedding")
        require(len(tensors) == 1, f"embedding {path} holds {len(tensors)} tensors ({', '.join(list(tensors)[:3])}, ...): "
                                   f"pass {EMBEDDING_FIX}")
        vectors = [next(iter(tensors.values()))]
    vectors = [t[None] if t.dim() == 1 else t for t in vectors]
    for t, width in zip(vectors, widths):
        require(t.dim() == 2 and t.shape[1] == width and t.shape[0] == vectors[0].shape[0] >= 1 and t.is_floating_point(),
                f"embedding {path} has shape{'s' if len(vectors) > 1 else ''} "
                f"{', '.join(str(tuple(v.shape)) for v in vectors)} but this base's text encoder"
                f"{'s take' if len(widths) > 1 else ' takes'} vectors of {' and '.join(map(str, widths))}: "
                f"use an embedding made for this base")
    return vectors


def add_embedding(loaded, spec: str) -> str:
    """Add an embedding file's token through diffusers' `load_textual_inversion` (SDXL: each encoder's
    rows into its encoder, as diffusers documents); returns the token."""
    token, path = embedding_token(spec)
    base = loaded.base
    owners = {t: p for p, b in loaded.bundles for t in b.tokens}
    require(token not in owners and token not in loaded.extra_tokens,
            f"{token} is defined by both {owners.get(token, 'another --embedding')} and {path}: load one of them, "
            f"or give this one another token ('<name>={path}')")
    for tokenizer in base.tokenizers:
        require(token not in tokenizer.get_vocab() and f"{token}_1" not in tokenizer.get_vocab(),
                f"embedding {path} would be the token {token}, which this base's vocabulary already has: "
                f"give it another ('<name>={path}')")
    keys = embedding_keys(base) if base.flow is not None else None
    vectors = embedding_vectors(path, [te.get_input_embeddings().weight.shape[1] for te in base.text_encoders], keys)
    try:
        if base.flow is not None and base.architecture != "flux1":  # no load_textual_inversion: by hand, as exported
            for v, te, tokenizer in zip(vectors, base.text_encoders, base.tokenizers):
                require(v.shape[0] == 1, f"embedding {path} has {v.shape[0]} vectors per encoder: this base takes one")
                set_token_rows(tokenizer, te, {token: v[0]})
        elif len(vectors) == 1 and keys is None:
            base.pipe.load_textual_inversion(str(path), token=token)
        else:
            for v, te, tokenizer in zip(vectors, base.text_encoders, base.tokenizers):
                base.pipe.load_textual_inversion(v, token=token, text_encoder=te, tokenizer=tokenizer)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a user's file: whatever diffusers raises means "does not fit"
        raise UserError(f"embedding {path} does not fit this base ({gist(e)}): use an embedding made for it") from e
    n = vectors[0].shape[0]
    loaded.extra_tokens.append(token)
    loaded.extra_embeddings.append(f"{path.name} ({token}, {n} vector{'s' if n > 1 else ''})")
    return token

