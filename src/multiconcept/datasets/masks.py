"""The masks stage: SAM, prompted with each detected box, one mask per box.

Published pipeline: SAM ViT-H (`facebook/sam-vit-huge`), box prompts, a single mask per box. SAM gets the
raw image through its own processor (the published script handed it an ImageNet-normalised tensor × 255, a
defect not to repeat). The image encoder runs once per batch; the light prompt decoder once per image with
all of that image's boxes. SAM 2 is refused: transformers' SAM 2 processor needs torchvision, which this
project does not install.
"""

from __future__ import annotations

import torch
from PIL import Image

from ..errors import UserError
from .defaults import SEGMENTER as DEFAULT_SEGMENTER
from .loading import load, model_source, model_type
from .records import Entity


class SamSegmenter:
    def __init__(self, model, processor, name: str):
        self.model, self.processor, self.name = model, processor, name
        self.device, self.dtype = model.device, model.dtype

    def inputs(self, images: list[Image.Image]) -> dict:
        batch = self.processor(images=images, return_tensors="pt")
        batch["pixel_values"] = batch["pixel_values"].to(self.device, self.dtype)
        return batch

    @torch.inference_mode()
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_embeddings(pixel_values)

    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor):
        return self.model(image_embeddings=embedding, input_boxes=boxes, multimask_output=False)

    def __call__(self, images: list[Image.Image], entities: list[list[Entity]]) -> None:
        """Sets each entity's mask (bool, the image's size) and mask_score (SAM's predicted IoU)."""
        todo = [i for i, es in enumerate(entities) if es]
        if not todo:
            return
        batch = self.inputs([images[i] for i in todo])
        emb = self.embed(batch["pixel_values"])
        for j, i in enumerate(todo):
            (h, w), (rh, rw) = batch["original_sizes"][j].tolist(), batch["reshaped_input_sizes"][j].tolist()
            # box prompts live on the resized image, as SamProcessor's input_boxes would put them
            scale = torch.tensor([rw / w, rh / h, rw / w, rh / h])
            boxes = torch.tensor([e.box for e in entities[i]], dtype=torch.float32) * scale
            out = self.decode(emb[j:j + 1], boxes[None].to(self.device))
            masks = self.processor.post_process_masks(out.pred_masks.float().cpu(), batch["original_sizes"][j:j + 1],
                                                      batch["reshaped_input_sizes"][j:j + 1])[0]
            for k, e in enumerate(entities[i]):
                e.mask = masks[k, 0].numpy().astype(bool)
                e.mask_score = round(float(out.iou_scores[0, k, 0]), 4)


def load_segmenter(name: str = DEFAULT_SEGMENTER, device: torch.device = torch.device("cpu"),
                   dtype: torch.dtype = torch.float32) -> SamSegmenter:
    from transformers import SamModel, SamProcessor

    source = model_source(name, "--segmenter")
    kind = model_type(source, "--segmenter")
    if kind.startswith("sam2"):
        raise UserError(f"--segmenter {name} is SAM 2, whose transformers processor needs torchvision, which "
                        f"multiconcept does not install: pass a SAM checkpoint (default {DEFAULT_SEGMENTER})")
    if kind != "sam":
        raise UserError(f"--segmenter {name} is a {kind!r} checkpoint: pass a SAM model (default {DEFAULT_SEGMENTER})")
    model, processor = load(SamModel, SamProcessor, source, "--segmenter", device, dtype)
    return SamSegmenter(model, processor, name)
