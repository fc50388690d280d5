"""Scoring throughput: our metric code vs a bare model forward on the same batch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_evaluation.py [n_images] [sizes]

sizes: comma list of toyworld (the ToyWorld evaluator's shape: 64 px, ViT
4×128, patch 8), vit-b-32 (openai/clip-vit-base-patch32's shape, 224 px) and
dino-s-16 (facebook/dino-vits16's shape). Weights are random, built from
configs and loaded from disk through `load_clip` / `load_dino`: throughput
does not depend on the values, and no hub access is needed.

Reported per model, images/s for
- ours:   `image_embeddings(list of PIL images)` — PIL/numpy preprocessing,
          batched forward, normalisation (what `evaluate` runs);
- bare:   `get_image_features(pixel_values)` / `model(pixel_values)` on the
          already-preprocessed tensor, same batch size — the floor;
- hf+fwd: transformers' own CLIPImageProcessor then the bare forward, for
          CLIP models — what a user would write without this package;
and the ratios ours/bare and ours/hf+fwd. Each figure is the best of 3 rounds that
interleave the paths, so load from other processes hits them alike.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no load reports between the table's rows

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from multiconcept.metrics import load_clip, load_dino
from multiconcept.metrics.clip import features
from multiconcept.models.tiny import tiny_tokenizer
from multiconcept.models.tiny_evaluators import save_tiny_clip

SHAPES = {
    "toyworld": dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, source_size=64),
    "vit-b-32": dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, source_size=512),
    "dino-s-16": dict(image_size=224, patch_size=16, hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                      num_attention_heads=6, source_size=512),
}


def build(kind: str, folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    shape = {k: v for k, v in SHAPES[kind].items() if k != "source_size"}
    torch.manual_seed(0)
    if kind == "dino-s-16":
        ViTModel(ViTConfig(**shape), add_pooling_layer=False).save_pretrained(folder)
        return folder
    tok = tiny_tokenizer()
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    text = dict(hidden_size=shape["hidden_size"] // 2, intermediate_size=shape["intermediate_size"] // 2,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, **ids)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=shape, projection_dim=128))
    processor = None
    if kind == "toyworld":  # the evaluator's recipe: [-1, 1], 64 px
        processor = {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64},
                     "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    return save_tiny_clip(folder, tokenizer=tok, model=model, processor=processor)


def measure(kind: str, n: int, batch: int, workdir: Path, rounds: int = 3) -> dict:
    folder = build(kind, workdir / kind)
    size = SHAPES[kind]["source_size"]
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)) for _ in range(n)]
    if kind == "dino-s-16":
        scorer = load_dino(str(folder), batch_size=batch)
        bare_model = lambda px: scorer.model(pixel_values=px).last_hidden_state[:, 0]  # noqa: E731
    else:
        scorer = load_clip(str(folder), batch_size=batch)
        bare_model = lambda px: features(scorer.model.get_image_features(pixel_values=px))  # noqa: E731
    pixels = scorer.preprocess(images)

    @torch.no_grad()
    def bare():
        for i in range(0, n, batch):
            bare_model(pixels[i: i + batch])

    paths = {"ours": lambda: scorer.image_embeddings(images), "bare": bare,
             "preprocess_only": lambda: scorer.preprocess(images)}
    if kind != "dino-s-16":
        try:
            from transformers import CLIPImageProcessorPil as Processor
        except ImportError:
            from transformers import CLIPImageProcessor as Processor
        hf = Processor.from_pretrained(folder) if (folder / "preprocessor_config.json").is_file() else \
            Processor(size={"shortest_edge": SHAPES[kind]["image_size"]},
                      crop_size={"height": SHAPES[kind]["image_size"], "width": SHAPES[kind]["image_size"]})

        @torch.no_grad()
        def hf_path():
            for i in range(0, n, batch):
                px = torch.from_numpy(hf(images=images[i: i + batch], return_tensors="np")["pixel_values"])
                bare_model(px)

        paths["hf+fwd"] = hf_path
    scorer.image_embeddings(images[:batch])  # warm-up
    # rounds interleave the paths, so a load spike from other processes hits all of them alike
    best = {k: float("inf") for k in paths}
    for _ in range(rounds):
        for k, fn in paths.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    row = {"model": kind, "images": n, "batch": batch, **{k: n / v for k, v in best.items()}}
    return row


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    kinds = sys.argv[2].split(",") if len(sys.argv) > 2 else list(SHAPES)
    print(f"torch threads {torch.get_num_threads()}, {n} images per run, batch 64")
    print(f"{'model':<10} {'ours img/s':>11} {'bare img/s':>11} {'ours/bare':>10} {'prep img/s':>11} "
          f"{'hf+fwd img/s':>13} {'ours/hf+fwd':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            r = measure(kind, n, 64, Path(tmp))
            hf = r.get("hf+fwd")
            print(f"{kind:<10} {r['ours']:>11.1f} {r['bare']:>11.1f} {r['ours'] / r['bare']:>10.2f} "
                  f"{r['preprocess_only']:>11.1f} {hf or float('nan'):>13.1f} "
                  f"{(r['ours'] / hf if hf else float('nan')):>12.2f}")


if __name__ == "__main__":
    main()
