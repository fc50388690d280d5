"""Memory savers: gradient checkpointing trains the same bundle; frozen weights in bf16 train fp32 tensors
close to an all-fp32 run; 8-bit AdamW keeps 8-bit moments and resumes exactly; VAE slicing draws the same
images; the VAE's tiled decoder is what --vae-tiling turns on."""

import numpy as np
import pytest
import torch
from PIL import Image

from multiconcept.bundle import load_bundle
from multiconcept.data import build_concept_set
from multiconcept.methods import get_method
from multiconcept.methods.finetune import train
from multiconcept.models import load_base
from multiconcept.prompts import Concept


def learn(scene, out, method, base, dtype="fp32", **params):
    cls = get_method(method)
    cfg = cls.Config(steps=2, grad_accum=1, batch_size=1, scale_lr=False, checkpoint_every=0, **{"lr": 5e-2, **params})
    data = build_concept_set([Concept("<a1>", "cat"), Concept("<b1>", "dog")], [scene["image"]],
                             [f"<a1>={scene['m1']}", f"<b1>={scene['m2']}"])
    return load_bundle(train(cls, load_base(base, dtype=dtype), data, cfg, out, progress=False))


@pytest.mark.parametrize("method,base,params", [("lora", "tiny-sdxl", {"train_text_encoder": True}),
                                                ("custom-diffusion", "tiny", {"lr": 1e-3}),
                                                ("textual-inversion", "tiny", {}),
                                                ("lora", "tiny-flux", {"train_text_encoder": True}),
                                                ("custom-diffusion", "tiny-sd3", {"lr": 1e-3}),
                                                ("textual-inversion", "tiny-flux2", {})])
def test_gradient_checkpointing_trains_the_same_bundle(scene, tmp_path, method, base, params):
    plain = learn(scene, tmp_path / "plain.safetensors", method, base, **params)
    saved = learn(scene, tmp_path / "ckpt.safetensors", method, base, gradient_checkpointing=True, **params)
    assert plain.tensors.keys() == saved.tensors.keys()
    moved = 0
    for k, v in plain.tensors.items():
        torch.testing.assert_close(saved.tensors[k], v, rtol=1e-4, atol=1e-5, msg=k)
        moved += bool(v.abs().max() > 0)
    assert moved  # something was trained, and trained alike


@pytest.mark.parametrize("method,base,params", [("lora", "tiny-sdxl", {"train_text_encoder": True, "lr": 1e-3}),
                                                ("custom-diffusion", "tiny", {"lr": 1e-4}),
                                                ("disendiff", "tiny", {"lr": 1e-4, "attention_resolution": 8}),
                                                ("lora", "tiny-sd3", {"train_text_encoder": True, "lr": 1e-3}),
                                                ("custom-diffusion", "tiny-flux", {"lr": 1e-4}),
                                                ("disendiff", "tiny-flux2", {"lr": 1e-4})])
def test_frozen_bf16_weights_train_fp32_tensors_close_to_an_fp32_run(scene, tmp_path, method, base, params):
    seen = []
    real = torch.optim.AdamW.__init__

    def spy(self, groups, *a, **k):
        seen.extend(p.dtype for g in groups for p in g["params"])
        real(self, groups, *a, **k)

    torch.optim.AdamW.__init__ = spy
    try:
        half = learn(scene, tmp_path / "bf16.safetensors", method, base, dtype="bf16", **params)
    finally:
        torch.optim.AdamW.__init__ = real
    full = learn(scene, tmp_path / "fp32.safetensors", method, base, **params)
    assert seen and set(seen) == {torch.float32}
    assert {v.dtype for v in half.tensors.values()} == {torch.float32}
    trained = [k for k in full.tensors if k.startswith(("unet_delta/", "transformer_delta/", "lora/"))
               and full.tensors[k].abs().max() > 0]
    assert trained
    # the updates themselves (what bf16 trained tensors would round away), all tensors together: Adam's first
    # steps are near lr * sign(gradient), and bf16 activations flip the sign of a few tiny gradients
    a, b = (torch.cat([bundle.tensors[k].flatten() for k in trained]) for bundle in (half, full))
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9


def test_training_on_a_bf16_base_leaves_its_weights_in_bf16(scene, tmp_path):
    cls = get_method("custom-diffusion")
    base = load_base("tiny", dtype="bf16")
    data = build_concept_set([Concept("<a1>", "cat")], [scene["image"]], [f"<a1>={scene['m1']}"])
    train(cls, base, data, cls.Config(steps=1, grad_accum=1, batch_size=1, checkpoint_every=0), tmp_path / "cd.safetensors",
          progress=False)
    assert {p.dtype for p in base.unet.parameters()} == {torch.bfloat16}
    assert not any(m._forward_pre_hooks for m in base.unet.modules())


def test_adamw8bit_keeps_8bit_moments_and_resumes_exactly(tmp_path):
    from multiconcept.training import make_optimizer
    from multiconcept.training.checkpoint import load_checkpoint, save_checkpoint

    def steps(opt, params, n):
        for i in range(n):
            opt.zero_grad()
            sum(((x - i) ** 2).sum() for x in params).backward()
            opt.step()

    torch.manual_seed(0)
    # 8192 values each: above bitsandbytes' 4096-value threshold for 8-bit state; two, as they then
    # share one quantisation map, which safetensors refuses to write twice
    start = torch.randn(2, 64, 128)
    p = [torch.nn.Parameter(s.clone()) for s in start]
    opt = make_optimizer("adamw8bit", [{"params": p}], lr=1e-2, weight_decay=1e-2)
    steps(opt, p, 2)
    assert opt.state[p[0]]["state1"].dtype == torch.uint8
    save_checkpoint(tmp_path / "c.safetensors", {"p": torch.stack(p).detach()}, opt, step=2, digest="d", seconds=0)
    steps(opt, p, 2)
    q = [torch.nn.Parameter(torch.zeros_like(s)) for s in start]
    opt2 = make_optimizer("adamw8bit", [{"params": q}], lr=1e-2, weight_decay=1e-2)
    state, _ = load_checkpoint(tmp_path / "c.safetensors", opt2, "d")
    with torch.no_grad():
        for a, b in zip(q, state["p"]):
            a.copy_(b)
    steps(opt2, q, 2)
    assert all(torch.equal(a, b) for a, b in zip(p, q)) and not torch.equal(p[0].detach(), start[0])


def test_adamw8bit_trains_a_method(scene, tmp_path):
    plain = learn(scene, tmp_path / "a.safetensors", "lora", "tiny", lr=1e-3)
    eight = learn(scene, tmp_path / "b.safetensors", "lora", "tiny", lr=1e-3, optimizer="adamw8bit")
    assert eight.hyperparameters["optimizer"] == "adamw8bit"
    moved = [k for k, v in plain.tensors.items() if k.startswith("lora/") and v.abs().max() > 0]
    assert moved and all(eight.tensors[k].abs().max() > 0 for k in moved)


def test_gradient_checkpointing_is_refused_where_attention_losses_capture_maps(scene, tmp_path, run_cli):
    code, _, err = run_cli("learn", "-m", "disendiff", "-c", "<a1>=cat", "-c", "<b1>=dog", "-i", scene["image"],
                           "--mask", f"<a1>={scene['m1']}", "--mask", f"<b1>={scene['m2']}", "--base", "tiny",
                           "-o", tmp_path / "d.safetensors", "--param", "steps=1", "--param", "gradient_checkpointing=true")
    assert code == 2 and "gradient_checkpointing does not work with disendiff" in err and "Traceback" not in err
    assert not list(tmp_path.glob("d.safetensors*"))


def test_vae_slicing_draws_the_same_images_and_tiling_reaches_the_decoder(run_cli, tmp_path, monkeypatch):
    args = ["generate", "photo of a cat", "--base", "tiny", "-n", "2", "--steps", "2"]
    assert run_cli(*args, "-o", tmp_path / "plain")[0] == 0
    assert run_cli(*args, "-o", tmp_path / "sliced", "--vae-slicing")[0] == 0
    for name in ("000000.png", "000001.png"):
        a, b = (np.asarray(Image.open(tmp_path / d / name), dtype=np.int16) for d in ("plain", "sliced"))
        assert np.abs(a - b).max() <= 1

    from diffusers import AutoencoderKL

    calls = []
    real = AutoencoderKL.tiled_decode
    monkeypatch.setattr(AutoencoderKL, "tiled_decode", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    enable = AutoencoderKL.enable_tiling

    def small_tiles(self):  # the tiny VAE's images are one tile at its default tile size
        enable(self)
        self.tile_latent_min_size, self.tile_sample_min_size = 2, 16

    monkeypatch.setattr(AutoencoderKL, "enable_tiling", small_tiles)
    assert run_cli(*args, "-o", tmp_path / "tiled", "--vae-tiling")[0] == 0
    assert calls
