"""Subject-dataset builder benchmark: what the pipeline adds over its models, Ray vs local, memory vs size.

    python benchmarks/bench_dataset.py                      # all four parts (~15 min on 2 cores)
    python benchmarks/bench_dataset.py --parts ratio --batches 6
    python benchmarks/bench_dataset.py --parts ratio --ratio-stages boxes   # the boxes stage alone (~1 min)

1. ratio: per stage, images/s of the stage as `Pipeline.process` calls it (processor, model,
   post-processing, NMS) over images/s of the bare model call on the very same pre-processed batches (BLIP
   `generate`, Grounding DINO forward, SAM image encoder + box-prompted decoder). Random-weight models of
   the real classes at sizes where the model is most of the work (stated in the output); batch 8;
   ToyWorld images; 1 torch thread. The two alternate 3 times per batch and each keeps its best time
   (background load only adds time), then times add up over 6 batches after a warm-up batch. The boxes
   stage is also timed through transformers' processor and post-processing (the reference its tensor path
   reproduces), in the same alternation.
2. ray: the same 1,000 ToyWorld images through the tiny test models, filters off: the local path (one
   process, 1 torch thread) vs a local Ray with 2 actors (1 thread each); wall time including Ray's start
   and the actors' model loading, the time to the first batch, and whether the shards are byte-identical;
   beside them the floor of Ray's cold start: a local Ray's start and 2 bare actors building the pipeline.
3. memory: RSS of a fresh process building N ToyWorld images with the ground-truth stages (the pipeline,
   the writer and the index without model weights, which do not grow with N), N = 1k and 10k: after every
   import, and its peak while building (sampled every 10 ms).
4. filters: what each filter drops of 1,000 ToyWorld renders (real masks), per profile.
Writes benchmarks/results/dataset.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
HERE = Path(__file__).parent


def ratio_part(work: Path, batches: int, batch_size: int = 8, threads: int = 1, repeats: int = 3,
               stages=("caption", "boxes", "masks")) -> dict:
    import torch

    from multiconcept.datasets.boxes import ProcessorGroundingDinoDetector
    from multiconcept.datasets.filters import PROFILES
    from multiconcept.datasets.on_ray import unit_batches
    from multiconcept.datasets.pipeline import Pipeline, StageSpec
    from multiconcept.datasets.sources import list_units
    from multiconcept.datasets.toyworld import CAPTION_WORDS, NOUNS, write_toyworld_source
    from multiconcept.models import quiet_loading
    from multiconcept.models.tiny_annotators import save_tiny_blip, save_tiny_grounding_dino, save_tiny_sam, write_vocabulary

    torch.set_num_threads(threads)
    sizes = {"captioner": "BLIP, ViT 4 x 256 at 224 px (patch 16) + text decoder 4 x 256, 30 new tokens",
             "detector": "Grounding DINO, Swin embed 32 at 256 px, d_model 128, 1+2 layers, 50 queries",
             "segmenter": "SAM, ViT 4 x 128 at 256 px (patch 8: 32x32 tokens), box-prompted decoder"}
    words = (*CAPTION_WORDS, *NOUNS)
    with quiet_loading():
        spec = StageSpec(captioner=str(save_tiny_blip(work / "blip", words, image_size=224, width=256, layers=4, patch_size=16)),
                         detector=str(save_tiny_grounding_dino(work / "gdino", words, image_size=256, d_model=128, embed_dim=32,
                                                               layers=1, queries=50)),
                         segmenter=str(save_tiny_sam(work / "sam", image_size=256, width=128, layers=4)),
                         nouns=f"vocab:{write_vocabulary(work / 'nouns.txt', NOUNS)}", filters=PROFILES["off"], device="cpu")
    write_toyworld_source(work / "src", batch_size * (batches + 1), seed=11, per_shard=10_000)
    pipe = Pipeline(spec)
    cap, det, seg = pipe.captioner, pipe.detector, pipe.segmenter

    def bare_masks(inputs, items):
        emb = seg.embed(inputs["pixel_values"])
        for j, it in enumerate(items):
            (h, w), (rh, rw) = inputs["original_sizes"][j].tolist(), inputs["reshaped_input_sizes"][j].tolist()
            boxes = torch.tensor([e.box for e in it.entities]) * torch.tensor([rw / w, rh / h, rw / w, rh / h])
            seg.decode(emb[j:j + 1], boxes[None])

    # the boxes stage is also timed through transformers' processor and post-processing (the reference its tensor
    # path must match), alternating with the other two, so the before / after ratio comes from the same batches
    ref = ProcessorGroundingDinoDetector(det.model, det.processor, det.name, det.box_threshold, det.text_threshold,
                                         det.nms_iou)
    ours_s = {s: 0.0 for s in stages}
    bare_s, ref_s = dict(ours_s), dict(ours_s)
    images = dict.fromkeys(ours_s, 0)
    per_batch: dict[str, list[float]] = {k: [] for k in ours_s}
    for i, batch in enumerate(unit_batches(list_units(work / "src")[0], batch_size)):
        pipe.process(batch)  # captions, nouns and boxes that the later stages read
        with_nouns = [it for it in batch if it.nouns]
        with_boxes = [it for it in batch if it.entities]
        # ours: the stage exactly as Pipeline.process calls it (processor, model, post-processing, NMS);
        # bare: the model call on inputs that stage's processor made (prepared outside the clock)
        cases = {"caption": (batch, lambda: pipe.caption(batch), cap.generate, cap.inputs([it.image() for it in batch]), None),
                 "boxes": (with_nouns, lambda: pipe.boxes(with_nouns), det.forward,
                           det.inputs([it.image() for it in with_nouns], [it.nouns for it in with_nouns]),
                           lambda: ref([it.image() for it in with_nouns], [it.nouns for it in with_nouns])),
                 "masks": (with_boxes, lambda: pipe.masks(with_boxes), None,
                           seg.inputs([it.image() for it in with_boxes]), None)} if with_boxes else {}
        for stage, (items, ours, model, inputs, reference) in ((k, v) for k, v in cases.items() if k in stages):
            best_ours = best_bare = best_ref = float("inf")
            for _ in range(repeats):  # alternate, keep each side's best: background load only ever adds time
                t0 = time.perf_counter()
                ours()
                t1 = time.perf_counter()
                model(inputs) if model is not None else bare_masks(inputs, items)
                t2 = time.perf_counter()
                if reference is not None:
                    reference()
                best_ours, best_bare = min(best_ours, t1 - t0), min(best_bare, t2 - t1)
                best_ref = min(best_ref, time.perf_counter() - t2)
            if i == 0:
                continue  # warm-up batch
            ours_s[stage] += best_ours
            bare_s[stage] += best_bare
            ref_s[stage] += best_ref
            images[stage] += len(items)
            per_batch[stage].append(best_bare / best_ours)
    rows = {}
    for stage in ours_s:
        rows[stage] = {"images": images[stage], "pipeline_images_per_s": round(images[stage] / ours_s[stage], 2),
                       "bare_images_per_s": round(images[stage] / bare_s[stage], 2),
                       "ratio": round(bare_s[stage] / ours_s[stage], 3),
                       "median_batch_ratio": round(float(np.median(per_batch[stage])), 3),
                       "batch_ratios": [round(r, 3) for r in per_batch[stage]]}
        if stage == "boxes":
            rows[stage]["transformers_processor_path"] = {
                "images_per_s": round(images[stage] / ref_s[stage], 2), "ratio": round(bare_s[stage] / ref_s[stage], 3)}
    return {"batch_size": batch_size, "threads": threads, "repeats": repeats, "models": sizes, "stages": rows}


def _shard_bytes(out: Path) -> dict:
    got = {}
    for p in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(p) as tf:
            got.update({f"{p.name}/{m.name}": tf.extractfile(m).read() for m in tf.getmembers()})
    return got


def _ray_floor(spec, workers: int) -> dict:
    """A local Ray's start, and its actors building the pipeline (imports, models), without Ray Data or a batch:
    the part of the builder's cold start that is Ray's and the models', not the builder's plumbing."""
    import ray

    from multiconcept.datasets.on_ray import READ_CPUS, PipelineWorker, start_ray

    t = time.perf_counter()
    start_ray(None, workers * (1 + READ_CPUS))
    started = time.perf_counter() - t
    try:
        worker = ray.remote(num_cpus=1)(PipelineWorker)
        actors = [worker.remote(spec.to_dict(), 1) for _ in range(workers)]
        ray.get([a.__call__.remote({"unit": [], "payload": []}) for a in actors])
        return {"ray_start_seconds": round(started, 1), "actors_ready_seconds": round(time.perf_counter() - t, 1)}
    finally:
        ray.shutdown()


def ray_part(work: Path, n: int = 1000) -> dict:
    from multiconcept.datasets.filters import PROFILES
    from multiconcept.datasets.pipeline import StageSpec
    from multiconcept.datasets.toyworld import CAPTION_WORDS, NOUNS, write_toyworld_source
    from multiconcept.models.tiny_annotators import save_tiny_models
    from multiconcept.workflows.dataset import BuildSettings, build

    models = save_tiny_models(work / "models", CAPTION_WORDS, NOUNS)
    write_toyworld_source(work / "src", n, seed=21, per_shard=100)
    spec = StageSpec(filters=PROFILES["off"], device="cpu", **models)
    res = {"images": n}
    # local with 1 thread: on this shared 2-core machine 2 torch threads ran 10-60x slower (OpenMP threads
    # waiting on a core another job holds: 35-180 s per 100 images against 3 s with 1 thread)
    for name, cfg in (("local", BuildSettings(stages=spec, batch_size=8, threads=1)),
                      ("ray", BuildSettings(stages=spec, batch_size=8, threads=1, ray=True, ray_workers=2, ray_cpus=1))):
        if name == "ray":
            res["ray_floor"] = _ray_floor(spec, workers=2)
        t = time.perf_counter()
        first: list[float] = []  # when the first batch came back: start-up (Ray, actors loading models) ends
        report = build(work / "src", work / name, cfg,
                       progress=lambda shard, tally: first or first.append(time.perf_counter() - t))
        wall = time.perf_counter() - t
        res[name] = {"seconds": round(wall, 1), "images_per_s": round(n / wall, 2), "kept": report["images"]["kept"],
                     "entities": report["entities_kept"], "first_batch_seconds": round(first[0], 1),
                     "after_first_batch_images_per_s": round((n - 8) / (wall - first[0]), 2)}
    res["ray_over_local_throughput"] = round(res["local"]["seconds"] / res["ray"]["seconds"], 3)
    # the cold start against its floor: 1.0 would be a first batch the moment both actors hold their models
    res["ray_first_batch_over_floor"] = round(res["ray"]["first_batch_seconds"] / res["ray_floor"]["actors_ready_seconds"], 2)
    res["identical_shards"] = _shard_bytes(work / "local") == _shard_bytes(work / "ray")
    return res


def _memory_child(source: str, out: str) -> None:
    import threading

    import psutil

    from multiconcept.datasets.filters import PROFILES
    from multiconcept.datasets.pipeline import Pipeline, StageSpec
    from multiconcept.workflows.dataset import BuildSettings, build

    spec = StageSpec(filters=PROFILES["toyworld"]).all_toyworld()
    Pipeline(spec)  # every import the build makes, before the baseline
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, stop = [base], threading.Event()

    def sample():
        while not stop.wait(0.01):
            peak[0] = max(peak[0], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    report = build(source, out, BuildSettings(stages=spec))
    stop.set()
    sampler.join()
    mb = 1 << 20
    print(json.dumps({"rss_before_mb": round(base / mb, 1), "peak_rss_during_build_mb": round(peak[0] / mb, 1),
                      "growth_mb": round((peak[0] - base) / mb, 1),
                      "peak_rss_process_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "seconds": round(time.perf_counter() - t, 1), "images": report["images"]["in"],
                      "entities": report["entities_kept"]}))


def memory_part(work: Path, sizes=(1000, 10_000)) -> dict:
    from multiconcept.datasets.toyworld import write_toyworld_source

    res = {}
    for n in sizes:
        write_toyworld_source(work / f"src{n}", n, seed=31, per_shard=1000)
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(work / f"src{n}"), str(work / f"out{n}")],
                             check=True, capture_output=True, text=True).stdout
        res[str(n)] = json.loads(out.strip().splitlines()[-1])
    return res


def filters_part(work: Path, n: int = 1000) -> dict:
    """What each filter keeps of n ToyWorld renders (ground-truth stages, so real masks): the toyworld profile,
    and the published one with its size filter off (every render is 64 px, below its 600)."""
    from dataclasses import replace

    from multiconcept.datasets.filters import PROFILES
    from multiconcept.datasets.pipeline import StageSpec
    from multiconcept.datasets.toyworld import write_toyworld_source
    from multiconcept.workflows.dataset import BuildSettings, build

    write_toyworld_source(work / "src", n, seed=41, per_shard=1000)
    res = {}
    for name, f in (("toyworld", PROFILES["toyworld"]),
                    ("published_without_size", replace(PROFILES["published"], min_long_side=None))):
        report = build(work / "src", work / name, BuildSettings(stages=StageSpec(filters=f).all_toyworld()))
        res[name] = {"images": report["images"], "entities_kept": report["entities_kept"],
                     "filters": {k: [v["in"], v["dropped"]] for k, v in report["filters"].items()}}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="ratio,ray,memory,filters")
    ap.add_argument("--batches", type=int, default=6, help="timed batches of 8 for the ratio part")
    ap.add_argument("--ratio-stages", default="caption,boxes,masks", help="stages the ratio part times")
    ap.add_argument("--ray-images", type=int, default=1000)
    ap.add_argument("--memory-sizes", default="1000,10000")
    ap.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return _memory_child(*args.memory_child)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for part in args.parts.split(","):
            t = time.perf_counter()
            if part == "ratio":
                results[part] = ratio_part(work / part, args.batches, stages=args.ratio_stages.split(","))
            elif part == "ray":
                results[part] = ray_part(work / part, args.ray_images)
            elif part == "filters":
                results[part] = filters_part(work / part)
            elif part == "memory":
                results[part] = memory_part(work / part, tuple(int(s) for s in args.memory_sizes.split(",")))
            results[part]["bench_seconds"] = round(time.perf_counter() - t, 1)
            print(json.dumps({part: results[part]}, indent=1), flush=True)
    (HERE / "results").mkdir(exist_ok=True)
    path = HERE / "results" / "dataset.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**old, **results}, indent=1))  # a run of some parts keeps the others' figures


if __name__ == "__main__":
    main()
