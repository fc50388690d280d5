"""What identifies a base: its fingerprint (configs and weight statistics) and its weights digest.

`fingerprint` is the print every bundle and model folder has recorded since the first release: configs,
vocabulary size and rounded statistics of four probe tensors. It is kept exactly as it was, so a diffusers
folder's print never changes and existing bundles stay valid; the same weights loaded from a single-file
checkpoint with the same configs get the same print. Its statistics cannot see a fine-tune that leaves
those four tensors alone, so bundles also record `weights_digest`, which reads every weight tensor.

`weights_digest` hashes, per tensor (sorted by name), its name, shape and a fixed sample of its values:
all of them up to `SAMPLES`, else every k-th from the first (k = ⌈numel / SAMPLES⌉) — SD 1.5's 2 GB of fp16
weights in tens of milliseconds instead of seconds (docs/single-file.md has both measured). A fine-tune,
a merged LoRA or a 1e-3 perturbation moves every sampled value; an edit confined to a few elements of a
large tensor (a handful of token rows) can fall between the samples. The values are hashed on two grids,
fp16 and bf16, each computable when every weight is fp32 or of that grid's type: the same checkpoint
loaded in fp32 and in fp16 rounds to the same fp16 values, and in fp32 and bf16 to the same bf16 values
(a base loaded in fp32 has both; fp16 or bf16 loads have their own). Prints compare on the grids both have.
"""

from __future__ import annotations

import hashlib
import json

import torch

SAMPLES = 4096
GRIDS = {"fp16": torch.float16, "bf16": torch.bfloat16}
PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")


def fingerprint(pipe) -> str:
    """Identify a base by its configs, vocabulary and weight statistics.

    Statistics (mean |w|, std at 3 significant digits) rather than raw bytes,
    so the same checkpoint loaded in fp32, fp16 or bf16 gets the same print.
    """
    h = hashlib.sha256()
    if getattr(pipe, "unet", None) is None:
        return _transformer_fingerprint(pipe, h)
    second = getattr(pipe, "text_encoder_2", None)  # SDXL's; an SD base's print is what it always was
    for part in (pipe.unet, pipe.text_encoder, pipe.vae) + ((second,) if second is not None else ()):
        raw = part.config.to_dict() if hasattr(part.config, "to_dict") else dict(part.config)
        cfg = {k: v for k, v in raw.items()
               if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")}
        h.update(type(part).__name__.encode())
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(str(pipe.text_encoder.get_input_embeddings().weight.shape[0]).encode())
    probes = [
        pipe.unet.conv_in.weight,
        pipe.unet.conv_out.weight,
        pipe.text_encoder.get_input_embeddings().weight,
        pipe.vae.decoder.conv_out.weight,
    ]
    return _probe_statistics(h, probes)


def _probe_statistics(h, probes) -> str:
    for t in probes:
        t = t.detach().float()
        h.update(f"{t.abs().mean().item():.3g}/{t.std().item():.3g}".encode())
    return h.hexdigest()[:16]


def _config(part) -> dict:
    raw = part.config.to_dict() if hasattr(part.config, "to_dict") else dict(part.config)
    return {k: v for k, v in raw.items() if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")}


def _transformer_fingerprint(pipe, h) -> str:
    """A flow transformer pipeline's print, made as a UNet pipeline's: every model's class and config, the
    first encoder's vocabulary size, and the statistics of the transformer's first and last weight, the first
    encoder's token embedding and the VAE's last convolution."""
    encoders = [te for te in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
                if te is not None]
    for part in (pipe.transformer, *encoders, pipe.vae):
        h.update(type(part).__name__.encode())
        h.update(json.dumps(_config(part), sort_keys=True, default=str).encode())
    h.update(str(encoders[0].get_input_embeddings().weight.shape[0]).encode())
    weights = [p for _, p in pipe.transformer.named_parameters() if p.dim() == 2]
    return _probe_statistics(h, [weights[0], weights[-1], encoders[0].get_input_embeddings().weight,
                                 pipe.vae.decoder.conv_out.weight])


def weight_tensors(pipe) -> dict[str, torch.Tensor]:
    """{part.name: tensor} of every floating-point weight of the UNet, text encoders and VAE. transformers 5's
    CLIPTextModel dropped the `text_model.` level of transformers 4's names: the digest reads names without it."""
    out = {}
    for part in PARTS:
        model = getattr(pipe, part, None)
        if model is None:
            continue
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                out[f"{part}.{name.replace('text_model.', '')}"] = t
    return out


def weights_digest(pipe) -> dict[str, str]:
    """{grid: 16 hex digits} for the grids this pipeline's dtypes allow (see the module's docstring)."""
    tensors = weight_tensors(pipe)
    dtypes = {t.dtype for t in tensors.values()}
    grids = {g: dt for g, dt in GRIDS.items() if dtypes <= {torch.float32, dt}}
    hashes = {g: hashlib.sha256(b"multiconcept-weights-1\n") for g in grids}

    def put(h, b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    for name in sorted(tensors):
        flat = tensors[name].detach().reshape(-1)
        sample = flat[:: -(-flat.numel() // SAMPLES)].cpu()  # k = ceil(numel / SAMPLES): at most SAMPLES values
        for g, h in hashes.items():
            put(h, name.encode())
            put(h, json.dumps(list(tensors[name].shape)).encode())
            put(h, sample.to(grids[g]).view(torch.int16).numpy().tobytes())
    return {g: h.hexdigest()[:16] for g, h in hashes.items()}


def same_weights(recorded: dict, digest: dict) -> bool:
    """Whether a recorded digest and a base's agree on every grid both have (True when they share none:
    an older record, or a base loaded in fp16 read against one learned in bf16; the fingerprint still decides)."""
    return all(recorded[g] == digest[g] for g in set(recorded) & set(digest))
