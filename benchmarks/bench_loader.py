"""Loader throughput: images/s that train-encoder's streaming loader makes ready for a step, at 64 px (ToyWorld's
geometry: 64 px images, 64 px subject crops) and 512 px (SD 1.5's: 512 px images, 224 px crops for CLIP
ViT-L/14), with 0 (in the training process), 1 and 2 DataLoader workers.

    OMP_NUM_THREADS=1 python benchmarks/bench_loader.py        # ~5 min on 2 cores; data in a temporary folder

Each image goes through what FastComposer's training does before the model: read from its shard, PNG decoded,
its mask decoded, resized to the training size, the subject cut out onto noise, padded square and resized to
the crop size, augmented (zoom, rotation, colour jitter, blur, grayscale, flip at the paper's rates), the caption
tokenised, the micro-batch collated (batches of 8). Records are synthetic (datasets/synthetic.py: one square
per image; PNG). The first 2 micro-batches (worker start) are not timed. Per worker = all workers' images/s
divided by the number of workers (the training process's own for 0). On this 2-core machine another job uses
the CPU throughout, so 2 workers cannot show twice 1's rate. Writes benchmarks/results/loader.json.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
BATCH = 8
GEOMETRIES = {64: {"crop": 64, "images": 960}, 512: {"crop": 224, "images": 240}}


def throughput(folder: Path, px: int, crop: int, workers: int, images: int) -> float:
    from multiconcept.datasets.loader import MicroBatchLoader, Schedule
    from multiconcept.datasets.stream import open_stream
    from multiconcept.methods.fastcomposer import FastComposerConfig
    from multiconcept.models.tiny import tiny_tokenizer
    from multiconcept.workflows.encoder_data import subject_record
    from multiconcept.workflows.train_encoder import MicroBatchMaker, collate, make_sample

    cfg = FastComposerConfig(resolution=px)
    maker = MicroBatchMaker(make_sample, collate, cfg, tiny_tokenizer(), px, crop)
    loader = MicroBatchLoader(open_stream(str(folder)), Schedule(BATCH, 1), subject_record, maker, workers)
    warm = 2
    for step in range(warm):
        loader.get(step, 0)
    t0 = time.perf_counter()
    steps = images // BATCH
    for step in range(warm, warm + steps):
        batch = loader.get(step, 0)["batch"]
        assert batch["pixels"].shape == (BATCH, 3, px, px)
    seconds = time.perf_counter() - t0
    loader.close()
    return steps * BATCH / seconds


def main():
    from multiconcept.datasets.synthetic import write_synthetic_dataset

    results = {"batch": BATCH, "geometries": {}}
    for px, g in GEOMETRIES.items():
        tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
        try:
            write_synthetic_dataset(tmp / "ds", g["images"] + 4 * BATCH, per_shard=200, size=px, processes=2)
            row = {"crop": g["crop"], "images": g["images"]}
            for workers in (0, 1, 2):
                rate = throughput(tmp / "ds", px, g["crop"], workers, g["images"])
                row[f"workers_{workers}"] = {"images_per_s": round(rate, 1),
                                             "per_worker": round(rate / max(workers, 1), 1)}
                print(px, workers, row[f"workers_{workers}"], flush=True)
            results["geometries"][str(px)] = row
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "loader.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
