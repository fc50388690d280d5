"""Metrics: preprocessing parity with transformers, CLIP-T/CLIP-I/DINO against
the models' own forward, scales, ToyWorld leakage, and an evaluator that
really ranks captions (the shipped one, and a tiny one trained here)."""


import numpy as np
import pytest
import torch
from PIL import Image

from multiconcept.errors import UserError
from multiconcept.metrics import (
    clip_text,
    load_clip,
    load_dino,
    mean_pairwise_cosine,
    scaled,
    toyworld_evaluator_available,
    toyworld_measures,
)
from multiconcept.metrics.clip import TOYWORLD_EVALUATOR
from multiconcept.metrics.preprocess import dino_recipe, from_config
from multiconcept.models.tiny_evaluators import save_tiny_clip, save_tiny_vit
from multiconcept.toyworld import Creature, concept, layout_specs, random_creature, render


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return save_tiny_vit(tmp_path_factory.mktemp("vit"))


def random_image(h, w, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def test_preprocessing_matches_transformers_clip_image_processor():
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4: the PIL implementation is the default class
        from transformers import CLIPImageProcessor as Processor
    hf = Processor(size={"shortest_edge": 48}, crop_size={"height": 40, "width": 40}, image_mean=[0.5, 0.4, 0.3],
                   image_std=[0.2, 0.25, 0.3])
    ours = from_config(hf.to_dict(), 40)
    for i, (h, w) in enumerate([(40, 60), (77, 33), (48, 48), (100, 120)]):
        im = random_image(h, w, i)
        ref = hf(images=[im], return_tensors="np")["pixel_values"][0]
        got = ours([im])[0].numpy()
        assert got.shape == ref.shape == (3, 40, 40)
        assert np.abs(got - ref).max() < 1e-5


def test_dino_recipe_is_resize_256_crop_224_imagenet():
    r = dino_recipe(224)
    assert (r.shortest_edge, r.crop) == (256, (224, 224))
    assert r.mean == (0.485, 0.456, 0.406) and r.std == (0.229, 0.224, 0.225)
    assert dino_recipe(518).crop == (224, 224)  # DINOv2 checkpoints: the protocol's 224, not the config's size
    assert dino_recipe(32).crop == (32, 32) and dino_recipe(32).shortest_edge == 37  # same ratio for tiny models


def test_image_against_itself_scores_clip_i_one(clip_dir):
    scorer = load_clip(str(clip_dir))
    im = random_image(32, 32)
    e = scorer.image_embeddings([im])
    assert mean_pairwise_cosine(e, e) == pytest.approx(1.0, abs=1e-5)
    other = scorer.image_embeddings([random_image(32, 32, seed=5)])
    assert mean_pairwise_cosine(e, other) < 0.999


def test_clip_scores_equal_the_models_own_forward_and_do_not_depend_on_batching(clip_dir):
    from transformers import CLIPModel

    scorer = load_clip(str(clip_dir), batch_size=2)
    images = [random_image(32, 32, s) for s in range(5)]
    texts = ["a red circle", "photo of a cat", "a blue star on a black background", "a dog", "a red circle"]
    img = scorer.image_embeddings(images)
    txt = scorer.text_embeddings(texts)
    scorer_big = load_clip(str(clip_dir), batch_size=64)
    assert torch.allclose(img, scorer_big.image_embeddings(images), atol=1e-5)
    assert torch.allclose(txt, scorer_big.text_embeddings(texts), atol=1e-5)
    # the reference: CLIPModel's forward, logits = logit_scale * cosine
    model = CLIPModel.from_pretrained(clip_dir).eval()
    enc = scorer.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=scorer.preprocess(images))
    expected = out.logits_per_image / model.logit_scale.exp()
    assert torch.allclose(img @ txt.T, expected, atol=1e-5)


def test_the_image_recipe_is_read_from_a_saved_processor(tmp_path):
    """The ToyWorld evaluator is saved with CLIPProcessor.save_pretrained: its [-1, 1]
    normalisation must be used, whichever file transformers put it in."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from multiconcept.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    folder = save_tiny_clip(tmp_path / "clip", image_size=64, tokenizer=tok)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                                     image_mean=[0.5] * 3, image_std=[0.5] * 3),
                  tokenizer=tok).save_pretrained(folder)
    prep = load_clip(str(folder)).preprocess
    assert prep.mean == (0.5, 0.5, 0.5) and prep.std == (0.5, 0.5, 0.5) and prep.crop == (64, 64)


def test_clip_text_strips_tokens_keeps_class_words():
    assert clip_text("photo of a <c1> cat and <c2> dog", ["<c1>", "<c2>"]) == "photo of a cat and dog"
    assert clip_text("a <c1> star", ["<c1>"], "A photo depicts ") == "A photo depicts a star"


def test_scales():
    assert scaled(0.3, "raw") == pytest.approx(0.3)
    assert scaled(0.3, "clipscore") == pytest.approx(0.75)
    assert scaled(-0.2, "clipscore") == 0.0
    assert scaled(0.3, "100") == pytest.approx(30.0)
    with pytest.raises(UserError, match="unknown scale 'huge'"):
        scaled(0.3, "huge")


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_dino_is_the_cls_feature_of_the_models_forward(tmp_path, kind):
    from transformers import AutoModel

    folder = save_tiny_vit(tmp_path / kind, kind=kind)
    scorer = load_dino(str(folder))
    images = [random_image(40, 50, s) for s in range(3)]
    emb = scorer.image_embeddings(images)
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        cls = model(pixel_values=scorer.preprocess(images)).last_hidden_state[:, 0]
    assert torch.allclose(emb, torch.nn.functional.normalize(cls, dim=-1), atol=1e-5)
    assert mean_pairwise_cosine(emb[:1], emb[:1]) == pytest.approx(1.0, abs=1e-5)


def test_loading_errors_name_the_problem(tmp_path, clip_dir, vit_dir, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        load_clip(str(tmp_path / "nothing" / "here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_clip(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="not CLIP"):
        load_clip(str(vit_dir))
    with pytest.raises(UserError, match="ViT/DINO"):
        load_dino(str(clip_dir))
    import multiconcept.metrics.clip as clip_module

    monkeypatch.setattr(clip_module, "TOYWORLD_EVALUATOR", tmp_path / "no-evaluator")  # an install without it
    with pytest.raises(UserError, match="--clip"):
        load_clip(None)


# ---------------------------------------------------------------- ToyWorld leakage

def scene_of(*creatures, background="gray"):
    layout = "center" if len(creatures) == 1 else "pair"
    return render(layout_specs(list(creatures), layout, np.random.default_rng(0)), background, layout).pil()


def test_toyworld_leakage_sees_the_other_concepts_parts_and_only_them():
    robot, bird = concept("robot_a").creature, concept("bird_b").creature  # they differ in kind and every part
    alone = toyworld_measures(scene_of(robot), [robot], [bird])
    assert alone["present"] is True and alone["identity"] == 1.0 and alone["leak"] == 0.0
    assert alone["subjects"] == [robot.to_dict()]
    both = toyworld_measures(scene_of(robot, bird), [robot], [bird])
    assert both["present"] is True and both["leak"] == 1.0  # the other concept drawn whole beside it
    wrong = toyworld_measures(scene_of(bird), [robot], [bird])
    assert wrong["present"] is False and wrong["identity"] == 0.0 and wrong["leak"] == 1.0
    # the prompted robot wearing the bird's hat and head: 2 of the 6 traits that tell them apart
    mixed = Creature(**{**robot.to_dict(), "hat": bird.hat, "head_colour": bird.head_colour})
    m = toyworld_measures(scene_of(mixed), [robot], [bird])
    assert m["leak"] == pytest.approx(2 / 6) and m["identity"] == pytest.approx(3 / 5)
    # a 32-px generation is read at the checker's 64 px
    small = scene_of(robot, bird).resize((32, 32), Image.BOX)
    assert toyworld_measures(small, [robot], [bird])["leak"] == 1.0


def test_toyworld_leakage_is_undefined_when_nothing_tells_the_concepts_apart():
    robot = concept("robot_a").creature
    m = toyworld_measures(scene_of(robot), [robot], [robot])
    assert m["leak"] is None and m["present"] is True
    assert toyworld_measures(scene_of(robot), [], [robot])["present"] is None


# ---------------------------------------------------------------- an evaluator that ranks captions

def red_robot():
    return scene_of(Creature(**{**random_creature(np.random.default_rng(7), kind="robot").to_dict(), "body_colour": "red"}))


@pytest.mark.skipif(not toyworld_evaluator_available(),
                    reason=f"the ToyWorld evaluator is not built yet ({TOYWORLD_EVALUATOR} is missing)")
def test_toyworld_evaluator_prefers_the_right_caption():
    scorer = load_clip(None)
    img = scorer.image_embeddings([red_robot()])
    txt = scorer.text_embeddings(["a red robot in the center on a gray background", "a blue bird"])
    own, wrong = (img @ txt.T)[0].tolist()
    assert own > wrong


@pytest.fixture(scope="module")
def trained_tiny_evaluator(tmp_path_factory):
    """A tiny CLIP trained contrastively on ToyWorld renders for 110 steps (~15 s on one core),
    saved with its tokenizer and a [-1, 1] preprocessor config like the real evaluator."""
    from multiconcept.models.tiny import tiny_tokenizer
    from multiconcept.models.tiny_evaluators import tiny_clip_model
    from multiconcept.toyworld import BACKGROUNDS, BODY_COLOURS, KINDS

    tok = tiny_tokenizer(words=list(KINDS) + list(BODY_COLOURS) + list(BACKGROUNDS) + ["a", "on", "background"],
                         max_length=16)
    rng = np.random.default_rng(0)
    # 12 distinct captions (one contrastive batch); the parts no caption says drawn at random
    pairs = [(k, c) for c in BODY_COLOURS for k in KINDS]
    images, captions = [], []
    for bg in ("gray", "white", "black", "beige"):
        for k, c in pairs:
            creature = Creature(**{**random_creature(rng, kind=k).to_dict(), "body_colour": c})
            images.append(render(layout_specs([creature], "center", rng), bg, "center").image)
            captions.append(f"a {c} {k}")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    ids = tok(captions, padding="max_length", max_length=16, return_tensors="pt")
    model = tiny_clip_model(tok, image_size=64, width=64, layers=2, patch_size=16, max_length=16)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    losses = []
    for step in range(110):
        idx = torch.arange(len(pairs)) + len(pairs) * int(rng.integers(4))  # one background per batch
        loss = model(input_ids=ids.input_ids[idx], attention_mask=ids.attention_mask[idx], pixel_values=x[idx],
                     return_loss=True).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    folder = save_tiny_clip(tmp_path_factory.mktemp("toyclip"), tokenizer=tok, model=model, processor={
        "size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}, "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3})
    return folder, losses


def test_tiny_trained_evaluator_prefers_the_right_caption(trained_tiny_evaluator):
    folder, losses = trained_tiny_evaluator
    assert np.mean(losses[-10:]) < 0.6 * np.log(12)  # it learned: chance is ln(12)
    scorer = load_clip(str(folder))
    assert scorer.preprocess.mean == (0.5, 0.5, 0.5)  # its preprocessor_config.json was read
    img = scorer.image_embeddings([red_robot()])
    txt = scorer.text_embeddings(["a red robot", "a blue bird"])
    own, wrong = (img @ txt.T)[0].tolist()
    assert own > wrong + 0.1


def test_paired_difference_is_students_t_interval_and_says_when_it_spans_zero():
    from multiconcept.metrics.stats import mean_sem, paired_difference

    d = paired_difference([1, 2, 3, 4], [0, 0, 0, 0])
    # mean 2.5, sd 1.2910, sem 0.6455, t(3, 0.975) = 3.1824 → half-width 2.0543
    assert (d.mean, d.n) == (2.5, 4) and d.low == pytest.approx(0.4457, abs=1e-4) and d.high == pytest.approx(4.5543, abs=1e-4)
    assert d.measurable and d.text("A", "B").startswith("A above B (+2.500")
    flat = paired_difference([1.0, 0.0, 2.0], [0.5, 0.5, 1.0])  # differences +0.5, −0.5, +1.0
    assert not flat.measurable and "no measurable difference" in flat.text("A", "B")
    assert paired_difference([1, None, 3], [0, 5, 1]).n == 2  # a unit missing on either side is dropped
    e = mean_sem([1.0, 2.0, 3.0])
    assert (e.mean, e.n) == (2.0, 3) and e.sem == pytest.approx(1 / 3 ** 0.5) and e.text(2) == "2.00 ± 0.58"
    assert mean_sem([4.0]).sem is None
