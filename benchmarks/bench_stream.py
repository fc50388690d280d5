"""Streaming a built dataset at 10k and 1M records: memory over one epoch, the cost of resuming deep in it,
and 100 training steps from it.

    OMP_NUM_THREADS=1 python benchmarks/bench_stream.py                  # 10k and 1M: ~1 h on 2 shared cores,
                                                                          # 4.1 GB in a temporary folder, deleted
    OMP_NUM_THREADS=1 python benchmarks/bench_stream.py --sizes 10000     # a quick look

Per size N, in a temporary folder: N tiny synthetic records (16 px, one square and its mask each; 1,000 per
shard) written by the builder's own writer (datasets/synthetic.py). Then, each in a fresh process:
1. epoch: one epoch as train-encoder reads it: 2 DataLoader workers, micro-batches of 64, every sample
   decoded into its training record (image, mask, box, caption). The PSS of the main process plus its
   workers is sampled every 0.5 s; the peak and the median over the epoch are reported.
2. resume: from opening the dataset (shards.json, every shard's size checked) to the first micro-batch, at
   the start of the epoch and at its last micro-batch (N − 64 samples skipped), no workers.
3. train (the largest N): 100 FastComposer steps on the tiny base, batch 8, 2 workers: seconds and peak PSS.
Writes benchmarks/results/stream.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).parent
BATCH = 64


def pss_of_tree() -> int:
    """PSS in bytes of this process and every process under it."""
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:  # a worker that just ended
            pass
    return total


class PssSampler:
    def __init__(self, every: float = 0.5):
        self.samples: list[int] = []
        self.every, self.stop = every, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(self.every):
            self.samples.append(pss_of_tree())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def epoch(folder: str) -> dict:
    from multiconcept.datasets.loader import MicroBatchLoader, Schedule
    from multiconcept.datasets.stream import open_stream
    from multiconcept.workflows.encoder_data import subject_record

    stream = open_stream(folder)
    loader = MicroBatchLoader(stream, Schedule(BATCH, 1), subject_record, lambda records, step, micro: len(records), 2)
    steps = -(-stream.total // BATCH)
    t0 = time.perf_counter()
    seen = 0
    with PssSampler() as pss:
        for step in range(steps):
            seen += loader.get(step, 0)["batch"]
    seconds = time.perf_counter() - t0
    loader.close()
    mb = [s / 2**20 for s in pss.samples]
    return {"samples": seen, "seconds": round(seconds, 1), "samples_per_s": round(seen / seconds),
            "pss_peak_mb": round(max(mb), 1), "pss_median_mb": round(statistics.median(mb), 1), "pss_samples": len(mb)}


def resume(folder: str) -> dict:
    from multiconcept.datasets.loader import MicroBatchLoader, Schedule
    from multiconcept.datasets.stream import open_stream
    from multiconcept.workflows.encoder_data import subject_record

    out = {}
    for where, at in (("start", lambda n: 0), ("last_batch", lambda n: n - BATCH)):
        t0 = time.perf_counter()
        stream = open_stream(folder)
        opened = time.perf_counter()
        loader = MicroBatchLoader(stream, Schedule(BATCH, 1, anchor_sample=at(stream.total)), subject_record,
                                  lambda records, step, micro: records, 0)
        item = loader.get(0, 0)
        done = time.perf_counter()
        out[where] = {"open_s": round(opened - t0, 3), "first_batch_s": round(done - t0, 3),
                      "index": item["samples"][0].index}
    return out


def train(folder: str) -> dict:
    from multiconcept.methods.fastcomposer import FastComposerConfig
    from multiconcept.workflows.train_encoder import train_encoder

    with tempfile.TemporaryDirectory() as tmp, PssSampler() as pss:
        t0 = time.perf_counter()
        train_encoder(folder, Path(tmp) / "fc", base="tiny", progress=False, workers=2,
                      cfg=FastComposerConfig(steps=100, batch_size=8, lr=1e-4, checkpoint_every=0))
        seconds = time.perf_counter() - t0
    return {"steps": 100, "batch": 8, "seconds": round(seconds, 1), "pss_peak_mb": round(max(pss.samples) / 2**20, 1)}


def in_fresh_process(part: str, folder: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--part", part, "--folder", folder], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,1000000")
    ap.add_argument("--part", choices=["epoch", "resume", "train"])
    ap.add_argument("--folder")
    args = ap.parse_args()
    if args.part:
        print(json.dumps({"epoch": epoch, "resume": resume, "train": train}[args.part](args.folder)))
        return
    from multiconcept.datasets.synthetic import write_synthetic_dataset

    sizes = [int(s) for s in args.sizes.split(",")]
    results = {"batch": BATCH, "workers": 2, "record_px": 16, "per_shard": 1000, "sizes": {}}
    for n in sizes:
        tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
        try:
            t0 = time.perf_counter()
            write_synthetic_dataset(tmp / "ds", n, per_shard=1000, processes=2)
            row = {"write_s": round(time.perf_counter() - t0, 1),
                   "bytes": sum(p.stat().st_size for p in (tmp / "ds" / "shards").glob("*.tar"))}
            for part in ("epoch", "resume") + (("train",) if n == max(sizes) else ()):
                row[part] = in_fresh_process(part, str(tmp / "ds"))
                print(n, part, row[part], flush=True)
            results["sizes"][str(n)] = row
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if len(sizes) > 1:
        small, large = (results["sizes"][str(s)]["epoch"] for s in (min(sizes), max(sizes)))
        results["pss_peak_ratio"] = round(large["pss_peak_mb"] / small["pss_peak_mb"], 3)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "stream.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
