"""The boxes stage's tensor path against transformers' Grounding DINO processor and post-processing: the same
model inputs to the bit and the same detections, on images of mixed sizes and aspect ratios (resized to the
shortest / longest edge, padded to the batch's largest)."""

import numpy as np
import pytest
import torch

from multiconcept.datasets.boxes import GroundingDinoDetector, ProcessorGroundingDinoDetector, load_detector
from multiconcept.datasets.on_ray import unit_batches
from multiconcept.datasets.sources import list_units
from multiconcept.datasets.toyworld import CAPTION_WORDS, NOUNS, write_toyworld_source
from multiconcept.models import quiet_loading
from multiconcept.models.tiny_annotators import save_tiny_grounding_dino


@pytest.fixture(scope="module")
def detectors(tmp_path_factory):
    root = tmp_path_factory.mktemp("boxes")
    with quiet_loading():
        folder = save_tiny_grounding_dino(root / "gdino", (*CAPTION_WORDS, *NOUNS))
    write_toyworld_source(root / "src", 4, seed=3)
    renders = [it.image() for it in next(unit_batches(list_units(root / "src")[0], 4))]
    # box threshold 0: every query is a detection, so every box, score and label is compared
    fast = load_detector(str(folder), box_threshold=0.0, text_threshold=0.5)
    ref = ProcessorGroundingDinoDetector(fast.model, fast.processor, fast.name, fast.box_threshold,
                                         fast.text_threshold, fast.nms_iou)
    return fast, ref, renders


def images_and_nouns(renders):
    rng = np.random.default_rng(3)
    # the test renders at other sizes: portrait, landscape, one past the longest edge, one already at size
    sized = [r.resize(s) for r, s in zip(renders, [(48, 80), (90, 40), (300, 200), (128, 128)])]
    nouns = [list(rng.choice(NOUNS, size=min(k, len(NOUNS)), replace=False)) for k in (1, 2, 3, 4)]
    # 31 one-token nouns with their dots, [CLS] and [SEP] fill the tiny model's 64 text positions: the last
    # position, which the processor never labels with, holds a token
    longest = list(rng.choice(NOUNS, size=31))
    return renders + sized, nouns + nouns[:3] + [longest]


def test_tensor_inputs_are_the_processors_to_the_bit(detectors):
    fast, ref, renders = detectors
    images, nouns = images_and_nouns(renders)
    ours, theirs = fast.inputs(images, nouns), ref.inputs(images, nouns)
    assert type(fast) is GroundingDinoDetector and fast.prepare.ok  # the tensor path ran, not the fallback
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    assert ours["pixel_mask"].float().mean() < 1  # mixed aspect ratios: some of the batch is padding


def test_tensor_post_processing_gives_the_processors_detections(detectors):
    fast, ref, renders = detectors
    images, nouns = images_and_nouns(renders)
    inputs = fast.inputs(images, nouns)
    outputs = fast.forward(inputs)
    ours, theirs = fast.post(outputs, inputs, images, nouns), ref.post(outputs, inputs, images, nouns)
    assert sum(len(r["boxes"]) for r in theirs) == len(images) * fast.model.config.num_queries
    assert len({label for r in theirs for label in r["labels"]}) > 1  # labels differ between queries
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
        assert list(a["labels"]) == list(b["labels"])
    # and so the stage's entities (after clamping and NMS) are the same
    assert fast(images, nouns) == ref(images, nouns)


def test_a_processor_this_path_does_not_reproduce_is_used_as_it_is(detectors, monkeypatch):
    from multiconcept.datasets.grounding import GroundingDinoInputs

    fast, ref, renders = detectors
    images, nouns = images_and_nouns(renders)
    monkeypatch.setattr(fast.processor.image_processor, "do_pad", False)
    prepare = GroundingDinoInputs(fast.processor)
    assert not prepare.ok
    theirs = ref.processor(images=images[:1], text=["star."], return_tensors="pt")
    assert torch.equal(prepare(images[:1], ["star."])["pixel_values"], theirs["pixel_values"])
