"""ToyWorld's scenes and files: determinism, masks that are exactly what was drawn, the folders the methods read."""

import json

import numpy as np
import pytest
from PIL import Image

from multiconcept.toyworld import (
    BACKGROUNDS,
    BODY_COLOURS,
    HEAD_COLOURS,
    MARKING_COLOURS,
    base_training_scene,
    caption,
    concept,
    left_to_right,
    two_concept_scene,
    world_scene,
    write_concept_folder,
    write_two_concept_folder,
)


def test_same_seed_same_scene_and_different_seeds_differ():
    a = base_training_scene(np.random.default_rng(7))
    b = base_training_scene(np.random.default_rng(7))
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert a.to_dict() == b.to_dict()
    images = {base_training_scene(np.random.default_rng(s)).image.tobytes() for s in range(20)}
    assert len(images) == 20
    assert np.array_equal(two_concept_scene("robot_a", "bird_b", 3).image, two_concept_scene("robot_a", "bird_b", 3).image)


def test_visible_masks_are_disjoint_and_cover_exactly_what_was_drawn():
    rng = np.random.default_rng(0)
    for _ in range(100):
        scene = world_scene(rng)
        union = np.zeros((64, 64), dtype=int)
        for s in scene.subjects:
            assert s.mask.dtype == bool and s.mask.any() and tuple(s.box) == _box_of(s.mask)
            union += s.mask
        assert union.max() == 1
        assert (scene.image[union == 0] == BACKGROUNDS[scene.background]).all()


def _box_of(mask):
    ys, xs = np.nonzero(mask)
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_captions_say_the_body_colour_only_as_often_as_asked():
    scenes = [base_training_scene(np.random.default_rng(i)).to_dict() for i in range(300)]
    rng = np.random.default_rng(3)
    always = [caption(s, rng, colour_p=1.0) for s in scenes]
    sometimes = [caption(s, rng, colour_p=0.75) for s in scenes]
    said = lambda s, text: [f"{x['body_colour']} {x['kind']}" in text for x in s["subjects"]]  # noqa: E731
    assert all(all(said(s, c)) for s, c in zip(scenes, always))
    share = np.mean([x for s, c in zip(scenes, sometimes) for x in said(s, c)])
    assert 0.65 < share < 0.85, share
    assert all(all(x["kind"] in c for x in s["subjects"]) for s, c in zip(scenes, sometimes))


def test_a_concept_folder_holds_centred_renders_and_masks_of_exactly_its_pixels(tmp_path):
    c = concept("ghost_b").creature
    pairs = write_concept_folder("ghost_b", tmp_path / "c", n=3, seed=1)
    assert len(pairs) == 3
    palette = {BODY_COLOURS[c.body_colour], HEAD_COLOURS[c.head_colour], MARKING_COLOURS[c.marking_colour]}
    for image_path, mask_path in pairs:
        image, mask = np.asarray(Image.open(image_path)), np.asarray(Image.open(mask_path))
        assert image.shape == (64, 64, 3) and mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
        assert {tuple(int(v) for v in p) for p in np.unique(image[mask == 255], axis=0)} == palette
    scenes = json.loads((tmp_path / "c" / "scenes.json").read_text())
    assert [s["subjects"][0]["concept"] for s in scenes] == ["ghost_b"] * 3
    assert {s["subjects"][0]["position"] for s in scenes} == {"center"}


def test_a_two_concept_source_is_one_image_of_two_kinds_with_each_subjects_mask(tmp_path):
    scene = write_two_concept_folder("robot_a", "bird_b", tmp_path / "p", seed=2)
    truth = json.loads((tmp_path / "p" / "scene.json").read_text())
    assert [s["concept"] for s in truth["subjects"]] == ["robot_a", "bird_b"]
    assert truth["subjects"][0]["hat"] == concept("robot_a").creature.hat
    for s in scene.subjects:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "p" / f"{s.concept}_mask.png")) > 0, s.mask)
    left, right = left_to_right(truth["subjects"])
    assert left["position"] == "left" and right["position"] == "right"
    assert [s.position for s in left_to_right(scene.subjects)] == ["left", "right"]
    with pytest.raises(ValueError, match="two kinds.*both robots"):
        write_two_concept_folder("robot_a", "robot_b", tmp_path / "q")
    assert not (tmp_path / "q").exists()


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
