"""The boxes stage: open-vocabulary detection of a caption's nouns.

Published pipeline: Grounding DINO (SwinT-OGC; `IDEA-Research/grounding-dino-tiny` is that checkpoint on the
hub) prompted with the nouns, box threshold 0.25, text threshold 0.2, then class-agnostic NMS at IoU 0.5.
OWLv2 (MuDI's choice) is the option; its scores run lower than Grounding DINO's, so pass a lower
`--box-threshold` with it (0.1 is transformers' default for OWLv2). The class is read from the checkpoint.
Grounding DINO's inputs and post-processing run on tensors (`grounding`), giving exactly what transformers'
processor gives in less time; `ProcessorGroundingDinoDetector` keeps the processor's path as the reference.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from .defaults import BOX_THRESHOLD, NMS_IOU, TEXT_THRESHOLD
from .defaults import DETECTOR as DEFAULT_DETECTOR
from .grounding import GroundingDinoInputs, grounded_detections
from .loading import load, model_source, model_type
from .records import Entity


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> list[int]:
    """Greedy non-maximum suppression (torchvision.ops.nms's rule; torchvision is not installed here).
    The IoU matrix is computed once; the greedy pass then only ORs rows of booleans."""
    if len(boxes) == 0:
        return []
    order = scores.argsort(descending=True)
    b = boxes[order]
    area = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    inter = (torch.minimum(b[:, None, 2:], b[None, :, 2:]) - torch.maximum(b[:, None, :2], b[None, :, :2])).clamp(min=0).prod(-1)
    over = (inter / (area[:, None] + area[None, :] - inter).clamp(min=1e-9) > iou).numpy()
    removed = np.zeros(len(b), dtype=bool)
    keep = []
    for i in range(len(b)):
        if not removed[i]:
            keep.append(int(order[i]))
            removed |= over[i]
    return keep


class Detector:
    def __init__(self, model, processor, name: str, box_threshold: float = BOX_THRESHOLD,
                 text_threshold: float = TEXT_THRESHOLD, nms_iou: float | None = NMS_IOU):
        self.model, self.processor, self.name = model, processor, name
        self.box_threshold, self.text_threshold, self.nms_iou = box_threshold, text_threshold, nms_iou
        self.device, self.dtype = model.device, model.dtype

    def _to(self, batch) -> dict:
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)) for k, v in batch.items()}

    @torch.inference_mode()
    def forward(self, inputs: dict):
        return self.model(**inputs)

    def __call__(self, images: list[Image.Image], nouns: list[list[str]]) -> list[list[Entity]]:
        todo = [i for i, n in enumerate(nouns) if n]
        out: list[list[Entity]] = [[] for _ in images]
        if not todo:
            return out
        imgs, ns = [images[i] for i in todo], [nouns[i] for i in todo]
        inputs = self.inputs(imgs, ns)
        results = self.post(self.forward(inputs), inputs, imgs, ns)
        for i, res in zip(todo, results):
            w, h = images[i].size
            boxes = res["boxes"].float().cpu()
            scores = res["scores"].float().cpu()
            if not (torch.isfinite(boxes).all() and torch.isfinite(scores).all()):
                # fp16 detectors can overflow to NaN: such an image becomes a reject, never a subject
                raise ValueError("the detector gave a box or score that is not finite (NaN or inf, as fp16 can): "
                                 "run it in fp32 (--dtype fp32)")
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            keep = nms(boxes, scores, self.nms_iou) if self.nms_iou is not None else range(len(scores))
            box_list, score_list = boxes.tolist(), scores.tolist()  # one conversion, not one per number
            out[i] = [Entity(str(res["labels"][k]).strip(), tuple(round(v, 2) for v in box_list[k]),
                             round(score_list[k], 4)) for k in keep]
        return out


def grounding_prompts(nouns: list[list[str]]) -> list[str]:
    # Grounding DINO reads its prompt as lower-case phrases each ended by a dot
    return [". ".join(n.lower() for n in ns) + "." for ns in nouns]


class GroundingDinoDetector(Detector):
    """Inputs and post-processing on tensors (`grounding`): what transformers' processor gives, faster."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.prepare = GroundingDinoInputs(self.processor)

    def inputs(self, images, nouns):
        return self._to(self.prepare(images, grounding_prompts(nouns)))

    def post(self, outputs, inputs, images, nouns):
        return grounded_detections(outputs, inputs["input_ids"], [im.size[::-1] for im in images], self.box_threshold,
                                   self.text_threshold, self.processor.tokenizer)


class ProcessorGroundingDinoDetector(Detector):
    """transformers' processor and post-processing: the reference the tensor path is tested and timed against."""

    def inputs(self, images, nouns):
        return self._to(self.processor(images=images, text=grounding_prompts(nouns), return_tensors="pt", padding=True))

    def post(self, outputs, inputs, images, nouns):
        res = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
            target_sizes=[im.size[::-1] for im in images])
        return [{"boxes": r["boxes"], "scores": r["scores"],
                 "labels": r["text_labels"] if "text_labels" in r else r["labels"]} for r in res]


class Owlv2Detector(Detector):
    def inputs(self, images, nouns):
        # OWL's processor pads each query to the tokenizer's fixed length (16), its default
        return self._to(self.processor(images=images, text=nouns, return_tensors="pt"))

    def post(self, outputs, inputs, images, nouns):
        # OWLv2 pads each image to a square before resizing, so boxes come back on the padded square
        sizes = [(max(im.size), max(im.size)) for im in images]
        res = self.processor.post_process_grounded_object_detection(outputs, threshold=self.box_threshold,
                                                                    target_sizes=sizes)
        out = []
        for r, ns in zip(res, nouns):
            # the processor pads every image's queries to the batch's longest list: drop the padding's hits
            keep = r["labels"] < len(ns)
            out.append({"boxes": r["boxes"][keep], "scores": r["scores"][keep],
                        "labels": [ns[i] for i in r["labels"][keep].tolist()]})
        return out


def load_detector(name: str = DEFAULT_DETECTOR, device: torch.device = torch.device("cpu"),
                  dtype: torch.dtype = torch.float32, box_threshold: float = BOX_THRESHOLD,
                  text_threshold: float = TEXT_THRESHOLD, nms_iou: float | None = NMS_IOU) -> Detector:
    import transformers

    source = model_source(name, "--detector")
    kind = model_type(source, "--detector")
    if kind == "grounding-dino":
        classes, cls = ("GroundingDinoForObjectDetection", "GroundingDinoProcessor"), GroundingDinoDetector
    elif kind == "owlv2":
        classes, cls = ("Owlv2ForObjectDetection", "Owlv2Processor"), Owlv2Detector
    else:
        raise UserError(f"--detector {name} is a {kind!r} checkpoint: pass Grounding DINO or OWLv2 "
                        f"(default {DEFAULT_DETECTOR})")
    model, processor = load(getattr(transformers, classes[0]), getattr(transformers, classes[1]), source,
                            "--detector", device, dtype)
    return cls(model, processor, name, box_threshold, text_threshold, nms_iou)
