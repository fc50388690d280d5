"""What a single-file base costs to identify: the fingerprint and the weights digest on an SD 1.5-sized checkpoint.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_single_file.py [--out benchmarks/results/single_file.json]

An SD 1.5-geometry pipeline (its UNet, VAE and CLIP ViT-L configs, with CLIP's 49,408-row vocabulary; random
weights, no download) is written as a single fp16 file in the original layout (2.1 GB) to a temporary folder
with its configs, loaded through `load_base(SingleFile(file, configs))` in fp32 as `--base FILE --base-config DIR`
does, and timed: the load (diffusers' from_single_file), the fingerprint, the weights digest (a fixed sample of
every tensor, both grids), and, for comparison, hashing every value on the fp16 grid. The folder is deleted after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # on a shared CPU, spinning threads starve each other

import torch  # noqa: E402
from bench_infusion_size import SD15_UNET  # noqa: E402
from geometry import CLIP_L  # noqa: E402
from sdxl_full_geometry import SDXL_VAE  # noqa: E402

SD15_VAE = {**SDXL_VAE, "sample_size": 512, "scaling_factor": 0.18215, "force_upcast": True}


def random_sd15(folder: Path) -> Path:
    """Write folder/configs (a diffusers folder without weights) and folder/sd15-random.safetensors (fp16)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from multiconcept.export.original_layout import original_tensors
    from multiconcept.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)
        te = CLIPTextModel(CLIPTextConfig(**CLIP_L, vocab_size=49408, max_position_embeddings=77))
    g = torch.Generator().manual_seed(0)
    for model in (unet, vae, te):
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02, generator=g)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    configs = folder / "configs"
    pipe.save_config(configs)
    unet.save_config(configs / "unet")
    vae.save_config(configs / "vae")
    te.config.save_pretrained(configs / "text_encoder")
    tok.save_pretrained(configs / "tokenizer")
    sched.save_config(configs / "scheduler")
    path = folder / "sd15-random.safetensors"
    save_file({k: v.half().contiguous() for k, v in original_tensors(pipe, "sd1").items()}, str(path))
    return path


def full_hash(pipe) -> str:
    """sha256 of every weight value on the fp16 grid: what hashing all of them would cost."""
    from multiconcept.models.fingerprint import weight_tensors

    h = hashlib.sha256()
    for name, t in sorted(weight_tensors(pipe).items()):
        h.update(t.detach().reshape(-1).to(torch.float16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def timed(fn, *args):
    t0 = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/single_file.json")
    args = parser.parse_args()

    from multiconcept.models import SingleFile
    from multiconcept.models.fingerprint import fingerprint, weights_digest
    from multiconcept.models.single_file import load_single_file

    with tempfile.TemporaryDirectory(prefix="bench-single-file-") as d:
        path = random_sd15(Path(d))
        size = path.stat().st_size
        pipe, load_s = timed(load_single_file, SingleFile(path, str(Path(d) / "configs")), torch.float32)
        params = sum(t.numel() for t in (*pipe.unet.parameters(), *pipe.vae.parameters(), *pipe.text_encoder.parameters()))
        _, fingerprint_s = timed(fingerprint, pipe)
        digest, digest_s = timed(weights_digest, pipe)
        _, full_s = timed(full_hash, pipe)
    result = {"file_bytes": size, "parameters": params, "threads": torch.get_num_threads(), "load_seconds": load_s,
              "fingerprint_seconds": fingerprint_s, "weights_digest_seconds": digest_s, "grids": sorted(digest),
              "full_fp16_hash_seconds": full_s}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
