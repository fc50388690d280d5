"""ToyWorld renderer and checker: determinism, exact ground truth, held-out concepts."""

import json

import numpy as np
import pytest
from PIL import Image

from multiconcept.toyworld import (
    COLOURS,
    PERSONAL_CONCEPTS,
    Appearance,
    ObjectSpec,
    analyse,
    base_training_scene,
    check,
    concept_reference_set,
    describe,
    is_personal,
    render_scene,
    subject_dataset,
    two_concept_scene,
    world_scene,
    write_concept_folder,
    write_two_concept_folder,
)
from multiconcept.toyworld.check import checker_accuracy
from multiconcept.toyworld.render import BASE_PATTERNS, HELD_OUT_PATTERNS, SHADE, LayoutError


def _box_of(mask):
    ys, xs = np.nonzero(mask)
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_same_seed_same_scene_and_different_seeds_differ():
    a = base_training_scene(np.random.default_rng(7))
    b = base_training_scene(np.random.default_rng(7))
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert a.to_dict() == b.to_dict()
    images = {base_training_scene(np.random.default_rng(s)).image.tobytes() for s in range(20)}
    assert len(images) == 20
    assert np.array_equal(two_concept_scene("checkered_star", "dotted_heart", 3).image,
                          two_concept_scene("checkered_star", "dotted_heart", 3).image)


def test_masks_are_nonempty_disjoint_match_boxes_and_pixels():
    rng = np.random.default_rng(0)
    for _ in range(100):
        scene = world_scene(rng)
        assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
        union = np.zeros((64, 64), dtype=int)
        for o in scene.objects:
            assert o.mask.dtype == bool and o.mask.any()
            assert tuple(o.box) == _box_of(o.mask)
            union += o.mask
        assert union.max() == 1
        # every pixel outside the masks is background: the masks cover exactly what was drawn
        bg = np.asarray(scene.image[union == 0], dtype=int)
        ref = np.median(bg, axis=0)
        assert np.abs(bg - ref).max() <= 21  # the gradient texture spans ±10


def test_captions_name_every_object_class_and_colour():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = base_training_scene(rng)
        for o in scene.objects:
            assert o.noun in scene.caption and o.colour in scene.caption, scene.caption
    scene = render_scene([ObjectSpec("star", Appearance("red", "striped"), "small", "left"),
                          ObjectSpec("circle", Appearance("blue"), "large", "right")], "gray")
    assert scene.caption == "a small red striped star on the left and a large blue circle on the right on a gray background"


def test_base_training_scenes_never_contain_personal_concepts():
    rng = np.random.default_rng(2)
    # ~1500 objects: the held-out yellow striped heart alone would be expected ~13 times
    for _ in range(800):
        for o in base_training_scene(rng).objects:
            assert not is_personal(o.noun, o.appearance), o.to_dict()
            assert o.appearance.pattern not in HELD_OUT_PATTERNS and o.concept is None
    # ... while the world sampler (VAE, evaluator) does show them
    seen = {o.concept for _ in range(300) for o in world_scene(rng).objects}
    assert set(PERSONAL_CONCEPTS) <= seen


def test_personal_concepts_are_distinct_and_valid():
    assert len(PERSONAL_CONCEPTS) >= 6
    specs = {(c.noun, c.appearance) for c in PERSONAL_CONCEPTS.values()}
    assert len(specs) == len(PERSONAL_CONCEPTS)
    assert all(is_personal(c.noun, c.appearance) for c in PERSONAL_CONCEPTS.values())


def test_two_concept_scene_and_reference_set():
    scene = two_concept_scene("twotone_circle", "checkered_star", seed=4)
    a, b = scene.objects
    assert (a.concept, b.concept) == ("twotone_circle", "checkered_star")
    assert not (a.mask & b.mask).any()
    assert scene.caption_parts["template"].format(a="circle", b="star").startswith("a circle")
    # the two-tone concept really shows two colours, the checkered one its colour and shade
    assert len(np.unique(scene.image[a.mask], axis=0)) == 2
    assert len(np.unique(scene.image[b.mask], axis=0)) == 2
    refs = concept_reference_set("dotted_heart", 5, seed=0, layout="free")
    assert len(refs) == 5 and len({r.objects[0].position for r in refs}) == 5
    refs = concept_reference_set("dotted_heart", 8, seed=0)  # the base's layout, varied backgrounds
    assert {(r.objects[0].position, r.objects[0].size) for r in refs} == {("center", "large")}
    assert len({r.background for r in refs}) > 1
    assert all(r.objects[0].concept == "dotted_heart" for r in refs)
    with pytest.raises(ValueError, match="unknown concept"):
        concept_reference_set("no_such_thing", 2, 0)


def test_impossible_layout_is_an_error():
    big = Appearance("red")
    with pytest.raises(LayoutError):
        render_scene([ObjectSpec("square", big, "large", "center"),
                      ObjectSpec("circle", big, "large", "left")])


def test_subject_dataset_records():
    records = subject_dataset(20, seed=0)
    for r in records:
        labels = [s.label for s in r.subjects]
        assert len(labels) == len(set(labels))
        for s in r.subjects:
            assert s.label in r.caption
            x0, y0, x1, y1 = s.box
            assert s.crop.shape == (y1 - y0, x1 - x0, 3)
            assert (s.crop[~s.mask[y0:y1, x0:x1]] == 255).all()
    fixed = subject_dataset(40, seed=0, layout="fixed")
    assert {len(r.subjects) for r in fixed} == {1, 2}
    for r in fixed:
        if len(r.subjects) == 2:
            assert r.subjects[0].label != r.subjects[1].label and r.subjects[0].box[2] < r.subjects[1].box[0]


def test_subject_captions_without_appearance_name_only_nouns_and_places():
    # FastComposer's training captions: the crops carry colour and pattern, the caption must not
    full = subject_dataset(30, seed=3, layout="fixed")
    bare = subject_dataset(30, seed=3, layout="fixed", appearance=False)
    looks = set(COLOURS) | set(BASE_PATTERNS + HELD_OUT_PATTERNS)
    assert any(looks & set(r.caption.split()) for r in full)
    for f, b in zip(full, bare):
        assert [s.label for s in f.subjects] == [s.label for s in b.subjects]
        assert (f.image == b.image).all()
        words = set(b.caption.split())
        assert all(s.label in words for s in b.subjects)
        # the background's colour word is said after "on a"; no object's colour or pattern is
        objects_part = b.caption.rsplit(" on a", 1)[0] if b.caption.endswith("background") else b.caption
        assert not (looks & set(objects_part.split())), b.caption


def test_written_folders_hold_images_and_matching_masks(tmp_path):
    pairs = write_concept_folder("checkered_square", tmp_path / "c", n=3, seed=1)
    assert len(pairs) == 3
    for image_path, mask_path in pairs:
        image, mask = np.asarray(Image.open(image_path)), np.asarray(Image.open(mask_path))
        assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
        assert set(np.unique(mask)) == {0, 255}
        # the masked pixels are exactly the concept's green and its shade
        green = np.array(COLOURS["green"])
        found = {tuple(c) for c in np.unique(image[mask == 255], axis=0)}
        assert found == {tuple(green), tuple(np.rint(green * SHADE).astype(int))}
    assert len(json.loads((tmp_path / "c" / "scenes.json").read_text())) == 3
    scene = write_two_concept_folder("dotted_cross", "twotone_ring", tmp_path / "p", seed=2)
    for o in scene.objects:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "p" / f"{o.concept}_mask.png")) > 0, o.mask)


def test_checker_recognises_renders():
    acc = checker_accuracy(n_scenes=80, seed=3)
    assert acc["colour"] >= 0.98 and acc["shape"] >= 0.95 and acc["background"] >= 0.98
    scene = render_scene([ObjectSpec("heart", Appearance("pink"), "large", "center")], "black")
    assert check(scene.image, "heart", "pink")["match"] and check(scene.image, "heart", "pink")["largest_is_class"]
    miss = check(scene.image, "star", "blue")
    assert not miss["class_present"] and not miss["colour_present"] and not miss["largest_is_class"]
    two = render_scene([ObjectSpec("heart", Appearance("pink"), "large", "left"),
                        ObjectSpec("star", Appearance("blue"), "small", "right")], "black")
    assert check(two.image, "star", "blue")["class_present"] and not check(two.image, "star", "blue")["largest_is_class"]


def test_checker_sees_nothing_in_a_blank_image():
    blank = np.full((64, 64, 3), 128, dtype=np.uint8)
    a = analyse(blank)
    assert a.background == "gray" and a.objects == []
    with pytest.raises(ValueError, match="64x64"):
        analyse(np.zeros((32, 32, 3), dtype=np.uint8))


# ---- build helpers (cheap: tiny models, no training)

def test_latent_normalisation_keeps_the_autoencoder_and_whitens_latents():
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL

    from multiconcept.workflows.toyworld_build.vae import latent_stats as _latent_stats
    from multiconcept.workflows.toyworld_build.vae import normalise_latents

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4).eval()
    images = np.stack([world_scene(np.random.default_rng(i)).image for i in range(16)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        before = vae.decode(vae.encode(x).latent_dist.mean).sample
        mean, std = _latent_stats(vae, images)
        assert (std - 1).abs().max() > 0.05  # the test means something only if stats are off first
        normalise_latents(vae, mean, std)
        after = vae.decode(vae.encode(x).latent_dist.mean).sample
        mean2, std2 = _latent_stats(vae, images)
    assert torch.allclose(before, after, atol=1e-4)
    assert mean2.abs().max() < 1e-3 and (std2 - 1).abs().max() < 1e-3


def test_checkpoint_round_trip_restores_weights_and_optimizer(tmp_path):
    torch = pytest.importorskip("torch")
    from multiconcept.training.checkpoint import load_checkpoint, save_checkpoint
    from multiconcept.workflows.toyworld_build.common import StageJob

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    ema = {"w": torch.full((2,), 5.0)}
    job = StageJob(None, {"m": model, "ema": ema})
    save_checkpoint(tmp_path / "c.safetensors", job.state(), opt, step=7, digest="d", seconds=1.5, extra={"monitor": [1]})
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    ema2 = {"w": torch.zeros(2)}
    tensors, info = load_checkpoint(tmp_path / "c.safetensors", opt2, "d")
    StageJob(None, {"m": model2, "ema": ema2}).load_state(tensors)
    assert info == {"step": 7, "seconds": 1.5, "extra": {"monitor": [1]}}
    assert torch.equal(model.weight, model2.weight) and torch.equal(ema2["w"], ema["w"])
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])


def test_fixed_layout_is_one_centred_object_or_a_left_right_pair():
    rng = np.random.default_rng(5)
    layouts = set()
    for _ in range(200):
        scene = base_training_scene(rng, layout="fixed")
        layouts.add(tuple((o.size, o.position) for o in scene.objects))
        for o in scene.objects:
            assert o.concept is None and o.noun in scene.caption and o.colour in scene.caption
        if len(scene.objects) == 2:  # the left object is drawn left of the right one
            assert scene.objects[0].box[2] < scene.objects[1].box[0]
    assert layouts == {(("large", "center"),), (("large", "left"), ("large", "right"))}
    with pytest.raises(ValueError, match="unknown layout"):
        base_training_scene(rng, layout="grid")


def test_captions_leave_colours_out_only_when_asked():
    def captions(colour_p):
        rng = np.random.default_rng(3)
        scenes = [base_training_scene(np.random.default_rng(i), layout="fixed") for i in range(300)]
        return scenes, [describe(s.objects, s.background, rng, colour_p=colour_p) for s in scenes]

    scenes, always = captions(1.0)
    _, sometimes = captions(0.75)
    said = lambda scene, text: [o.colour in text for o in scene.objects]  # noqa: E731
    assert all(all(said(s, c)) for s, c in zip(scenes, always))
    shares = np.mean([x for s, c in zip(scenes, sometimes) for x in said(s, c)])
    assert 0.65 < shares < 0.85, shares
    assert all(all(o.noun in c for o in s.objects) for s, c in zip(scenes, sometimes))
    star = render_scene([ObjectSpec("star", Appearance("red", "striped"))], "gray").objects[0]
    assert star.phrase(size=False, position=False, colour=False) == "a striped star"
    assert star.phrase(size=False, position=False, pattern=False, colour=False) == "a star"
