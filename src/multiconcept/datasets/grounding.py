"""Grounding DINO's input preparation and post-processing on tensors, giving exactly what transformers' processor
gives (same pixels to the bit, same boxes, scores and labels) in less time.

Around a Grounding DINO forward, transformers' PIL image processor and its grounded post-processing were
a tenth of the boxes stage: the processor takes each image through NumPy in float64 and per-image padding,
and the post-processing converts every label's token ids one tensor scalar at a time before decoding them
(its fast image processor needs torchvision, which this project does not install beside torch).

Here the resize is still PIL's (the very call the processor makes), rescaling and normalisation are one
table look-up per channel (uint8 has 256 values: the table holds the processor's float32 result for each),
padding writes into one batch tensor, and labels are decoded once per distinct token list in a batch. A
processor configured otherwise than this path reproduces (no resize to a shortest/longest edge, no
normalisation or padding, a fixed pad size), or an image that is not RGB, goes through the processor.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class GroundingDinoInputs:
    def __init__(self, processor):
        from transformers.image_utils import PILImageResampling

        self.processor = processor
        ip = processor.image_processor
        size = ip.size
        self.ok = bool(ip.do_resize and ip.do_rescale and ip.do_normalize and ip.do_pad and ip.pad_size is None
                       and size.shortest_edge and size.longest_edge and not getattr(ip, "do_convert_rgb", None))
        if not self.ok:
            return
        self.edges = (size.shortest_edge, size.longest_edge)
        self.resample = PILImageResampling(ip.resample if ip.resample is not None else PILImageResampling.BILINEAR)
        # the processor's arithmetic exactly: uint8 -> float64 * factor -> float32, then (x - mean) / std in float32
        levels = (np.arange(256, dtype=np.float64) * ip.rescale_factor).astype(np.float32)
        mean, std = np.asarray(ip.image_mean, np.float32), np.asarray(ip.image_std, np.float32)
        self.table = np.stack([(levels - m) / s for m, s in zip(mean, std)])  # (3, 256)

    def __call__(self, images: list[Image.Image], text: list[str]) -> dict:
        if not (self.ok and all(im.mode == "RGB" for im in images)):
            return dict(self.processor(images=images, text=text, return_tensors="pt", padding=True))
        from transformers.models.grounding_dino.image_processing_pil_grounding_dino import get_size_with_aspect_ratio

        resized = []
        for im in images:
            h, w = get_size_with_aspect_ratio((im.height, im.width), *self.edges)
            resized.append(im.resize((w, h), resample=self.resample, reducing_gap=None))
        height, width = max(r.height for r in resized), max(r.width for r in resized)
        # empty, not zeros: each element is written once, by the table or as padding
        pixels = torch.empty(len(images), 3, height, width)
        mask = torch.empty(len(images), height, width, dtype=torch.int64)
        out = pixels.numpy()
        for i, r in enumerate(resized):
            levels = np.asarray(r)  # (h, w, 3) uint8
            for c in range(3):
                np.take(self.table[c], levels[..., c], out=out[i, c, :r.height, :r.width], mode="clip")
            for t in (out[i], mask[i]):
                t[..., r.height:, :] = 0
                t[..., :r.height, r.width:] = 0
            mask[i, :r.height, :r.width] = 1
        tokens = self.processor.tokenizer(text, return_token_type_ids=True, padding=True, return_tensors="pt")
        return {**tokens, "pixel_values": pixels, "pixel_mask": mask}


def grounded_detections(outputs, input_ids: torch.Tensor, sizes: list[tuple[int, int]], box_threshold: float,
                        text_threshold: float, tokenizer) -> list[dict]:
    """transformers' `post_process_grounded_object_detection` for a batch at once: per image, the queries whose
    best token scores above `box_threshold`, their boxes in pixels of `sizes` (height, width), scores, and
    labels decoded from the prompt tokens scoring above `text_threshold`."""
    from transformers.image_transforms import center_to_corners_format

    probs = torch.sigmoid(outputs.logits)  # (batch, queries, max text length)
    scores = probs.max(-1).values
    scale = torch.stack([torch.Tensor([s[1] for s in sizes]), torch.Tensor([s[0] for s in sizes])] * 2, dim=1)
    boxes = center_to_corners_format(outputs.pred_boxes) * scale[:, None, :].to(outputs.pred_boxes.device)
    keep = scores > box_threshold
    # the processor never labels with the first position or the last one of the logits
    posmap = probs[keep] > text_threshold
    posmap[:, 0] = False
    posmap[:, -1] = False
    image_of = keep.nonzero()[:, 0]
    rows, cols = posmap.nonzero().T.tolist()
    ids = input_ids[image_of[rows], cols].tolist() if rows else []
    phrases: list[list[int]] = [[] for _ in range(len(posmap))]
    for r, t in zip(rows, ids):
        phrases[r].append(t)
    distinct = list(dict.fromkeys(map(tuple, phrases)))
    text = dict(zip(distinct, tokenizer.batch_decode([list(p) for p in distinct]))) if distinct else {}
    labels = [text[tuple(p)] for p in phrases]
    out, start = [], 0
    for b in range(len(sizes)):
        n = int(keep[b].sum())
        out.append({"boxes": boxes[b][keep[b]], "scores": scores[b][keep[b]], "labels": labels[start:start + n]})
        start += n
    return out
