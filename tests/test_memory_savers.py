"""Memory savers: gradient checkpointing trains the same bundle; VAE slicing draws the same images; the
VAE's tiled decoder is what --vae-tiling turns on."""

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


def learn(scene, out, method, base, **params):
    cls = get_method(method)
    cfg = cls.Config(steps=2, grad_accum=1, batch_size=1, scale_lr=False, checkpoint_every=0, **{"lr": 5e-2, **params})
    data = build_concept_set([Concept("<a1>", "cat"), Concept("<b1>", "dog")], [scene["image"]],
                             [f"<a1>={scene['m1']}", f"<b1>={scene['m2']}"])
    return load_bundle(train(cls, load_base(base), data, cfg, out, progress=False))


@pytest.mark.parametrize("method,base,params", [("lora", "tiny-sdxl", {"train_text_encoder": True}),
                                                ("custom-diffusion", "tiny", {"lr": 1e-3}),
                                                ("textual-inversion", "tiny", {})])
def test_gradient_checkpointing_trains_the_same_bundle(scene, tmp_path, method, base, params):
    plain = learn(scene, tmp_path / "plain.safetensors", method, base, **params)
    saved = learn(scene, tmp_path / "ckpt.safetensors", method, base, gradient_checkpointing=True, **params)
    assert plain.tensors.keys() == saved.tensors.keys()
    moved = 0
    for k, v in plain.tensors.items():
        torch.testing.assert_close(saved.tensors[k], v, rtol=1e-4, atol=1e-5, msg=k)
        moved += bool(v.abs().max() > 0)
    assert moved  # something was trained, and trained alike


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
