"""The builder end to end with tiny random-weight BLIP, Grounding DINO and SAM built from their configs:
locally and on a local Ray (one Ray start for the module), same shards from both."""

import json
import tarfile

import pyarrow.parquet as pq
import pytest

from multiconcept.datasets.filters import PROFILES
from multiconcept.datasets.pipeline import StageSpec
from multiconcept.datasets.shards import read_shards
from multiconcept.datasets.toyworld import CAPTION_WORDS, NOUNS, write_toyworld_source
from multiconcept.errors import UserError
from multiconcept.models.tiny_annotators import save_tiny_models
from multiconcept.workflows.dataset import BuildSettings, build

N = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset-models")
    models = save_tiny_models(root / "models", CAPTION_WORDS, NOUNS)
    write_toyworld_source(root / "src", N, seed=5, per_shard=6)
    return root, models


def spec(models, **kw):
    return StageSpec(filters=PROFILES["off"], device="cpu", **{**models, **kw})


def shard_contents(out):
    """Every member of every shard, by name, as bytes (masks, json, images, captions)."""
    contents = {}
    for p in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                contents[f"{p.name}/{m.name}"] = tf.extractfile(m).read()
    return contents


@pytest.fixture(scope="module")
def local_build(tiny):
    root, models = tiny
    report = build(root / "src", root / "local", BuildSettings(stages=spec(models), batch_size=4, threads=1))
    return root / "local", report


def test_tiny_models_run_every_stage_and_write_records(local_build):
    out, report = local_build
    assert report["images"]["in"] == N and report["images"]["rejected"] == 0
    samples = list(read_shards(out))
    # random weights: what they find is arbitrary, but every kept record has what training reads
    assert len(samples) == report["images"]["kept"] > 0
    n_entities = sum(len(s.entities) for s in samples)
    assert n_entities == report["entities_kept"] > 0
    for s in samples:
        w, h = s.image().size
        assert s.caption
        for e in s.entities:
            assert e.mask.shape == (h, w) and e.mask.dtype == bool
            assert 0 <= e.box[0] <= e.box[2] <= w and 0 <= e.box[1] <= e.box[3] <= h
            assert 0.25 < e.score <= 1  # Grounding DINO's box threshold
    assert len(pq.read_table(out / "index.parquet")) == n_entities
    assert set(report["stages"]) == {"decode", "caption", "nouns", "boxes", "masks"}
    assert all(v["images_per_s"] > 0 for v in report["stages"].values())


def test_ray_gives_the_same_shards_as_the_local_path(tiny, local_build):
    pytest.importorskip("ray.data")
    root, models = tiny
    # the builder starts a local Ray (and stops it): 2 actors, each loading the three models once
    report = build(root / "src", root / "ray", BuildSettings(stages=spec(models), batch_size=4, threads=1,
                                                             ray=True, ray_workers=2, ray_cpus=1))
    local_out, local_report = local_build
    assert report["images"] == local_report["images"] and report["filters"] == local_report["filters"]
    assert shard_contents(root / "ray") == shard_contents(local_out)
    assert pq.read_table(root / "ray" / "index.parquet").equals(pq.read_table(local_out / "index.parquet"))


def test_checkpoints_of_the_wrong_kind_are_refused_in_one_line(tiny, tmp_path):
    root, models = tiny
    from multiconcept.datasets.captions import load_captioner
    from multiconcept.datasets.masks import load_segmenter
    from multiconcept.datasets.nouns import load_nouns

    with pytest.raises(UserError, match="is a 'sam' checkpoint: pass a BLIP, BLIP-2 or Florence-2"):
        load_captioner(models["segmenter"])
    sam2 = tmp_path / "sam2"
    sam2.mkdir()
    (sam2 / "config.json").write_text(json.dumps({"model_type": "sam2"}))
    with pytest.raises(UserError, match="SAM 2.*needs torchvision"):
        load_segmenter(str(sam2))
    with pytest.raises(UserError, match="grounds phrases"):
        load_nouns("grounding", load_captioner(models["captioner"]))
    with pytest.raises(UserError, match="--nouns vocab:FILE"):
        try:
            import spacy  # noqa: F401
        except ImportError:
            load_nouns("spacy")
        else:
            load_nouns("spacy:no_such_model_xyz")


def test_vocabulary_nouns_match_plurals_in_caption_order(tmp_path):
    from multiconcept.datasets.nouns import load_nouns

    vocab = tmp_path / "v.txt"
    vocab.write_text("dog\nbox\ncat\n")
    assert load_nouns(f"vocab:{vocab}")(["Two dogs, a cat and boxes; a dog."]) == [["dogs", "cat", "boxes", "dog"]]


def test_nms_keeps_the_best_of_overlapping_boxes():
    import torch

    from multiconcept.datasets.boxes import nms

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 5.]])
    scores = torch.tensor([0.5, 0.9, 0.4, 0.3])
    # box 1 overlaps box 0 at IoU 0.81, box 3 overlaps box 0 at 0.5 (not above) and box 1 at 0.4
    assert sorted(nms(boxes, scores, 0.5)) == [1, 2, 3]


def test_blip2_captioner_and_owlv2_detector_swap_in(tiny, tmp_path):
    """The stages are chosen by the checkpoint: BLIP-2 for BLIP, OWLv2 for Grounding DINO, same pipeline."""
    from multiconcept.datasets.on_ray import unit_batches
    from multiconcept.datasets.pipeline import Pipeline
    from multiconcept.datasets.sources import list_units
    from multiconcept.models import quiet_loading
    from multiconcept.models.tiny_annotators import save_tiny_blip2, save_tiny_owlv2

    root, models = tiny
    with quiet_loading():
        blip2, owl = save_tiny_blip2(tmp_path / "blip2"), save_tiny_owlv2(tmp_path / "owl")
    # the tiny BLIP-2 speaks the CLIP-format test vocabulary, not ToyWorld's nouns: take the source's captions
    pipe = Pipeline(spec(models, captioner="source", detector=str(owl), box_threshold=0.0))
    batch = next(unit_batches(list_units(root / "src")[0], 4))
    pipe.process(batch)
    kept = [it for it in batch if it.alive]
    assert kept and all(it.reject is None for it in batch)
    for it in kept:
        assert all(e.label in it.nouns for e in it.entities)  # OWLv2's hits map back to the queried nouns
        assert all(e.mask is not None and e.mask.shape == it.image().size[::-1] for e in it.entities)
    with_blip2 = Pipeline(spec(models, captioner=str(blip2)))
    assert type(with_blip2.captioner).__name__ == "Blip2Captioner"
    captions = with_blip2.caption(batch)
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)


def test_a_detection_that_is_not_finite_makes_its_image_a_reject(tiny):
    """Detectors run in fp16 can give NaN boxes: such an image is rejected with the reason, never written."""
    import torch

    from multiconcept.datasets.on_ray import unit_batches
    from multiconcept.datasets.pipeline import Pipeline
    from multiconcept.datasets.sources import list_units

    root, models = tiny
    pipe = Pipeline(spec(models, box_threshold=0.0))
    batch = next(unit_batches(list_units(root / "src")[0], 4))
    poisoned = batch[1].image()
    real = pipe.detector.post

    def post(outputs, inputs, images, nouns):
        results = real(outputs, inputs, images, nouns)
        for r, im in zip(results, images):
            if im is poisoned:
                r["boxes"] = torch.full_like(r["boxes"], float("nan"))
        return results

    pipe.detector.post = post
    pipe.process(batch)
    assert batch[1].reject.startswith("boxes: ValueError: the detector gave a box or score that is not finite")
    assert all(it.reject is None and it.entities for i, it in enumerate(batch) if i != 1)
