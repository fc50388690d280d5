"""Multi-subject fidelity (detect, match, compare): the matching rules on known
matrices, and `evaluate` on ToyWorld images whose right answers are known
(both subjects, one missing, one drawn twice), and with an OWLv2 detector."""

import numpy as np
import pytest
from test_evaluate import write_gen

from multiconcept.data import load_image
from multiconcept.metrics.fidelity import CONFUSED, MATCHED, MISSING, box_masks, match_subjects, summarise_matches
from multiconcept.models import quiet_loading
from multiconcept.models.tiny_annotators import save_tiny_owlv2
from multiconcept.models.tiny_evaluators import save_tiny_clip
from multiconcept.toyworld import concept, layout_specs, render
from multiconcept.workflows.evaluate import evaluate
from multiconcept.workflows.sources import write_toyworld_source

BOTH = "a <c1> robot and a <c2> bird"


def statuses(sim):
    return [(m.status, m.detection) for m in match_subjects(np.array(sim, dtype=float).reshape(-1, 2))]


def test_matching_is_one_to_one_and_order_free():
    assert statuses([[0.2, 0.9], [0.8, 0.1]]) == [(MATCHED, 1), (MATCHED, 0)]
    scores = match_subjects(np.array([[0.2, 0.9], [0.8, 0.1]]))
    assert [m.fidelity for m in scores] == [0.8, 0.9]


def test_a_subject_without_a_detection_is_missing_and_scores_zero():
    assert statuses([[0.9, 0.95]]) == [(MISSING, None), (MATCHED, 0)]  # the one object goes where it fits best
    assert statuses(np.zeros((0, 2))) == [(MISSING, None), (MISSING, None)]
    assert summarise_matches(match_subjects(np.array([[0.9, 0.95]]))) == {"fidelity": 0.475, "missing": 0.5,
                                                                          "confused": 0.0}


def test_a_detection_more_like_another_subject_is_confused():
    # two objects that both look like subject 1: subject 2 gets the second, which is still more like subject 1
    sim = [[0.8, 0.7], [0.75, 0.72]]
    assert statuses(sim) == [(MATCHED, 0), (CONFUSED, 1)]
    assert match_subjects(np.array(sim))[1].fidelity == 0.0


def test_box_masks_clip_to_the_image():
    (m,) = box_masks((10, 8), [(-3.0, 2.2, 4.5, 20.0)])
    assert m.shape == (8, 10) and m[2:, :5].all() and m.sum() == 6 * 5
    assert box_masks((10, 8), [(5, 5, 5, 9)]) == []  # an empty box is no detection


def scene(*names):
    layout = "center" if len(names) == 1 else "pair"
    specs = layout_specs([concept(n).creature for n in names], layout, np.random.default_rng(3), list(names))
    return render(specs, "gray", layout).pil()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return str(save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", image_size=32))


@pytest.fixture
def source(tmp_path):
    return write_toyworld_source("robot_a", "bird_b", tmp_path / "source", seed=1)


def test_toyworld_images_are_scored_by_their_detected_subjects(source, clip, tmp_path):
    gen = tmp_path / "gen"
    write_gen(gen / "a.png", load_image(source.image), BOTH)  # the source itself: both subjects, each where it was
    write_gen(gen / "b.png", scene("robot_a"), BOTH)  # the bird is missing
    write_gen(gen / "c.png", scene("robot_a", "robot_a"), BOTH)  # the robot twice, no bird
    write_gen(gen / "d.png", scene("robot_a"), "a <c1> robot")  # one subject: no fidelity
    result = evaluate(gen, [str(source.folder)], clip=clip)
    r = {x["file"]: x for x in result["images"]}
    assert r["a.png"]["fidelity_missing"] == 0 and r["a.png"]["fidelity_confused"] == 0
    assert r["a.png"]["fidelity_clip_i"] > 0.95  # each detection is its subject's own crop
    assert r["b.png"]["fidelity_missing"] == 0.5 and r["b.png"]["fidelity_clip_i"] < 0.5
    assert r["c.png"]["fidelity_confused"] == 0.5 and r["c.png"]["fidelity_missing"] == 0
    assert "fidelity_clip_i" not in r["d.png"]
    combined = result["summary"]["combined"]
    assert combined["fidelity_clip_i"] == pytest.approx(np.mean([r[f]["fidelity_clip_i"] for f in ("a.png", "b.png", "c.png")]))


def test_photos_are_detected_by_an_open_vocabulary_detector(source, clip, tmp_path):
    with quiet_loading():
        owl = save_tiny_owlv2(tmp_path / "owl")
    gen = tmp_path / "gen"
    write_gen(gen / "a.png", load_image(source.image), BOTH)
    # a random OWLv2 scores everything low; threshold 0 keeps its boxes, so the path runs end to end
    result = evaluate(gen, [str(source.folder)], clip=clip, detector=str(owl), detector_threshold=0.0)
    (rec,) = result["images"]
    assert 0 <= rec["fidelity_clip_i"] <= 1 and rec["fidelity_missing"] + rec["fidelity_confused"] <= 1
    assert result["models"]["detector"] == str(owl)
