"""The shipped ToyWorld base: it loads offline, it draws what is prompted, and
a short learning run on it moves generations toward a concept's reference.
Skipped until the weights are in the package (multiconcept toyworld build)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from multiconcept.models import load_base, toyworld_available

pytestmark = pytest.mark.skipif(not toyworld_available(), reason="needs the ToyWorld base (multiconcept toyworld build)")


def colour_rate(pipe, prompt: str, noun: str, colour: str, n: int = 8) -> float:
    import torch

    from multiconcept.toyworld import check

    images = pipe([prompt] * n, num_inference_steps=25, guidance_scale=4.0, height=64, width=64, output_type="np",
                  generator=[torch.Generator().manual_seed(i) for i in range(n)]).images
    images = (images * 255).round().astype(np.uint8)
    return float(np.mean([check(img, noun, colour)["colour_present"] for img in images]))


def test_shipped_base_loads_offline_and_draws_the_prompted_colour(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = load_base(None)  # the default base
    assert base.name == "toyworld" and base.resolution == 64
    pipe = base.pipe
    pipe.set_progress_bar_config(disable=True)
    red = colour_rate(pipe, "a large red circle in the center on a gray background", "circle", "red")
    red_when_blue = colour_rate(pipe, "a large blue circle in the center on a gray background", "circle", "red")
    assert red >= 0.6 and red_when_blue <= 0.25, (red, red_when_blue)


def test_shipped_base_draws_the_prompted_class_with_and_without_a_colour_word():
    import torch

    from multiconcept.toyworld import analyse

    pipe = load_base(None).pipe
    pipe.set_progress_bar_config(disable=True)
    prompts = [("a blue star on a white background", "star"), ("a ring on a gray background", "ring"),
               ("a triangle on a black background", "triangle"), ("a green heart on a beige background", "heart")]
    images = pipe([p for p, _ in prompts], num_inference_steps=25, guidance_scale=4.0, height=64, width=64,
                  output_type="np", generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images
    found = [[d.noun for d in analyse((img * 255).round().astype(np.uint8)).objects] for img in images]
    hits = sum(noun in f for f, (_, noun) in zip(found, prompts))
    assert hits >= 3, found


def test_short_learning_run_moves_generations_toward_the_reference(tmp_path):
    from multiconcept.data import build_concept_set
    from multiconcept.methods import get_method
    from multiconcept.methods.finetune import train
    from multiconcept.metrics.clip import load_clip, mean_pairwise_cosine
    from multiconcept.prompts import Concept
    from multiconcept.toyworld import write_concept_folder
    from multiconcept.workflows.generate import SampleSettings, generate, load_with_bundles

    pairs = write_concept_folder("checkered_star", tmp_path / "ref", n=4, seed=0)
    data = build_concept_set([Concept("<s1>", "star")], [str(p) for p, _ in pairs], [f"<s1>={m}" for _, m in pairs])
    cls = get_method("custom-diffusion")
    # lr 5e-4 x batch 2: the paper's 1e-5 is for SD's 860 M-parameter UNet; on ToyWorld's 5.9 M one, in
    # 80 steps with the method's augmentation and captions, CLIP-I was -0.040 at 1e-5, -0.030 at 1e-4 and
    # 0.315 at 5e-4, against the class word's -0.058 (measured with posterior-mean latents).
    out = train(cls, load_base(None), data, cls.Config(steps=80, batch_size=2, grad_accum=1, lr=5e-4),
                tmp_path / "star.safetensors", progress=False)
    scorer = load_clip(None)  # ToyWorld's evaluator
    refs = scorer.image_embeddings([Image.open(p).convert("RGB") for p, _ in pairs])
    s = SampleSettings(steps=25, guidance=6.0)

    def clip_i(prompt, bundles, name):
        paths = generate(prompt, load_with_bundles(None, bundles), 8, 0, tmp_path / name, s)
        return mean_pairwise_cosine(scorer.image_embeddings([Image.open(p).convert("RGB") for p in paths]), refs)

    learned = clip_i("a <s1> star on a gray background", [str(out)], "learned")
    plain = clip_i("a star on a gray background", [], "plain")
    assert learned > plain + 0.02, (learned, plain)
