"""The training loop and the methods on the tiny base: behaviour that could fail."""

import random

import pytest
import torch

from multiconcept.bundle import load_bundle, save_bundle
from multiconcept.data import build_concept_set
from multiconcept.methods import get_method
from multiconcept.methods.finetune import Trainer, TrainingDiverged, train
from multiconcept.models import load_base
from multiconcept.prompts import Concept


def concept_set(scene):
    return build_concept_set([Concept("<a1>", "cat"), Concept("<b1>", "dog")], [scene["image"]],
                             [f"<a1>={scene['m1']}", f"<b1>={scene['m2']}"])


def snapshot(base):
    # peft renames wrapped weights to '<name>.base_layer.weight'; compare them under the plain name
    return {**{f"unet.{k.replace('.base_layer', '')}": v.detach().clone() for k, v in base.unet.state_dict().items()},
            **{f"te.{k}": v.detach().clone() for k, v in base.text_encoder.state_dict().items()},
            **{f"vae.{k}": v.detach().clone() for k, v in base.vae.state_dict().items()}}


@pytest.mark.parametrize("method", ["custom-diffusion", "textual-inversion", "lora"])
def test_loss_decreases_and_only_intended_tensors_change(scene, tmp_path, method):
    base = load_base("tiny")
    before = snapshot(base)
    emb_before = base.text_encoder.get_input_embeddings().weight.detach().clone()
    data = concept_set(scene)
    cls = get_method(method)
    lr = {"custom-diffusion": 1e-3, "textual-inversion": 5e-2, "lora": 5e-3}[method]
    cfg = cls.Config(steps=20, grad_accum=1, batch_size=2, augment=False, lr=lr, scale_lr=False)
    # a fixed probe batch: same image, noise and timesteps before and after training
    probe_method = cls(base, data, cfg)

    def probe_loss(m):
        tr = Trainer(m, base, data, cfg)
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(tr.loss(tr.batch(10_000 + k, 0), g)[0].item() for k in range(4))

    groups = probe_method.setup()
    start = probe_loss(probe_method)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    tr = Trainer(probe_method, base, data, cfg)
    for step in range(cfg.steps):
        opt.zero_grad()
        loss, _ = tr.loss(tr.batch(step, 0), torch.Generator().manual_seed(step))
        loss.backward()
        opt.step()
    end = probe_loss(probe_method)
    probe_method.teardown()
    assert end < start * 0.99, (start, end)  # probe is deterministic: any drop is the training

    after = snapshot(base)
    shared = set(before) & set(after)
    assert len(shared) > 0.9 * len(before)  # the comparison really covers the model
    # the embedding table grows by the new rows; its old rows are checked below
    changed = {k for k in shared if not torch.equal(before[k], after[k]) and "token_embedding" not in k}
    if method == "custom-diffusion":
        assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed), changed
    elif method == "textual-inversion":
        assert changed == set(), changed  # rows live in the TrainableTokens parameter until committed
    # frozen embedding rows are bit-identical for every method
    new = base.text_encoder.get_input_embeddings().weight.detach()
    assert new.shape[0] == emb_before.shape[0] + 2
    assert torch.equal(new[: emb_before.shape[0]], emb_before)
    if method == "lora":
        lora = {k for k in after if "lora_" in k}
        assert lora and not (changed - lora), changed - lora


def test_train_writes_bundle_that_round_trips_bit_identical(scene, tmp_path):
    base = load_base("tiny")
    cls = get_method("custom-diffusion")
    out = train(cls, base, concept_set(scene), cls.Config(steps=2, grad_accum=1), tmp_path / "b.safetensors", progress=False)
    b = load_bundle(out)
    assert b.method == "custom-diffusion" and b.tokens == ["<a1>", "<b1>"] and b.class_words == ["cat", "dog"]
    assert b.base_fingerprint == base.fingerprint
    assert any(k.startswith("unet_delta/") for k in b.tensors) and "token_embedding/<a1>" in b.tensors
    save_bundle(b, tmp_path / "c.safetensors")
    b2 = load_bundle(tmp_path / "c.safetensors")
    assert b2.header() == b.header()
    assert b2.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(b.tensors[k], b2.tensors[k]) for k in b.tensors)
    assert (tmp_path / "c.safetensors").read_bytes() == out.read_bytes()
    assert not (tmp_path / "b.safetensors.ckpt").exists()  # checkpoint removed after success


@pytest.mark.parametrize("method", ["custom-diffusion", "lora"])
def test_resume_equals_uninterrupted(scene, tmp_path, method):
    cls = get_method(method)
    cfg = cls.Config(steps=6, grad_accum=2, batch_size=1, checkpoint_every=2)
    full = train(cls, load_base("tiny"), concept_set(scene), cfg, tmp_path / "full.safetensors", progress=False)
    # "killed" after 3 steps: the run stops, leaving a checkpoint and no bundle
    part = tmp_path / "part.safetensors"
    assert train(cls, load_base("tiny"), concept_set(scene), cfg, part, progress=False, stop_after=3) is None
    assert not part.exists() and (tmp_path / "part.safetensors.ckpt" / "checkpoint.safetensors").exists()
    resumed = train(cls, load_base("tiny"), concept_set(scene), cfg, part, progress=False, resume=True)
    a, b = load_bundle(full), load_bundle(resumed)
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        torch.testing.assert_close(a.tensors[k], b.tensors[k], rtol=1e-5, atol=1e-6)
    # and it really trained: a run of different length differs
    cfg3 = cls.Config(steps=3, grad_accum=2, batch_size=1)
    short = load_bundle(train(cls, load_base("tiny"), concept_set(scene), cfg3, tmp_path / "s.safetensors", progress=False))
    assert any(not torch.allclose(short.tensors[k], a.tensors[k]) for k in a.tensors if not k.startswith("token_embedding"))


def test_resume_refuses_other_settings(scene, tmp_path):
    cls = get_method("custom-diffusion")
    out = tmp_path / "b.safetensors"
    train(cls, load_base("tiny"), concept_set(scene), cls.Config(steps=4, grad_accum=1), out, progress=False, stop_after=2)
    from multiconcept import UserError

    with pytest.raises(UserError, match="made with other settings"):
        train(cls, load_base("tiny"), concept_set(scene), cls.Config(steps=4, grad_accum=1, lr=1.0), out,
              progress=False, resume=True)


def test_non_finite_loss_stops_and_keeps_checkpoint(scene, tmp_path, monkeypatch):
    cls = get_method("custom-diffusion")
    calls = {"n": 0}
    real = Trainer.loss

    def poisoned(self, batch, gen):
        loss, logs = real(self, batch, gen)
        calls["n"] += 1
        return (loss * float("nan"), logs) if calls["n"] > 3 else (loss, logs)

    monkeypatch.setattr(Trainer, "loss", poisoned)
    out = tmp_path / "b.safetensors"
    with pytest.raises(TrainingDiverged, match="loss became nan at step 3; the last good checkpoint is"):
        train(cls, load_base("tiny"), concept_set(scene), cls.Config(steps=10, grad_accum=1, checkpoint_every=2), out,
              progress=False)
    assert not out.exists()
    assert (tmp_path / "b.safetensors.ckpt" / "checkpoint.safetensors").exists()
    assert list(tmp_path.glob("*.tmp")) == [] and list(tmp_path.glob(".*.tmp")) == []


def test_augmentation_shrinks_and_masks(scene):
    from PIL import Image

    from multiconcept.data import mask_tensor, scale_augment, to_tensor

    img = to_tensor(Image.open(scene["image"]), 32)
    m = mask_tensor(Image.open(scene["m1"]).convert("L"), 32)
    seen = set()
    for s in range(40):
        out, mask, region, prefix = scale_augment(img, m, random.Random(s))
        assert out.shape == img.shape and mask.shape == m.shape
        if prefix in ("a far away ", "very small "):
            assert region.sum() < 32 * 32 and (out[:, region[0] == 0] == -1).all()
        seen.add(prefix.strip().split(" ")[0] if prefix else "")
    assert {"a", "very"} & seen and {"zoomed", "close"} & seen
    # no concept masks: still augments
    out, mask, region, _ = scale_augment(img, torch.zeros(0, 32, 32), random.Random(0))
    assert out.shape == img.shape and mask.shape == (0, 32, 32)


def test_latent_mode_uses_the_posterior_mean_when_a_channel_collapsed(scene):
    """ToyWorld's VAE has a channel whose posterior std is ~4.7: samples of it are noise,
    and its base was trained on means. `auto` must measure that and pick the mean."""
    from PIL import Image

    from multiconcept.data import to_tensor
    from multiconcept.methods.finetune import choose_latent_mode, latents_from_moments

    vae = load_base("tiny").vae
    px = to_tensor(Image.open(scene["image"]), 32)[None]
    assert choose_latent_mode("auto", vae, px) == "sample"  # a healthy posterior: diffusers' default
    c = vae.config.latent_channels
    with torch.no_grad():  # collapse channel 1 to a wide posterior: log-variance 2 log 5
        vae.quant_conv.weight[c + 1] = 0
        vae.quant_conv.bias[c + 1] = 2 * torch.log(torch.tensor(5.0))
    assert choose_latent_mode("auto", vae, px) == "mean"
    assert choose_latent_mode("sample", vae, px) == "sample"
    moments = vae.encode(px).latent_dist.parameters.detach()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    mean = latents_from_moments(vae, moments, "mean", g())
    sampled = latents_from_moments(vae, moments, "sample", g())
    sf = vae.config.scaling_factor
    assert torch.allclose(mean, moments[:, :c] * sf)
    assert (sampled - mean)[:, 1].std() > 3 * sf and (sampled - mean)[:, 0].std() < sf


def test_loss_region_modes():
    from multiconcept.methods.finetune import loss_region

    named = torch.zeros(1, 4, 4)
    named[0, :2, :2] = 1
    unnamed = torch.zeros(1, 4, 4)
    unnamed[0, 2:, 2:] = 1
    assert torch.equal(loss_region("masks", named, unnamed), named)
    assert torch.equal(loss_region("unnamed-out", named, unnamed), 1 - unnamed)
    assert torch.equal(loss_region("all", named, unnamed), torch.ones(1, 4, 4))
    # every concept named: unnamed-out counts the whole image
    assert torch.equal(loss_region("unnamed-out", named, torch.zeros(0, 4, 4)), torch.ones(1, 4, 4))


def test_written_files_get_the_usual_permissions(tmp_path):
    """atomic_write goes through mkstemp (0600); the file it leaves must be readable like any other."""
    import os

    from multiconcept.bundle import atomic_write

    mask = os.umask(0o022)
    os.umask(mask)
    out = atomic_write(tmp_path / "page.html", lambda tmp: open(tmp, "w").write("x"))
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask != 0o600
