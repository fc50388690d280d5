"""Each published filter, alone, on crafted records: it drops exactly what it should and tallies it."""

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from multiconcept.datasets import filters as F
from multiconcept.datasets.filters import PROFILES, FilterSettings
from multiconcept.datasets.records import Entity, Item, pack, unpack
from multiconcept.errors import UserError

OFF = PROFILES["off"]


def item(w=100, h=100, caption="a dog and a cat on a sofa", nouns=(), entities=(), image=None):
    it = Item(key="k", unit="u", source="s", data=b"", caption=caption, nouns=list(nouns), entities=list(entities))
    it.size = (w, h)
    it._image = image if image is not None else Image.new("RGB", (w, h), (30, 60, 90))
    return it


def box_entity(label, box, score=0.9, w=100, h=100, fill=1.0):
    """An entity whose mask fills `fill` of its box (top rows first)."""
    mask = np.zeros((h, w), bool)
    x0, y0, x1, y1 = box
    rows = int(round((y1 - y0) * fill))
    mask[y0:y0 + rows, x0:x1] = True
    return Entity(label, tuple(float(v) for v in box), score, mask)


def only(**kw) -> FilterSettings:
    return replace(OFF, **kw)


def labels(it):
    return [e.label for e in it.entities]


def test_published_defaults_are_the_papers_numbers():
    s = FilterSettings()
    assert (s.min_long_side, s.max_white_share, s.min_nouns, s.max_nouns, s.min_detections, s.max_detections) == \
        (600, 0.10, 3, 8, 2, 8)
    assert (s.min_box_area, s.max_box_area, s.min_aspect, s.max_aspect, s.min_score) == (0.08, 0.7, 0.3, 3.0, 0.3)
    assert (s.label_in_caption, s.min_mask_fill, s.max_overlap, s.max_subjects) == (True, 0.6, 0.8, 2)


@pytest.mark.parametrize("w,h,kept", [(600, 300, True), (599, 599, False), (300, 800, True)])
def test_min_long_side(w, h, kept):
    it = item(w, h)
    F.after_decode(it, only(min_long_side=600))
    assert it.alive is kept
    assert it.tally["min_long_side"] == [1, 0 if kept else 1]


def test_max_white_share_counts_near_white_pixels_only():
    a = np.full((10, 10, 3), 200, np.uint8)
    a[:1] = 255  # 10% pure white: kept (the limit is "more than 10%")
    it = item(10, 10, image=Image.fromarray(a))
    F.after_decode(it, only(max_white_share=0.1))
    assert it.alive
    a[1, :5] = (250, 251, 252)  # 15% near-white
    a[2, :] = (255, 255, 249)  # not near-white: one channel below 250
    it = item(10, 10, image=Image.fromarray(a))
    F.after_decode(it, only(max_white_share=0.1))
    assert it.dropped_by == "max_white_share"


@pytest.mark.parametrize("n,dropped_by", [(2, "min_nouns"), (3, None), (8, None), (9, "max_nouns")])
def test_noun_count(n, dropped_by):
    it = item(nouns=[f"n{i}" for i in range(n)])
    F.after_nouns(it, only(min_nouns=3, max_nouns=8))
    assert it.dropped_by == dropped_by


@pytest.mark.parametrize("n,dropped_by", [(1, "min_detections"), (2, None), (9, "max_detections")])
def test_detection_count(n, dropped_by):
    it = item(entities=[box_entity("dog", (0, 0, 50, 50)) for _ in range(n)])
    F.after_boxes(it, only(min_detections=2, max_detections=8))
    assert it.dropped_by == dropped_by


def test_box_area_bounds_are_exclusive():
    # areas 8%, 9%, 70%, 60% of a 100x100 image
    ents = [box_entity("a", (0, 0, 8, 100)), box_entity("b", (0, 0, 9, 100)), box_entity("c", (0, 0, 70, 100)),
            box_entity("d", (0, 0, 60, 100))]
    it = item(entities=ents)
    F.after_boxes(it, only(min_box_area=0.08, max_box_area=0.7))
    assert labels(it) == ["b", "d"]
    assert it.tally["min_box_area"] == [4, 1] and it.tally["max_box_area"] == [3, 1]


def test_aspect():
    ents = [box_entity("wide", (0, 0, 90, 20)), box_entity("tall", (0, 0, 10, 40)), box_entity("ok", (0, 0, 40, 40))]
    it = item(entities=ents)
    F.after_boxes(it, only(min_aspect=0.3, max_aspect=3))
    assert labels(it) == ["ok"]


def test_score():
    it = item(entities=[box_entity("a", (0, 0, 40, 40), 0.3), box_entity("b", (0, 0, 40, 40), 0.31)])
    F.after_boxes(it, only(min_score=0.3))
    assert labels(it) == ["b"]


def test_label_in_caption_wants_one_caption_word():
    ents = [box_entity(lab, (0, 0, 40, 40)) for lab in ("dog", "Cat", "sofa bed", "horse", "do")]
    it = item(caption="A dog, and a cat on a sofa.", entities=ents)
    F.after_boxes(it, only(label_in_caption=True))
    assert labels(it) == ["dog", "Cat"]


def test_mask_fill():
    it = item(entities=[box_entity("half", (0, 0, 40, 40), fill=0.5), box_entity("full", (50, 50, 90, 90), fill=0.6)])
    F.after_masks(it, only(min_mask_fill=0.6))
    assert labels(it) == ["full"]


def test_overlap_drops_the_weaker_of_two_overlapping_boxes():
    inner = box_entity("inner", (10, 10, 30, 30), 0.5)  # entirely inside big: overlap 1.0 of the smaller
    big = box_entity("big", (0, 0, 60, 60), 0.9)
    side = box_entity("side", (50, 0, 90, 40), 0.4)  # overlaps big by 10x40 = 25% of its own 1600
    it = item(entities=[inner, big, side])
    F.after_masks(it, only(max_overlap=0.8))
    assert labels(it) == ["big", "side"]
    assert it.tally["max_overlap"] == [3, 1]


def test_max_subjects_keeps_the_strongest():
    ents = [box_entity(str(i), (0, 0, 40, 40), s) for i, s in enumerate((0.5, 0.9, 0.7))]
    it = item(entities=ents)
    F.after_masks(it, only(max_subjects=2))
    assert labels(it) == ["1", "2"]


def test_an_image_without_subjects_is_dropped_even_with_filters_off():
    it = item(entities=[])
    F.after_masks(it, OFF)
    assert it.dropped_by == "no_subjects"


def test_off_profile_keeps_everything_else():
    ents = [box_entity("zebra", (0, 0, 2, 90), 0.01, fill=0.1), box_entity("zebra", (0, 0, 2, 90), 0.01, fill=0.1)]
    it = item(10, 10, nouns=[], entities=ents)
    it.size = (100, 100)
    for step in (F.after_decode, F.after_nouns, F.after_boxes, F.after_masks):
        step(it, OFF)
    assert it.alive and len(it.entities) == 2


def test_overrides_from_the_command_line():
    s = FilterSettings.profile("published").with_overrides({"min_long_side": "512", "max_subjects": "off",
                                                            "min_score": "0.5", "label_in_caption": "false"})
    assert (s.min_long_side, s.max_subjects, s.min_score, s.label_in_caption) == (512, None, 0.5, False)
    with pytest.raises(UserError, match="no such filter"):
        s.with_overrides({"min_size": "3"})
    with pytest.raises(UserError, match="give a number"):
        s.with_overrides({"min_score": "high"})
    with pytest.raises(UserError, match="min_nouns=9 is above max_nouns=8"):
        s.with_overrides({"min_nouns": "9"})
    with pytest.raises(UserError, match="choose one of"):
        FilterSettings.profile("laion")


def test_items_cross_processes_as_bytes_unchanged():
    ents = [box_entity("dog", (3, 4, 50, 61), 0.75, w=64, h=80, fill=0.7), Entity("cat", (1.5, 2, 3, 4), 0.5)]
    it = item(64, 80, nouns=["dog", "cat"], entities=ents)
    it.data, it.tally, it.seconds, it.meta = b"\x89PNGxyz", {"min_score": [2, 0]}, {"caption": 0.25}, {"a": [1]}
    back = unpack(pack([it, item()]))[0]
    assert back.data == it.data and back.size == (64, 80) and back.tally == it.tally and back.meta == it.meta
    assert [(e.label, e.box, e.score) for e in back.entities] == [(e.label, e.box, e.score) for e in ents]
    assert np.array_equal(back.entities[0].mask, ents[0].mask) and back.entities[1].mask is None
