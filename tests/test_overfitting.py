"""Overfitting metrics (reconstructions of Infusion's) on the tiny base."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import multiconcept.workflows.overfitting as of
from multiconcept.bundle import load_bundle, save_bundle
from multiconcept.data import build_concept_set
from multiconcept.errors import UserError
from multiconcept.methods import get_method
from multiconcept.methods.finetune import train
from multiconcept.methods.infusion import Infusion, InfusionConfig
from multiconcept.models.tiny import tiny_tokenizer
from multiconcept.prompts import Concept
from multiconcept.workflows.generate import load_with_bundles


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overfitting")
    img = tmp / "red.png"
    a = np.full((32, 32, 3), 128, np.uint8)  # red inside a gray frame: a source of one flat colour is refused
    a[2:-2, 2:-2] = (230, 30, 30)
    Image.fromarray(a).save(img)

    def infusion(name, lr):
        data = build_concept_set([Concept("<c1>", "cat")], [str(img)])
        cfg = InfusionConfig(steps=5, batch_size=2, grad_accum=1, lr=lr, derive_mask=False, flip=False)
        return train(Infusion, _tiny(), data, cfg, tmp / name, progress=False)

    def zeroed(path, name):  # the trained bundle with every residual at zero (lr 0 is refused as a setting)
        bundle = load_bundle(path)
        bundle.tensors = {k: torch.zeros_like(v) for k, v in bundle.tensors.items()}
        return save_bundle(bundle, tmp / name)

    cd = get_method("custom-diffusion")
    trained = infusion("trained.safetensors", 0.3)
    return {
        "zero": zeroed(trained, "zero.safetensors"),
        "trained": trained,
        "cd": train(cd, _tiny(), build_concept_set([Concept("<t1>", "toy")], [str(img)]),
                    cd.Config(steps=3, grad_accum=1, lr=1e-2, scale_lr=False), tmp / "cd.safetensors", progress=False),
        "tmp": tmp,
    }


def _tiny():
    from multiconcept.models import load_base

    return load_base("tiny")


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    """A tiny random CLIPModel + tokenizer folder, standing in for the ToyWorld evaluator."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_frechet_distance_is_zero_on_itself_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g) @ torch.randn(6, 6, generator=g)  # correlated features
    assert abs(of.frechet_distance(a, a)) < 1e-8
    # same covariance, mean moved by s in every dim: exactly ‖μ‖² = 6 s²
    assert of.frechet_distance(a, a + 0.5) == pytest.approx(6 * 0.25, rel=1e-6)
    assert of.frechet_distance(a, a + 1.0) > of.frechet_distance(a, a + 0.5)
    # N(0, I) vs N(0, 4I): D (1 + 4 − 2·2) = D, up to sampling error
    x, y = torch.randn(20000, 4, generator=g), 2 * torch.randn(20000, 4, generator=g)
    assert of.frechet_distance(x, y) == pytest.approx(4.0, rel=0.1)
    with pytest.raises(UserError, match="at least 2"):
        of.frechet_distance(a[:1], a)


def test_neutral_prompts_never_name_a_concept():
    prompts = of.neutral_prompts(["robot", "<s1>", "bird"], 8)
    assert len(set(prompts)) == 8 and all("ghost" in p for p in prompts)
    assert len({p.split()[1] for p in prompts}) == 4 and len({p.split()[-2] for p in prompts}) == 4
    assert len(set(of.neutral_prompts([], 48))) == 48  # every kind, body colour and background once
    generic = of.neutral_prompts(["dog"], 4, world="generic")
    assert len(generic) == 4 and not any("dog" in p for p in generic)


def test_latent_fisher_divergence_zero_for_zero_residual_positive_after_training(bundles):
    plain = load_with_bundles("tiny", []).base
    kwargs = dict(seeds=[0, 1], timesteps=(800, 400), steps=4)
    concept_prompts = ["a photo of a cat", "a cat on a white background"]

    def lfd(bundle, prompts):
        return of.latent_fisher_divergence(plain, load_with_bundles("tiny", [str(bundle)]).base, prompts, **kwargs)

    zero = lfd(bundles["zero"], concept_prompts)
    assert zero["value"] == 0.0 and len(zero["timesteps"]) == 2  # the trajectory steps nearest 800 and 400
    trained = lfd(bundles["trained"], concept_prompts)
    assert trained["value"] > 0 and all(v > 0 for v in trained["per_timestep"].values())
    # on prompts that do not name the concept Infusion is the base, exactly; Custom Diffusion drifts
    neutral = of.neutral_prompts(["cat", "toy"], 2)
    assert lfd(bundles["trained"], neutral)["value"] == 0.0
    assert lfd(bundles["cd"], neutral)["value"] > 0
    assert set(trained) >= {"value", "per_timestep", "per_prompt", "prompts", "seeds", "timesteps"}


def test_overfitting_report_for_infusion_and_custom_diffusion(bundles, evaluator, monkeypatch, tmp_path):
    monkeypatch.setattr(of, "PROTOCOL", of.OverfittingProtocol(fisher_prompts=2, fisher_seeds=1, fisher_timesteps=(700, 300),
                                                                fisher_steps=3, wasserstein_contexts=3,
                                                                wasserstein_seeds=1, sample_steps=2))
    paths = [str(bundles["trained"]), str(bundles["cd"])]
    report = of.overfitting_report("tiny", paths, tmp_path / "of", evaluator, seed=7)
    json.dumps(report)  # JSON-ready
    assert "reconstruction" in report["note"].lower()
    fisher = report["latent_fisher_divergence"]
    assert fisher["value"] > 0 and fisher["seeds"] == [7] and len(fisher["prompts"]) == 2  # CD drifts
    assert not any(w in p.split() for p in fisher["prompts"] for w in ("cat", "toy"))
    w = report["wasserstein"]
    assert sorted(v["method"] for v in w.values()) == ["custom-diffusion", "infusion"]
    for v in w.values():
        assert v["value"] >= 0 and v["images_per_side"] == 3 and v["seeds"] == [7]
        assert len(list((tmp_path / "of").rglob("*.png"))) >= 6
    inf = next(v for v in w.values() if v["method"] == "infusion")
    cd = next(v for v in w.values() if v["method"] == "custom-diffusion")
    assert inf["custom_prompts"][0] == "a cat on a white background"  # Infusion names its concept by the class word
    assert (cd["custom_prompts"][0] == "a <t1> toy on a white background"
            and cd["base_prompts"][0] == "a toy on a white background")


def test_overfitting_report_needs_an_evaluator(bundles, tmp_path, monkeypatch):
    import multiconcept.metrics.clip as clip_module

    monkeypatch.setattr(clip_module, "TOYWORLD_EVALUATOR", tmp_path / "no-evaluator")  # as in an install without it
    with pytest.raises(UserError, match="--clip"):
        of.overfitting_report("tiny", [str(bundles["trained"])], tmp_path, None, 0)
    with pytest.raises(UserError, match="at least one --bundle"):
        of.overfitting_report("tiny", [], tmp_path, None, 0)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_fisher_divergence_compares_epsilon_whatever_the_base_predicts(kind):
    from diffusers import DDIMScheduler

    from multiconcept.workflows.overfitting import as_epsilon

    sched = DDIMScheduler(prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([700, 700])
    xt = sched.add_noise(x0, eps, t)
    out = {"epsilon": eps, "v_prediction": sched.get_velocity(x0, eps, t), "sample": x0}[kind]
    torch.testing.assert_close(as_epsilon(sched, out, xt, 700), eps, atol=1e-4, rtol=1e-4)
