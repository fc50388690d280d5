"""Stage 6b: the shipped files: the base pipeline in fp16 and the evaluator with its processor; and, made after the
build, its tuning-free models in fp16."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from .common import Log, replace_dir
from .quality import quick_score
from .settings import BuildConfig, clip_names
from .unet import make_pipeline
from .world import WORLD


def _add_vocab_files(folder: Path, tokenizer_dir: Path) -> None:
    """SD-style tokenizer folders also carry vocab.json + merges.txt (tokenizer.json alone
    loads too), so CLIPTokenizer(vocab_file, merges_file) works on the shipped folder."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, folder / name)


def ship(cfg: BuildConfig, out: Path, work: Path, tokenizer, vae, trained: dict, log: Log) -> tuple[str, dict]:
    """Pick raw or EMA weights by checker score, write OUT/base in fp16 and OUT/evaluator."""
    scores = {kind: quick_score(make_pipeline(vae, te, tokenizer, un, cfg), cfg, n=WORLD.quick_n)
              for kind, (te, un) in trained.items()}
    choice = max(scores, key=lambda k: (scores[k]["match"], k == "raw"))
    log(f"ship: raw {scores['raw']} / ema {scores['ema']} -> shipping {choice}")
    te, un = trained[choice]
    pipe = make_pipeline(copy.deepcopy(vae).half(), copy.deepcopy(te).half(), tokenizer, copy.deepcopy(un).half(), cfg)
    tmp = out / "base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    _add_vocab_files(tmp / "tokenizer", work / "tokenizer")
    replace_dir(tmp, out / "base")
    for name in clip_names(cfg):
        ship_evaluator(out, work, name)
    return choice, scores


def ship_evaluator(out: Path, work: Path, name: str = "evaluator") -> Path:
    """OUT/NAME: a trained CLIPModel in fp16 (loaders upcast to fp32), its
    tokenizer (+ vocab.json/merges.txt) and image recipe. A CLIP is final
    once its stage ends, so it can ship before the base does."""
    from transformers import CLIPModel

    src, tmp = work / name, out / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    CLIPModel.from_pretrained(src, dtype=torch.float32).half().save_pretrained(tmp, safe_serialization=True)
    _add_vocab_files(tmp, work / "tokenizer")
    replace_dir(tmp, out / name)
    return out / name


def ship_tuning_free(folder: Path, out: Path) -> Path:
    """OUT/<method>: a finished FastComposer or Subject-Diffusion model folder with every tensor in fp16 (the loaders
    upcast to the base's dtype) and its config; no checkpoint, no training log."""
    from safetensors.torch import load_file, save_file

    from ...errors import require
    from ...methods.fastcomposer.config import CONFIG_FILE as FC_CONFIG
    from ...methods.subject_diffusion.config import CONFIG_FILE as SD_CONFIG
    from ..compose import model_method
    from ..train_encoder import CHECKPOINT

    folder = Path(folder)
    method = model_method(folder)
    config = folder / (SD_CONFIG if method == "subject-diffusion" else FC_CONFIG)
    require(config.is_file(), f"{folder} holds no finished FastComposer or Subject-Diffusion model ({config.name} "
                              "missing): give the folder `multiconcept train-encoder` wrote")
    require(not (folder / CHECKPOINT).exists(), f"{folder} is a model still training ({CHECKPOINT} there): finish "
                                                "its training, then ship it")
    tmp = out / f"{method}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(path))
        save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(tmp / path.name))
    shutil.copy(config, tmp / config.name)
    replace_dir(tmp, out / method)
    return out / method


# ---------------------------------------------------------------- entry point
