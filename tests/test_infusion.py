"""Infusion on the tiny base: behaviour that could fail."""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import multiconcept.methods.infusion as infusion  # registers the method
from multiconcept.attention import AttentionStore, capture_attention
from multiconcept.bundle import describe, load_bundle
from multiconcept.data import build_concept_set, to_tensor
from multiconcept.errors import UserError
from multiconcept.methods import get_method
from multiconcept.methods.finetune import Trainer, train
from multiconcept.models import load_base, toyworld_available
from multiconcept.prompts import Concept
from multiconcept.workflows.generate import SampleSettings, generate, load_with_bundles

Infusion, InfusionConfig = infusion.Infusion, infusion.InfusionConfig
FIRST_ATTN2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"  # the first cross-attention of a forward


def solid(path, rgb):
    """The colour over all but a gray 2-pixel frame (a source of one flat colour is refused: nothing to learn)."""
    a = np.full((32, 32, 3), 128, np.uint8)
    a[2:-2, 2:-2] = rgb
    Image.fromarray(a).save(path)
    return str(path)


def learn(tmp, image, word, out, steps, lr=0.1, **cfg):
    base = load_base("tiny")
    data = build_concept_set([Concept(f"<{word}1>", word)], [image])
    cfg = InfusionConfig(steps=steps, batch_size=2, grad_accum=1, lr=lr, derive_mask=False, flip=False, **cfg)
    return train(Infusion, base, data, cfg, tmp / out, progress=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infusion")
    red = solid(tmp / "red.png", (230, 30, 30))
    blue = solid(tmp / "blue.png", (30, 60, 230))
    return {"tmp": tmp, "red": red, "blue": blue,
            "cat": learn(tmp, red, "cat", "cat.safetensors", steps=20, lr=0.3),
            "dog": learn(tmp, blue, "dog", "dog.safetensors", steps=3)}


class ProjectionSpy:
    """Records, per call of one attn2 projection, what the Infusion hook added: out − W·x."""

    def __init__(self, base, layer=FIRST_ATTN2, proj="to_v"):
        module = getattr(dict(base.unet.named_modules())[layer], proj)
        self.added = []
        self.handle = module.register_forward_hook(
            lambda m, args, out: self.added.append((out - F.linear(args[0], m.weight, m.bias)).detach().clone()))


def positions(base, prompt, word):
    return infusion.class_word_positions(base.tokenizer, prompt, [word])[word]


def residual(bundle_path, word, layer=FIRST_ATTN2, kind="value_residual"):
    return load_bundle(bundle_path).tensors[f"{kind}/{word}/{layer}"].float()


def images(paths):
    return np.stack([np.asarray(Image.open(p)) for p in paths])


# ---------------------------------------------------------------- generation

def test_prompt_without_class_word_is_bit_identical(files, tmp_path):
    with_bundle = load_with_bundles("tiny", [str(files["cat"])])
    plain = load_with_bundles("tiny", [])
    s = SampleSettings(steps=4, guidance=6.0)
    for prompt, same in (("a photo of a dog on the beach", True), ("a photo of a cat on the beach", False)):
        a = images(generate(prompt, with_bundle, 2, 0, tmp_path / "with" / prompt[13:16], s))
        b = images(generate(prompt, plain, 2, 0, tmp_path / "plain" / prompt[13:16], s))
        assert np.array_equal(a, b) == same, prompt  # the class word turns the concept on, nothing else does


def test_only_conditional_rows_get_the_residual(files):
    loaded = load_with_bundles("tiny", [str(files["cat"])])
    base, delta = loaded.base, residual(files["cat"], "cat")
    spy = ProjectionSpy(base)
    prompt = "a photo of a cat"
    where = positions(base, prompt, "cat")
    # a negative prompt holding the class word, and one equal to the prompt: neither branch may be customised
    for negative in ("a cat", prompt):
        spy.added.clear()
        with torch.no_grad():
            base.pipe([prompt] * 2, negative_prompt=[negative] * 2, num_inference_steps=2, guidance_scale=6.0,
                      output_type="latent")
        assert len(spy.added) == 2  # one UNet call per step, CFG batched as [uncond, cond]
        for added in spy.added:
            assert added.shape[0] == 4
            assert torch.count_nonzero(added[:2]) == 0, negative
            others = [j for j in range(added.shape[1]) if j not in where]
            assert torch.count_nonzero(added[2:, others]) == 0
            torch.testing.assert_close(added[2:, where], delta.expand(2, len(where), -1), rtol=0, atol=1e-6)
    spy.added.clear()
    with torch.no_grad():  # no guidance: every row is conditional
        base.pipe([prompt] * 2, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    torch.testing.assert_close(spy.added[0][:, where], delta.expand(2, len(where), -1), rtol=0, atol=1e-6)
    # a UNet call on embeddings the pipeline did not encode is left alone
    spy.added.clear()
    with torch.no_grad():
        base.unet(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 77, 32))
    assert torch.count_nonzero(spy.added[0]) == 0


def test_two_infusion_bundles_apply_each_at_its_own_word(files):
    loaded = load_with_bundles("tiny", [str(files["cat"]), str(files["dog"])])
    base = loaded.base
    spy = ProjectionSpy(base)
    prompt = "a cat next to a dog"
    cat, dog = positions(base, prompt, "cat"), positions(base, prompt, "dog")
    with torch.no_grad():
        base.pipe(prompt, num_inference_steps=1, guidance_scale=6.0, output_type="latent")
    cond = spy.added[0][1]
    torch.testing.assert_close(cond[cat], residual(files["cat"], "cat").expand(len(cat), -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(cond[dog], residual(files["dog"], "dog").expand(len(dog), -1), rtol=0, atol=1e-6)
    rest = [j for j in range(cond.shape[0]) if j not in cat + dog]
    assert torch.count_nonzero(cond[rest]) == 0 and torch.count_nonzero(spy.added[0][0]) == 0


def test_composes_with_a_custom_diffusion_bundle(files, tmp_path):
    cd_cls = get_method("custom-diffusion")
    cd = train(cd_cls, load_base("tiny"), build_concept_set([Concept("<t1>", "toy")], [files["blue"]]),
               cd_cls.Config(steps=2, grad_accum=1, lr=1e-3, scale_lr=False), tmp_path / "cd.safetensors", progress=False)
    both = load_with_bundles("tiny", [str(files["cat"]), str(cd)])
    only_cd = load_with_bundles("tiny", [str(cd)])
    spy = ProjectionSpy(both.base)
    prompt = "a cat and a <t1> toy"
    s = SampleSettings(steps=3, guidance=6.0)
    a = images(generate(prompt, both, 1, 0, tmp_path / "both", s))
    b = images(generate(prompt, only_cd, 1, 0, tmp_path / "cd", s))
    assert not np.array_equal(a, b)  # the Infusion concept is on next to the CD concept
    cat = positions(both.base, prompt, "cat")
    cond = spy.added[0][1]
    torch.testing.assert_close(cond[cat], residual(files["cat"], "cat").expand(len(cat), -1), rtol=0, atol=1e-6)
    assert torch.count_nonzero(cond[[j for j in range(cond.shape[0]) if j not in cat]]) == 0


def test_a_class_word_customised_twice_is_an_error(files, tmp_path):
    copy = tmp_path / "cat_copy.safetensors"
    shutil.copy(files["cat"], copy)
    with pytest.raises(UserError, match="load one"):
        load_with_bundles("tiny", [str(files["cat"]), str(copy)])
    base = load_base("tiny")
    Infusion.apply(base, load_bundle(files["cat"]))
    with pytest.raises(UserError, match="two Infusion concepts customise the class word 'cat'"):
        Infusion.apply(base, load_bundle(copy))
    Infusion.remove(base)
    assert base.infusion is None and "encode_prompt" not in base.pipe.__dict__
    with pytest.raises(UserError, match="repeats one"):
        Infusion(base, build_concept_set([Concept("<a>", "cat"), Concept("<b>", "cat")], [files["red"]]), InfusionConfig())


def test_value_residual_keeps_the_base_attention_and_key_residual_does_not(files):
    key_bundle = learn(files["tmp"], files["red"], "cat", "cat_key.safetensors", steps=3, key_residual=True)
    assert residual(key_bundle, "cat", kind="key_residual").abs().max() > 0

    def first_layer_maps(bundles):
        base = load_with_bundles("tiny", bundles).base
        with torch.no_grad():
            cond, _ = base.pipe.encode_prompt(["a photo of a cat"], base.device, 1, False)
            store = AttentionStore(resolutions=None)
            with capture_attention(base.unet, store):
                base.unet(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), 500, cond)
        return store.layer_maps()[FIRST_ATTN2]

    plain = first_layer_maps([])
    assert torch.equal(first_layer_maps([str(files["cat"])]), plain)
    assert not torch.allclose(first_layer_maps([str(key_bundle)]), plain, rtol=0, atol=1e-7)


# ---------------------------------------------------------------- training

def test_only_residuals_train_and_the_masked_loss_drops(scene):
    base = load_base("tiny")
    before = {f"{part}.{k}": v.detach().clone() for part in ("unet", "text_encoder", "vae")
              for k, v in getattr(base, part).state_dict().items()}
    data = build_concept_set([Concept("<a1>", "cat")], [scene["image"]], [f"<a1>={scene['m1']}"])
    cfg = InfusionConfig(steps=20, batch_size=2, grad_accum=1, lr=0.5)
    method = Infusion(base, data, cfg)
    assert len(data.examples) == 2 and data.examples[1].source.endswith(infusion.MIRROR_SUFFIX)  # h-flip copy
    groups = method.setup()
    tr = Trainer(method, base, data, cfg)
    batch = tr.batch(0, 0)
    assert all("cat" in p and "<a1>" not in p for p in batch["prompts"])  # the plain class word, no token
    assert batch["loss_mask"].min() == 0  # the user mask weights the loss

    def probe():
        with torch.no_grad():
            return sum(tr.loss(tr.batch(10_000 + k, 0), torch.Generator().manual_seed(123 + k))[0].item() for k in range(4))

    start = probe()
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for step in range(cfg.steps):
        opt.zero_grad()
        tr.loss(tr.batch(step, 0), torch.Generator().manual_seed(step))[0].backward()
        opt.step()
    end = probe()
    method.teardown()
    assert end < start * 0.99, (start, end)
    after = {f"{part}.{k}": v for part in ("unet", "text_encoder", "vae") for k, v in getattr(base, part).state_dict().items()}
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    trained = method.named_trainables()
    assert len(trained) == len(infusion.cross_attention_layers(base.unet))
    assert all(k.startswith("value_residual/cat/") and p.abs().max() > 0 for k, p in trained.items())
    assert base.infusion is None  # teardown leaves the pipeline as loaded


def test_derived_mask_when_none_is_given(scene):
    base = load_base("tiny")
    data = build_concept_set([Concept("<a1>", "cat")], [scene["image"]])
    method = Infusion(base, data, InfusionConfig(flip=False))
    m = np.asarray(data.examples[0].masks["<a1>"], np.float32) / 255
    assert method.derived_masks == 1 and m.shape == (32, 32)
    assert m.max() == 1.0 and m.min() < 0.05 and 0.05 < m.mean() < 0.95  # min-max normalised soft map
    assert len(np.unique(m)) > 10  # soft, not all-or-nothing
    method.setup()
    loss_mask = Trainer(method, base, data, method.cfg).batch(0, 0)["loss_mask"]
    assert loss_mask.std() > 0  # the derived map weights the diffusion loss
    method.teardown()


def test_learned_concept_moves_generations_toward_its_reference(files):
    """Tiny base: latent distance of generations to the reference's latent, bundle vs base."""
    ref = load_base("tiny")
    with torch.no_grad():
        z_ref = ref.vae.encode(to_tensor(Image.open(files["red"]), 32)[None]).latent_dist.mean * ref.vae.config.scaling_factor

    def distance(bundles):
        pipe = load_with_bundles("tiny", bundles).base.pipe
        with torch.no_grad():
            z = pipe(["a photo of a cat"] * 4, num_inference_steps=10, guidance_scale=6.0, output_type="latent",
                     generator=[torch.Generator().manual_seed(s) for s in range(4)]).images
        return (z - z_ref).pow(2).mean().item()

    base_d, custom_d = distance([]), distance([str(files["cat"])])
    assert custom_d < 0.97 * base_d, (base_d, custom_d)


@pytest.mark.skipif(not toyworld_available(), reason="needs the ToyWorld base and evaluator (multiconcept toyworld build)")
def test_learned_concept_moves_generations_toward_its_reference_evaluator(tmp_path):
    from multiconcept.metrics.clip import load_clip, mean_pairwise_cosine, toyworld_evaluator_available
    from multiconcept.toyworld import write_concept_folder

    if not toyworld_evaluator_available():
        pytest.skip("needs the ToyWorld evaluator (multiconcept toyworld build)")
    pairs = write_concept_folder("ghost_b", tmp_path / "ref", n=4, seed=0)
    data = build_concept_set([Concept("<s1>", "ghost")], [str(p) for p, _ in pairs], [f"<s1>={m}" for _, m in pairs])
    cfg = InfusionConfig(steps=150, batch_size=2, grad_accum=1)
    out = train(Infusion, load_base(None), data, cfg, tmp_path / "ghost.safetensors", progress=False)
    scorer = load_clip(None)
    refs = scorer.image_embeddings([Image.open(p).convert("RGB") for p, _ in pairs])
    s = SampleSettings(steps=25, guidance=6.0)

    def clip_i(bundles, name):
        paths = generate("a ghost on a gray background", load_with_bundles(None, bundles), 8, 0, tmp_path / name, s)
        return mean_pairwise_cosine(scorer.image_embeddings([Image.open(p).convert("RGB") for p in paths]), refs)

    assert clip_i([str(out)], "custom") > clip_i([], "base")


# ---------------------------------------------------------------- bundle and CLI

def test_bundle_is_one_fp16_vector_per_layer(files):
    d = describe(files["cat"])
    layers = infusion.cross_attention_layers(load_base("tiny").unet)
    assert d["header"]["tokens"] == ["<infusion:cat>"] and d["header"]["class_words"] == ["cat"]
    assert {r["name"] for r in d["tensors"]} == {f"value_residual/cat/{name}" for name in layers}
    assert all(r["dtype"] == "F16" for r in d["tensors"])
    assert d["tensor_bytes"] == 2 * sum(a.to_v.out_features for a in layers.values())


def test_cli_learn_inspect_generate(scene, run_cli, tmp_path):
    out = tmp_path / "inf.safetensors"
    code, _, stderr = run_cli("learn", "-m", "infusion", "-c", "<a1>=cat", "-i", scene["image"], "--mask",
                              f"<a1>={scene['m1']}", "-o", out, "--base", "tiny", "--steps", "2", "--batch-size", "1",
                              "--grad-accum", "1", "--no-progress")
    assert code == 0, stderr
    code, stdout, _ = run_cli("inspect", out)
    assert code == 0 and "value_residual/cat/" in stdout and "<infusion:cat> (cat)" in stdout
    code, _, stderr = run_cli("generate", "a photo of a cat", "-b", out, "-n", "1", "--steps", "2", "-o",
                              tmp_path / "gen", "--base", "tiny")
    assert code == 0, stderr and (tmp_path / "gen" / "000000.png").exists()
