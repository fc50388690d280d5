"""A batch of items through decode -> caption -> nouns -> boxes -> masks, with the filters in between.

Filters run as soon as what they read exists (the source's size before captioning, the noun count before
detection, box filters before segmentation), so no model works on an image already dropped. A stage that
raises on a batch is retried one item at a time; an item that still fails is rejected with the stage's
name and the error, and the run goes on. Each item carries its share of every stage's time, so stage
throughput adds up the same way locally and on Ray.

`StageSpec` names what to load (checkpoints, thresholds, filters): it is all a Ray worker needs to build
its own `Pipeline` once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from . import filters as F
from .boxes import BOX_THRESHOLD, DEFAULT_DETECTOR, NMS_IOU, TEXT_THRESHOLD
from .captions import DEFAULT_CAPTIONER
from .filters import FilterSettings
from .masks import DEFAULT_SEGMENTER
from .nouns import DEFAULT_NOUNS
from .records import Item

STAGES = ("decode", "caption", "nouns", "boxes", "masks")
TOYWORLD = "toyworld"  # a stage named so reads the ToyWorld renderer's ground truth (datasets.toyworld)


@dataclass(frozen=True)
class StageSpec:
    captioner: str = DEFAULT_CAPTIONER  # hub id or folder; "source" keeps the source's .txt; "toyworld"
    nouns: str = DEFAULT_NOUNS  # spacy[:MODEL] | vocab:FILE | grounding | toyworld
    detector: str = DEFAULT_DETECTOR
    segmenter: str = DEFAULT_SEGMENTER
    box_threshold: float = BOX_THRESHOLD
    text_threshold: float = TEXT_THRESHOLD
    nms_iou: float | None = NMS_IOU
    filters: FilterSettings = field(default_factory=FilterSettings)
    device: str = "auto"
    dtype: str = "fp32"

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "StageSpec":
        return StageSpec(**{**d, "filters": FilterSettings(**d["filters"])})

    def all_toyworld(self) -> "StageSpec":
        return StageSpec(TOYWORLD, TOYWORLD, TOYWORLD, TOYWORLD, self.box_threshold, self.text_threshold,
                         self.nms_iou, self.filters, self.device, self.dtype)


class Pipeline:
    """Loaded stages. Each stage is a function items -> per-item results."""

    def __init__(self, spec: StageSpec):
        from ..models import pick_device, pick_dtype

        self.spec, self.filters = spec, spec.filters
        device = pick_device(spec.device)
        dtype = pick_dtype(spec.dtype, device)
        tw = None
        if TOYWORLD in (spec.captioner, spec.nouns, spec.detector, spec.segmenter):
            from . import toyworld as tw
        if spec.captioner == TOYWORLD:
            self.caption = tw.ground_truth_captions
        elif spec.captioner == "source":
            self.caption = lambda items: [it.source_caption or "" for it in items]
        else:
            from .captions import load_captioner

            self.captioner = load_captioner(spec.captioner, device, dtype)
            self.caption = lambda items: self.captioner([it.image() for it in items])
        if spec.nouns == TOYWORLD:
            self.nouns = tw.ground_truth_nouns
        else:
            from .nouns import load_nouns

            nouns = load_nouns(spec.nouns, getattr(self, "captioner", None))
            self.nouns = lambda items: nouns([it.caption for it in items], [it.image() for it in items])
        if spec.detector == TOYWORLD:
            self.boxes = tw.ground_truth_boxes
        else:
            from .boxes import load_detector

            self.detector = load_detector(spec.detector, device, dtype, spec.box_threshold, spec.text_threshold,
                                          spec.nms_iou)
            self.boxes = lambda items: self.detector([it.image() for it in items], [it.nouns for it in items])
        if spec.segmenter == TOYWORLD:
            self.masks = tw.ground_truth_masks
        else:
            from .masks import load_segmenter

            self.segmenter = load_segmenter(spec.segmenter, device, dtype)
            self.masks = lambda items: self.segmenter([it.image() for it in items], [it.entities for it in items])

    def process(self, items: list[Item]) -> list[Item]:
        t = time.perf_counter()
        for it in items:
            if it.reject is None:
                try:
                    it.image()
                except Exception as e:  # noqa: BLE001 - any decoder error is this image's, not the run's
                    it.reject = f"decode: {type(e).__name__}: {e}"
                    continue
                F.after_decode(it, self.filters)
        _share(items, "decode", time.perf_counter() - t)
        self._stage("caption", items, self.caption, lambda it, c: setattr(it, "caption", c))
        self._stage("nouns", items, self.nouns, lambda it, n: setattr(it, "nouns", list(n)))
        for it in items:
            if it.alive:
                F.after_nouns(it, self.filters)
        self._stage("boxes", items, self.boxes, lambda it, es: setattr(it, "entities", list(es)))
        for it in items:
            if it.alive:
                F.after_boxes(it, self.filters)
        self._stage("masks", items, self.masks, None)
        for it in items:
            if it.alive:
                F.after_masks(it, self.filters)
        for it in items:
            if not it.alive:
                it._image = None  # dropped or rejected: free the pixels now
        return items

    def _stage(self, name: str, items: list[Item], fn, assign) -> None:
        alive = [it for it in items if it.alive]
        if not alive:
            return
        t = time.perf_counter()
        try:
            self._apply(alive, fn, assign)
        except Exception:  # noqa: BLE001 - isolate the item that fails, keep the others
            for it in alive:
                try:
                    self._apply([it], fn, assign)
                except Exception as e:  # noqa: BLE001
                    it.reject = f"{name}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        _share(alive, name, time.perf_counter() - t)

    @staticmethod
    def _apply(items, fn, assign) -> None:
        with torch.inference_mode():
            results = fn(items)
        if assign is not None:
            for it, r in zip(items, results, strict=True):
                assign(it, r)


def _share(items: list[Item], stage: str, seconds: float) -> None:
    todo = [it for it in items if it.reject is None or stage == "decode"]
    for it in todo:
        it.seconds[stage] = it.seconds.get(stage, 0.0) + seconds / len(todo)


# ---------------------------------------------------------------- counting

class Tally:
    """Counts for stats.json: images in / rejected / kept, each filter's in and dropped, each stage's time."""

    def __init__(self, data: dict | None = None):
        d = data or {}
        self.images, self.rejected, self.kept, self.entities = (d.get(k, 0) for k in ("images", "rejected", "kept", "entities"))
        self.filters: dict[str, list[int]] = {k: list(v) for k, v in d.get("filters", {}).items()}
        self.stages: dict[str, list[float]] = {k: list(v) for k, v in d.get("stages", {}).items()}

    def add(self, it: Item) -> None:
        self.images += 1
        self.rejected += it.reject is not None
        if it.alive:
            self.kept += 1
            self.entities += len(it.entities)
        for k, (n_in, n_out) in it.tally.items():
            f = self.filters.setdefault(k, [0, 0])
            f[0] += n_in
            f[1] += n_out
        for k, s in it.seconds.items():
            st = self.stages.setdefault(k, [0, 0.0])
            st[0] += 1
            st[1] += s

    def merge(self, other: "Tally") -> None:
        self.images += other.images
        self.rejected += other.rejected
        self.kept += other.kept
        self.entities += other.entities
        for k, v in other.filters.items():
            f = self.filters.setdefault(k, [0, 0])
            f[0], f[1] = f[0] + v[0], f[1] + v[1]
        for k, v in other.stages.items():
            st = self.stages.setdefault(k, [0, 0.0])
            st[0], st[1] = st[0] + v[0], st[1] + v[1]

    def to_dict(self) -> dict:
        return {"images": self.images, "rejected": self.rejected, "kept": self.kept, "entities": self.entities,
                "filters": self.filters, "stages": self.stages}

    def report(self) -> dict:
        """stats.json: every filter's level, in, dropped, kept; every stage's images/s."""
        image_level = {"min_long_side", "max_white_share", "min_nouns", "max_nouns", "min_detections",
                       "max_detections", "no_subjects"}
        return {
            "images": {"in": self.images, "rejected": self.rejected, "kept": self.kept,
                       "dropped_by_filters": self.images - self.rejected - self.kept},
            "entities_kept": self.entities,
            "filters": {k: {"level": "image" if k in image_level else "entity", "in": v[0], "dropped": v[1],
                            "kept": v[0] - v[1]} for k, v in self.filters.items()},
            "stages": {k: {"images": int(v[0]), "seconds": round(v[1], 3),
                           "images_per_s": round(v[0] / v[1], 2) if v[1] > 0 else None}
                       for k, v in sorted(self.stages.items(), key=lambda kv: STAGES.index(kv[0]))},
        }
