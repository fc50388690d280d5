"""DisenDiff on a ToyWorld two-concept image: the attention losses do what they claim."""

import pytest
import torch

from multiconcept.data import build_concept_set
from multiconcept.methods import get_method
from multiconcept.methods.finetune import Trainer
from multiconcept.models import load_base, toyworld_available
from multiconcept.prompts import Concept
from multiconcept.toyworld import left_to_right, write_two_concept_folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    scene = write_two_concept_folder("robot_a", "bird_b", d, seed=0)  # on a beige background
    a, b = left_to_right(scene.subjects)  # named as ToyWorld's captions name them
    return {"concepts": [Concept("<s1>", a.creature.kind), Concept("<s2>", b.creature.kind)], "image": str(d / "image.png"),
            "masks": [f"<s1>={d / f'{a.concept}_mask.png'}", f"<s2>={d / f'{b.concept}_mask.png'}"]}


def make(pair, base="tiny", **overrides):
    base = load_base(base)
    data = build_concept_set(pair["concepts"], [pair["image"]], pair["masks"])
    cls = get_method("disendiff")
    cfg = cls.Config(grad_accum=1, batch_size=1, augment=False, **{"attention_resolution": 16, **overrides})
    m = cls(base, data, cfg)
    groups = m.setup()
    return m, Trainer(m, base, data, cfg), groups


def probe(m, tr, steps=range(100_000, 100_003)):
    """Mean (L_bind, L_s&s) with the paper's preprocessing on fixed probe batches (lower = better bound /
    better separated), measured with both terms whatever the run's flags are."""
    cfg, saved = m.cfg, (m.cfg.no_bind, m.cfg.no_separation)
    cfg.no_bind = cfg.no_separation = False
    with torch.no_grad():
        logs = [tr.loss(tr.batch(s, 0), torch.Generator().manual_seed(s))[1] for s in steps]
    cfg.no_bind, cfg.no_separation = saved
    return sum(l["bind"] for l in logs) / len(logs), sum(l["separation"] for l in logs) / len(logs)


def probe_each(m, tr, steps=range(100_000, 100_003)):
    """Each concept's 1 - IoU(modifier map, class map) and the class maps' IoU, on the probe batches."""
    cfg, saved = m.cfg, (m.cfg.no_bind, m.cfg.no_separation)
    cfg.no_bind = cfg.no_separation = False
    with torch.no_grad():
        logs = [tr.loss(tr.batch(s, 0), torch.Generator().manual_seed(s))[1] for s in steps]
    cfg.no_bind, cfg.no_separation = saved
    tokens = [c.token for c in m.concepts]
    return ({t: sum(l[f"bind {t}"] for l in logs) / len(logs) for t in tokens},
            sum(l["separation"] for l in logs) / len(logs))


def run(pair, steps, lr, measure=probe, **flags):
    """(measure before, measure after) `steps` AdamW steps; seeded, so two runs differ only by their flags."""
    torch.manual_seed(0)
    m, tr, groups = make(pair, **flags)
    before = measure(m, tr)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    for step in range(steps):
        opt.zero_grad()
        loss, _ = tr.loss(tr.batch(step, 0), torch.Generator().manual_seed(step))
        loss.backward()
        opt.step()
    after = measure(m, tr)
    m.teardown()
    return before, after


def test_bind_loss_pulls_modifier_maps_onto_class_maps(pair):
    (bind0, _), (bind1, _) = run(pair, 25, 3e-3, attention_weight=10.0, no_separation=True)
    assert bind1 < bind0 - 0.05, (bind0, bind1)  # modifier-class IoU rose


def test_separation_loss_pushes_class_maps_apart(pair):
    (_, sep0), (_, sep1) = run(pair, 20, 3e-3, attention_weight=1.0, no_bind=True)
    assert sep1 < sep0 - 0.02, (sep0, sep1)  # class-class IoU fell


@pytest.mark.skipif(not toyworld_available(), reason="needs the ToyWorld base (multiconcept toyworld build)")
def test_full_calibration_on_toyworld(pair):
    """Both losses at once, at the paper's weight and the default level (ToyWorld's 8x8), on a
    base whose maps mean something (the tiny random base's do not), with captions in ToyWorld's words,
    against a control that trains the same steps with the same seed at attention weight 0: Custom Diffusion
    training moves the maps by itself, so only the difference says what the calibration did."""

    def trained(weight):
        return run(pair, 30, 1e-4, measure=probe_each, base="toyworld", templates=("a {} on a beige background",),
                   attention_resolution=0, attention_weight=weight)[1]

    (bind, sep), (bind_control, sep_control) = trained(0.01), trained(0.0)
    assert all(bind[t] < bind_control[t] for t in bind), (bind, bind_control)  # modifier maps nearer their class maps
    assert sep < sep_control, (sep, sep_control)  # the class maps further apart


def attention_logs(pair, **flags):
    m, tr, _ = make(pair, **flags)
    torch.manual_seed(0)
    batch = tr.batch(7, 0)
    _, logs = tr.loss(batch, torch.Generator().manual_seed(7))
    m.teardown()
    return logs


def test_each_ablation_changes_exactly_its_term(pair):
    full = attention_logs(pair)
    assert full["bind"] > 0 and full["separation"] > 0
    no_bind = attention_logs(pair, no_bind=True)
    assert no_bind["bind"] == 0 and no_bind["separation"] == pytest.approx(full["separation"], rel=1e-6)
    no_sep = attention_logs(pair, no_separation=True)
    assert no_sep["separation"] == 0 and no_sep["bind"] == pytest.approx(full["bind"], rel=1e-6)
    assert no_bind["diffusion"] == pytest.approx(full["diffusion"], rel=1e-6)  # the diffusion term is untouched
    for flag in ("no_gaussian", "no_suppression", "twice_suppression", "all_resolutions"):
        logs = attention_logs(pair, **{flag: True})
        assert logs["bind"] != pytest.approx(full["bind"], rel=1e-6), flag
        assert logs["diffusion"] == pytest.approx(full["diffusion"], rel=1e-6), flag
    # suppression acts on class maps only: without it the separation IoU of weak maps rises
    assert attention_logs(pair, no_suppression=True)["separation"] > full["separation"]
    m, _, _ = make(pair, train_qkv=True)
    assert any(".attn2.to_q." in k for k in m.named_trainables())
    m.teardown()
    m, _, _ = make(pair)
    assert not any(".attn2.to_q." in k for k in m.named_trainables())
    m.teardown()


def test_union_sampling_and_mask_attention_loss(pair):
    import random

    m, tr, _ = make(pair, union_sampling=True, mask_attention_weight=0.01)
    subsets = {tuple(m.choose_tokens(tr.data.examples[0], random.Random(s))) for s in range(30)}
    assert {("<s1>",), ("<s2>",), ("<s1>", "<s2>")} <= subsets
    # a one-concept sample's loss mask is that concept's mask only
    for s in range(30):
        batch = tr.batch(s, 0)
        if batch["prompts"][0].count("<s") == 1:
            break
    token = "<s1>" if "<s1>" in batch["prompts"][0] else "<s2>"
    assert torch.equal(batch["loss_mask"][0], batch["masks"][0][token])
    _, logs = tr.loss(tr.batch(3, 0), torch.Generator().manual_seed(3))
    assert logs["mask_attention"] > 0
    m.teardown()


def test_union_sampling_erases_the_unnamed_concept(pair):
    """unnamed=erase: 'a <s1> robot' is trained on the image with the other concept painted
    with the background; unnamed-out would instead leave its pixels out of the loss."""
    from PIL import Image

    from multiconcept.data import mask_tensor, to_tensor

    m, tr, _ = make(pair, union_sampling=True, unnamed="erase", loss_region="all")
    size = tr.size
    image = to_tensor(Image.open(pair["image"]).convert("RGB"), size)
    soft = {spec.split("=", 1)[0]: mask_tensor(Image.open(spec.split("=", 1)[1]), size)[0] for spec in pair["masks"]}
    masks = {t: m >= 0.5 for t, m in soft.items()}
    seen = set()
    for s in range(40):
        batch = tr.batch(s, 0)
        named = tuple(t for t in ("<s1>", "<s2>") if t in batch["prompts"][0])
        px = batch["pixels"][0]
        assert torch.equal(batch["loss_mask"][0], torch.ones_like(batch["loss_mask"][0]))
        for t, hole in masks.items():
            if t in named:
                assert torch.equal(px[:, hole], image[:, hole])  # named concepts untouched
            else:
                background = ~(masks["<s1>"] | masks["<s2>"])
                fill = image[:, background].median(dim=1).values
                assert torch.allclose(px[:, hole], fill[:, None].expand(-1, int(hole.sum())))
        seen.add(named)
    assert {("<s1>",), ("<s2>",), ("<s1>", "<s2>")} <= seen
    m.teardown()

    m, tr, _ = make(pair, union_sampling=True, loss_region="unnamed-out")
    for s in range(40):
        batch = tr.batch(s, 0)
        if batch["prompts"][0].count("<s") == 1:
            other = "<s2>" if "<s1>" in batch["prompts"][0] else "<s1>"
            assert torch.allclose(1 - batch["loss_mask"][0][0], soft[other])
            assert torch.equal(batch["pixels"][0], image)
            break
    else:
        raise AssertionError("no one-concept sample in 40 draws")
    m.teardown()


def test_missing_resolution_is_a_clear_error(pair):
    from multiconcept import UserError

    m, tr, _ = make(pair, attention_resolution=13)
    with pytest.raises(UserError, match="no cross-attention layer of this base has 13x13"):
        tr.loss(tr.batch(0, 0), torch.Generator().manual_seed(0))
    m.teardown()


def test_default_level_is_the_deepest_down_block_level_on_any_base(pair):
    from types import SimpleNamespace

    from multiconcept.attention import calibration_level

    sd15 = SimpleNamespace(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                           mid_block_type="UNetMidBlock2DCrossAttn")
    sdxl = SimpleNamespace(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           mid_block_type="UNetMidBlock2DCrossAttn")
    toyworld = SimpleNamespace(down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                               mid_block_type="UNetMidBlock2DCrossAttn")
    # a quarter of the latent side on the real bases: SD 1.5 at 512 px, SD 2 at 768 px, SDXL at 1024 px
    assert calibration_level(sd15, 64) == 16 and calibration_level(sd15, 96) == 24 and calibration_level(sdxl, 128) == 32
    assert calibration_level(toyworld, 16) == 8  # not its 4x4 mid block
    for base in ("tiny", "tiny-sdxl"):
        m, tr, _ = make(pair, base=base, attention_resolution=0)
        cfg = m.base.unet.config
        latent = m.base.resolution // m.base.pipe.vae_scale_factor
        level = min(latent // 2**i for i, k in enumerate(cfg.down_block_types) if "CrossAttn" in k)
        assert m.cfg.attention_resolution == level
        _, logs = tr.loss(tr.batch(0, 0), torch.Generator().manual_seed(0))
        assert logs["bind"] > 0 and m.to_bundle().hyperparameters["attention_resolution"] == level
        m.teardown()
