"""ToyWorld's creatures: parts drawn where the renderer says, read back by the checker, and scenes and
captions that pose the problems (same-kind pairs, overlaps, positions said in only part of the captions)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from multiconcept import toyworld as cw


def _read_right(scene, every_subject_found: bool = True) -> dict:
    """Per part, whether each visible part of the scene's subjects is read right (a subject not found
    counts as every part wrong where `every_subject_found` is not required)."""
    found = cw.analyse(scene.image).subjects
    right = {}
    for s in scene.subjects:
        near = [r for r in found if abs(r.cx - s.cx) <= 4 and abs(r.cy - s.cy) <= 4]
        assert len(near) <= 1 and (near or not every_subject_found), (s.to_dict(), [(r.cx, r.cy) for r in found])
        for part, visible in s.visible_parts().items():
            if visible:
                right.setdefault(part, []).append(bool(near) and near[0].parts[part] == getattr(s.creature, part))
        right.setdefault("kind", []).append(bool(near) and near[0].kind == s.creature.kind)
    return right


def test_the_checker_reads_every_part_of_every_layout():
    rng = np.random.default_rng(5)
    right: dict = {}
    layouts = []
    for _ in range(60):
        scene = cw.base_training_scene(rng)
        layouts.append(scene.layout)
        for part, hits in _read_right(scene).items():
            right.setdefault(part, []).extend(hits)
    assert set(layouts) == {"center", "pair", "overlap"}
    assert {p: np.mean(v) for p, v in right.items()} == {p: 1.0 for p in right}


def test_the_checker_reads_an_overlapping_same_kind_pair_that_differs_in_every_part():
    a, b = cw.concept("robot_a").creature, cw.concept("robot_b").creature
    assert cw.differ_in_every_part(a, b) and a.kind == b.kind
    for front_first in (False, True):
        specs = cw.layout_specs([a, b], "overlap", np.random.default_rng(0))
        specs = specs[::-1] if front_first else specs
        scene = cw.render(specs, "beige", "overlap")
        hidden = [s for s in scene.subjects if not all(s.visible_parts().values())]
        back = scene.subjects[0]
        assert back.masks["body"].sum() < back.full_masks["body"].sum()  # the first drawn is partly hidden
        assert all(all(v) for v in _read_right(scene).values()), hidden


def test_a_wrong_part_is_read_as_that_part():
    """The checker says what is drawn, not what was asked: change one part, the reading follows."""
    base = cw.concept("bird_b").creature
    for part, values in cw.PART_VALUES.items():
        for value in values:
            c = cw.Creature(**{**base.parts(), "kind": base.kind, part: value})
            scene = cw.render(cw.layout_specs([c], "center", np.random.default_rng(1)), "gray", "center")
            assert cw.analyse(scene.image).subjects[0].parts[part] == value


def test_a_blank_image_holds_no_subject_and_a_wrong_size_is_refused():
    assert cw.analyse(np.full((64, 64, 3), 128, np.uint8)).subjects == []
    # an untrained model's noise: without the checker's gates, 4x4-block colour noise read as ~33 subjects
    # an image, and matching them to the subject asked for found its parts by chance (identity 0.9)
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (64, 64, 3)).astype(np.uint8) for _ in range(10)]
    blocks = [np.kron(rng.integers(0, 256, (16, 16, 3)), np.ones((4, 4, 1))).astype(np.uint8) for _ in range(10)]
    assert sum(len(cw.analyse(x).subjects) for x in pixels + blocks) == 0
    with pytest.raises(ValueError, match="64x64"):
        cw.analyse(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="unknown hat"):
        cw.Creature("robot", "red", "cyan", "crown", "band", "white")


def test_personal_concepts_are_never_base_scenes_and_their_pairs_differ_in_every_part():
    personal = {p.creature for p in cw.PERSONAL_CONCEPTS.values()}
    assert len(personal) == len(cw.PERSONAL_CONCEPTS)
    assert not set(cw.PILOT_CONCEPTS) & set(cw.EVIDENCE_CONCEPTS)
    rng = np.random.default_rng(2)
    seen = [s.creature for _ in range(400) for s in cw.base_training_scene(rng).subjects]
    assert not personal & set(seen)
    # pilots and evidence each hold >= 8 units of both pair kinds: same-kind pairs (the tuning-free pilots)
    # and two-kind pairs (DisenDiff's sources) whose subjects differ in every part
    for group in (cw.PILOT_CONCEPTS, cw.EVIDENCE_CONCEPTS):
        pairs = [(cw.concept(a).creature, cw.concept(b).creature) for a, b in itertools.combinations(group, 2)]
        full = [(a, b) for a, b in pairs if cw.differ_in_every_part(a, b)]
        assert sum(a.kind == b.kind for a, b in full) >= 8 and sum(a.kind != b.kind for a, b in full) >= 8


def test_base_scenes_pose_the_problems_and_captions_never_name_the_unnamed_parts():
    rng = np.random.default_rng(3)
    scenes = [cw.base_training_scene(rng) for _ in range(600)]
    twos = [s for s in scenes if len(s.subjects) == 2]
    same = np.mean([s.subjects[0].creature.kind == s.subjects[1].creature.kind for s in twos])
    assert same >= 0.3
    assert 0.15 < np.mean([s.layout == "overlap" for s in scenes]) < 0.35
    said = np.mean([(" on the left" in s.caption or " in the center" in s.caption) for s in scenes])
    assert 0.4 < said < 0.6
    # (marking colours share their names with backgrounds: the base hears them only as backgrounds)
    unnamed = {v for p in cw.UNNAMED_PARTS for v in cw.PART_VALUES[p]} - set(cw.BACKGROUNDS) | {"head", "hat"}
    assert not unnamed & {w for s in scenes for w in s.caption.split()}
    assert all(s.caption.count(b) <= 1 for s in scenes for b in cw.BACKGROUNDS)
    # the most detailed caption says every subject's kind and body colour, left to right
    scene = next(s for s in twos if s.layout == "pair")
    left, right = sorted(scene.subjects, key=lambda s: s.cx)
    assert cw.caption(scene.to_dict()) == (f"{cw.article(left.creature.body_colour)} {left.creature.words()} on the left "
                                           f"and {cw.article(right.creature.body_colour)} {right.creature.words()} "
                                           f"on the right on {cw.article(scene.background)} {scene.background} background")


def test_the_world_pool_places_subjects_freely_and_names_every_part_for_the_clips():
    rng = np.random.default_rng(4)
    scenes = [cw.world_scene(rng) for _ in range(200)]
    free = [s for s in scenes if s.layout == "free"]
    assert len(free) > 30 and min(s.scale for f in free for s in f.subjects) < 0.8
    assert any(s.concept for f in scenes for s in f.subjects)
    c = scenes[0].subjects[0].creature
    assert all(getattr(c, p) in scenes[0].caption for p in cw.PARTS)
    right = {}
    for s in free:  # free placement may hide most of a head behind another subject: such a subject is unread
        for part, hits in _read_right(s, every_subject_found=False).items():
            right.setdefault(part, []).extend(hits)
    assert min(np.mean(v) for v in right.values()) >= 0.95


def test_swaps_and_blends_are_counted_against_the_best_assignment():
    a, b = cw.concept("robot_a").creature, cw.concept("robot_b").creature
    scene = cw.render(cw.layout_specs([b, a], "pair", np.random.default_rng(0)), "gray", "pair")  # places swapped
    out = cw.pair_outcomes(cw.analyse(scene.image).subjects, a, b)
    assert out == {"own": 1.0, "other": 0.0, "neither": 0.0, "unread": 0.0, "found": 2}
    # a subject that wears the other's hat and marking colour: 2 of 5 parts swapped on that subject
    mixed = cw.Creature(**{**a.parts(), "kind": a.kind, "hat": b.hat, "marking_colour": b.marking_colour})
    scene = cw.render(cw.layout_specs([mixed, b], "pair", np.random.default_rng(0)), "gray", "pair")
    out = cw.pair_outcomes(cw.analyse(scene.image).subjects, a, b)
    assert out["other"] == pytest.approx(0.2) and out["own"] == pytest.approx(0.8)
    # one subject missing: its parts are unread, and identity counts them as wrong
    scene = cw.render(cw.layout_specs([a], "center", np.random.default_rng(0)), "gray", "center")
    readings = cw.analyse(scene.image).subjects
    assert cw.pair_outcomes(readings, a, b)["found"] == 1 and cw.identity(readings[0], a) == 1.0
    assert cw.identity(None, a) == 0.0


def test_shares_count_only_parts_read_and_a_missing_subject_says_nothing():
    a, b = cw.concept("robot_a").creature, cw.concept("robot_b").creature
    mixed = cw.Creature(**{**a.to_dict(), "hat": b.hat, "marking_colour": b.marking_colour})
    scene = cw.render(cw.layout_specs([mixed, b], "pair", np.random.default_rng(0)), "gray", "pair")
    ra, rb = cw.match(cw.analyse(scene.image).subjects, [a, b])
    shares = cw.read_shares([ra, rb], [(a, b), (b, a)])
    assert shares["found"] == 2 and shares["own"] == pytest.approx(0.8) and shares["other"] == pytest.approx(0.2)
    assert shares["parts"]["hat"] == {"own": 0.5, "other": 0.5} and shares["parts"]["body_colour"]["own"] == 1.0
    # a subject not found is left out of the shares, not counted as wrong
    alone = cw.read_shares([ra, None], [(a, b), (b, a)])
    assert alone["found"] == 1 and alone["own"] == pytest.approx(0.6) and alone["other"] == pytest.approx(0.4)
    assert cw.read_shares([None, None], [(a, b), (b, a)])["own"] is None


def test_the_class_words_variety_is_a_distribution_per_part_and_its_shift_a_total_variation():
    robots = [cw.concept(n).creature for n in ("robot_a", "robot_b", "robot_c")]
    readings = [r for c in robots
                for r in cw.analyse(cw.render(cw.layout_specs([c], "center", np.random.default_rng(0)), "gray",
                                              "center").image).subjects]
    varied = cw.part_distribution(readings, "robot")
    assert varied["hat"] == {h: pytest.approx(1 / 3) for h in ("block", "cone", "horns")}
    one = cw.part_distribution(readings[:1], "robot")  # what a class word that draws one concept gives
    assert cw.total_variation(varied["hat"], one["hat"]) == pytest.approx(2 / 3)
    assert cw.total_variation(varied["hat"], varied["hat"]) == 0.0
    assert cw.part_distribution(readings, "bird")["hat"] == {} and cw.total_variation({}, one["hat"]) is None
    # a class word that stopped drawing its kind: every image counts as the value "absent"
    gone = cw.part_distribution([], "robot", absent=4)
    assert gone["hat"] == {cw.ABSENT: 1.0} and cw.total_variation(varied["hat"], gone["hat"]) == pytest.approx(1.0)
    half = cw.part_distribution(readings, "robot", absent=3)["hat"]
    assert half[cw.ABSENT] == pytest.approx(0.5) and cw.total_variation(varied["hat"], half) == pytest.approx(0.5)


def test_leakage_is_the_most_of_the_other_concept_on_any_subject_and_undefined_without_a_difference():
    a, b = cw.concept("robot_a").creature, cw.concept("bird_b").creature
    assert cw.differ_in_every_part(a, b)

    def read(*creatures, layout="pair"):
        return cw.analyse(cw.render(cw.layout_specs(list(creatures), layout, np.random.default_rng(0)), "gray",
                                    layout).image).subjects
    assert cw.leakage(read(a, layout="center"), [a], b) == 0.0
    assert cw.leakage(read(a, b), [a], b) == 1.0  # the other concept drawn whole beside it
    hat = cw.Creature(**{**a.to_dict(), "hat": b.hat})  # its hat on the asked subject: 1 of its 6 traits
    assert a.hat != b.hat and cw.leakage(read(hat, layout="center"), [a], b) == pytest.approx(1 / 6)
    assert cw.leakage([], [a], b) == 0.0
    assert cw.leakage(read(a, layout="center"), [a], a) is None  # nothing tells them apart: no guess
    # a trait the asked concept shares with the other says nothing and is left out
    twin = cw.Creature(**{**b.to_dict(), "hat": a.hat})
    assert cw.leakage(read(twin, layout="center"), [a], twin) == pytest.approx(1.0)
    assert cw.leakage(read(a, layout="center"), [a], twin) == 0.0


def test_each_reading_carries_its_subjects_pixels_and_none_of_its_neighbours():
    a, b = cw.concept("robot_a").creature, cw.concept("robot_b").creature  # a gray marking on a gray background
    for layout in ("pair", "overlap"):
        scene = cw.render(cw.layout_specs([a, b], layout, np.random.default_rng(2)), "gray", layout)
        readings = cw.analyse(scene.image).subjects
        for s in scene.subjects:
            r = min(readings, key=lambda r: abs(r.cx - s.cx))
            inter = (r.mask & s.mask).sum()
            # behind another subject, the part of its marking the front one cuts open is lost
            assert inter / r.mask.sum() > 0.95 and inter / s.mask.sum() > (0.8 if r.occluded else 0.95), (layout, s.position)


def test_the_methods_scenes_hold_their_concepts_and_say_no_part():
    scene = cw.two_concept_scene("robot_a", "bird_a", seed=3)
    assert [s.concept for s in scene.subjects] == ["robot_a", "bird_a"]
    assert scene.caption_parts["template"].format(a="<s1> robot", b="<s2> bird").startswith("a <s1> robot on the ")
    refs = cw.concept_reference_set("ghost_a", 3, seed=0)
    assert {r.subjects[0].creature for r in refs} == {cw.concept("ghost_a").creature}
    one_context = cw.concept_reference_set("ghost_a", 3, seed=0, background="white")
    assert {r.background for r in one_context} == {"white"} and all("white background" in r.caption for r in one_context)
    assert len(cw.two_kind_pairs(27)) == 27 and cw.two_kind_pairs(3) == cw.two_kind_pairs(8)[:3]
    rng = np.random.default_rng(1)
    parts = {v for p in cw.UNNAMED_PARTS for v in cw.PART_VALUES[p]} - set(cw.BACKGROUNDS)
    for _ in range(50):
        scene, order = cw.subject_scene(rng)
        words = scene.caption.split()
        assert not parts & set(words) and not set(cw.BODY_COLOURS) & set(words)
        kinds = [w for w in words if w in cw.KINDS]
        assert kinds == [scene.subjects[i].creature.kind for i in order]


def test_chance_is_judged_with_an_interval_that_a_small_or_lopsided_sample_fails():
    from multiconcept.workflows.toyworld_build.quality import chance_report

    even = chance_report(["cone", "block", "horns"] * 150 + [None] * 20, cw.HATS)
    assert even["n"] == 450 and even["at_chance"] and even["half_width_ok"]
    lopsided = chance_report(["cone"] * 300 + ["block"] * 100 + ["horns"] * 50, cw.HATS)
    assert not lopsided["at_chance"]  # cone drawn 0.67 of the time: above 1.5/k = 0.5
    few = chance_report(["cone", "block", "horns"] * 5, cw.HATS)
    assert few["at_chance"] and not few["half_width_ok"]
