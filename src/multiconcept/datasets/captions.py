"""The caption stage: one sentence per image from an image-to-text model.

The published Subject-Diffusion script captions with BLIP (`Salesforce/blip-image-captioning-large`; the
paper says BLIP-2, whose lines the script comments out). BLIP-2 and Florence-2 are the options; Florence-2
also grounds a caption's phrases (`<CAPTION_TO_PHRASE_GROUNDING>`), which the nouns stage can use instead
of a part-of-speech tagger. The class is read from the checkpoint's config.
"""

from __future__ import annotations

import torch
from PIL import Image

from ..errors import UserError
from .defaults import CAPTIONER as DEFAULT_CAPTIONER
from .loading import load, model_source, model_type

MAX_NEW_TOKENS = 30


class Captioner:
    """model + processor; `__call__(images) -> captions`. `inputs` and `generate` are separate so the
    benchmark can time the bare model on the very batches the stage sees."""
    task: str | None = None  # Florence-2's task token

    def __init__(self, model, processor, name: str):
        self.model, self.processor, self.name = model, processor, name
        self.device, self.dtype = model.device, model.dtype

    def inputs(self, images: list[Image.Image]) -> dict:
        kw = {"text": [self.task] * len(images)} if self.task else {}
        batch = self.processor(images=images, return_tensors="pt", **kw)
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in batch.items()}

    @torch.inference_mode()
    def generate(self, inputs: dict) -> torch.Tensor:
        return self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, num_beams=1, do_sample=False)

    def decode(self, ids: torch.Tensor, images: list[Image.Image]) -> list[str]:
        return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def __call__(self, images: list[Image.Image]) -> list[str]:
        return self.decode(self.generate(self.inputs(images)), images)


class BlipCaptioner(Captioner):
    pass


class Blip2Captioner(Captioner):
    pass


class Florence2Captioner(Captioner):
    task = "<CAPTION>"

    def decode(self, ids, images):
        texts = self.processor.batch_decode(ids, skip_special_tokens=False)
        return [self.processor.post_process_generation(t, task=self.task, image_size=im.size)[self.task].strip()
                for t, im in zip(texts, images)]

    @torch.inference_mode()
    def ground(self, images: list[Image.Image], captions: list[str]) -> list[list[str]]:
        """The caption's phrases that Florence-2 finds in the image ('a red car', ...)."""
        task = "<CAPTION_TO_PHRASE_GROUNDING>"
        batch = self.processor(images=images, text=[task + c for c in captions], return_tensors="pt", padding=True)
        batch = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)) for k, v in batch.items()}
        ids = self.model.generate(**batch, max_new_tokens=64, num_beams=1, do_sample=False)
        texts = self.processor.batch_decode(ids, skip_special_tokens=False)
        return [self.processor.post_process_generation(t, task=task, image_size=im.size)[task]["labels"]
                for t, im in zip(texts, images)]


KINDS = {"blip": "Blip", "blip-2": "Blip2", "florence2": "Florence2"}


def load_captioner(name: str = DEFAULT_CAPTIONER, device: torch.device = torch.device("cpu"),
                   dtype: torch.dtype = torch.float32) -> Captioner:
    import transformers

    source = model_source(name, "--captioner")
    kind = model_type(source, "--captioner")
    if kind not in KINDS:
        raise UserError(f"--captioner {name} is a {kind!r} checkpoint: pass a BLIP, BLIP-2 or Florence-2 model "
                        f"(default {DEFAULT_CAPTIONER})")
    prefix = KINDS[kind]
    model_cls = getattr(transformers, f"{prefix}ForConditionalGeneration")
    processor_cls = getattr(transformers, f"{prefix}Processor")
    model, processor = load(model_cls, processor_cls, source, "--captioner", device, dtype)
    return {"blip": BlipCaptioner, "blip-2": Blip2Captioner, "florence2": Florence2Captioner}[kind](model, processor, name)
