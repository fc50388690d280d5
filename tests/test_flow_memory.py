"""Memory savers on the flow transformers (gradient checkpointing and bf16 are in test_memory_savers.py): the frozen
transformer in NF4 (bitsandbytes' own 4-bit layers), 8-bit AdamW, and text-encoder outputs cached where nothing in
the text path trains."""

import pytest
import torch
from torch import nn

from multiconcept.bundle import load_bundle
from multiconcept.data import build_concept_set
from multiconcept.methods import get_method
from multiconcept.methods.finetune import train
from multiconcept.models import load_base
from multiconcept.prompts import Concept


def learn(scene, tmp_path, base, method, **params):
    cls = get_method(method)
    cfg = cls.Config(**{"steps": 2, "grad_accum": 1, "batch_size": 1, "scale_lr": False, "checkpoint_every": 0,
                        "lr": 1e-2, **params})
    data = build_concept_set([Concept("<a1>", "cat")], [scene["image"]], [f"<a1>={scene['m1']}"])
    return load_bundle(train(cls, base, data, cfg, tmp_path / f"{method}.safetensors", progress=False))


@pytest.mark.parametrize("name,method", [("tiny-flux", "lora"), ("tiny-flux", "custom-diffusion"),
                                         ("tiny-sd3", "infusion"), ("tiny-flux2", "textual-inversion")])
def test_nf4_frozen_transformer_trains(scene, tmp_path, name, method):
    import bitsandbytes as bnb

    base = load_base(name)
    bundle = learn(scene, tmp_path, base, method, quantize_frozen="nf4")
    layers = dict(base.denoiser.named_modules())
    four_bit = [n for n, m in layers.items() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) > 10  # the frozen transformer is in NF4 ...
    if method == "custom-diffusion":  # ... but for the text K/V Custom Diffusion trains
        trained = [k[len("transformer_delta/"): -len(".weight")] for k in bundle.tensors if k.startswith("transformer_delta/")]
        assert trained and all(type(layers[t]) is nn.Linear for t in trained)
    moved = [k for k, v in bundle.tensors.items() if not k.startswith("token_embedding") or method == "textual-inversion"]
    assert moved and all(torch.isfinite(bundle.tensors[k]).all() for k in moved)
    assert any(bundle.tensors[k].abs().max() > 0 for k in moved if "lora_A" not in k)


def test_adamw8bit_trains_on_a_flow_base(scene, tmp_path):
    bundle = learn(scene, tmp_path, load_base("tiny-flux2"), "lora", optimizer="adamw8bit", lr=1e-3)
    b = [v for k, v in bundle.tensors.items() if "lora_B" in k]
    assert bundle.hyperparameters["optimizer"] == "adamw8bit" and b and any(v.abs().max() > 0 for v in b)


def test_text_encoders_run_once_per_caption_when_nothing_in_the_text_path_trains(scene, tmp_path):
    """LoRA without text-encoder LoRA: each caption goes through T5 once, its output is kept (the cache the loop
    holds); Textual Inversion's captions hold trained rows and are encoded every time."""
    calls = {"n": 0}
    for method, cached in (("lora", True), ("textual-inversion", False)):
        base = load_base("tiny-flux")
        calls["n"] = 0
        base.text_encoders[1].register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
        steps = 6
        learn(scene, tmp_path, base, method, steps=steps, augment=False, templates=("photo of a {}",))
        # the probe-free run: one caption, six steps
        assert calls["n"] == (1 if cached else steps), (method, calls["n"])
