"""The shipped ToyWorld base: it loads offline, it draws the kind and body colour a prompt names (read back
by the analytic checker), and a short learning run on it moves generations toward a concept's parts.
Skipped until the weights are in the package (multiconcept toyworld build)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from multiconcept.models import load_base, toyworld_available

pytestmark = pytest.mark.skipif(not toyworld_available(), reason="needs the ToyWorld base (multiconcept toyworld build)")


def readings(pipe, prompts: list[str], seed: int = 0):
    """The checker's subjects in each generated image (25 DDIM steps, guidance 4, as the build samples)."""
    import torch

    from multiconcept.toyworld import analyse

    images = pipe(prompts, num_inference_steps=25, guidance_scale=4.0, height=64, width=64, output_type="np",
                  generator=[torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]).images
    return [analyse((img * 255).round().astype(np.uint8)).subjects for img in images]


def test_shipped_base_loads_offline_and_draws_the_prompted_body_colour(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = load_base(None)  # the default base
    assert base.name == "toyworld" and base.resolution == 64
    pipe = base.pipe
    pipe.set_progress_bar_config(disable=True)

    def red_rate(prompt):
        return float(np.mean([any(s.parts["body_colour"] == "red" for s in found)
                              for found in readings(pipe, [prompt] * 8)]))
    red = red_rate("a red robot in the center on a gray background")
    red_when_blue = red_rate("a blue robot in the center on a gray background")
    assert red >= 0.6 and red_when_blue <= 0.25, (red, red_when_blue)


def test_shipped_base_draws_the_prompted_kind_with_and_without_a_colour_word():
    pipe = load_base(None).pipe
    pipe.set_progress_bar_config(disable=True)
    prompts = [("a blue robot on a white background", "robot"), ("a bird on a gray background", "bird"),
               ("a ghost on a black background", "ghost"), ("a green bird in the center on a beige background", "bird"),
               ("a yellow ghost in the center on a gray background", "ghost"), ("a robot on a beige background", "robot")]
    found = readings(pipe, [p for p, _ in prompts])
    hits = sum(any(s.kind == kind for s in f) for f, (_, kind) in zip(found, prompts))
    assert hits >= 4, [[s.kind for s in f] for f in found]


def test_a_pair_prompt_draws_two_subjects_of_the_asked_kinds():
    pipe = load_base(None).pipe
    pipe.set_progress_bar_config(disable=True)
    found = readings(pipe, ["a red robot on the left and a blue bird on the right on a gray background"] * 4, seed=10)
    both = [sorted(str(s.kind) for s in f) == ["bird", "robot"] for f in found]
    assert sum(both) >= 2, [[(s.kind, s.parts["body_colour"]) for s in f] for f in found]


def test_short_learning_run_moves_generations_toward_the_concepts_parts(tmp_path):
    """The parts no word names (head colour, hat, marking and its colour) are the concept's identity: after
    Custom Diffusion learns a personal robot from four references, "a <s1> robot" draws more of them than
    "a robot" does (the base draws each of them at about chance)."""
    from multiconcept.data import build_concept_set
    from multiconcept.methods import get_method
    from multiconcept.methods.finetune import train
    from multiconcept.prompts import Concept
    from multiconcept.toyworld import UNNAMED_PARTS, analyse, concept, identity, match, write_concept_folder
    from multiconcept.workflows.generate import SampleSettings, generate, load_with_bundles

    robot = concept("robot_b").creature
    pairs = write_concept_folder("robot_b", tmp_path / "ref", n=4, seed=0)
    data = build_concept_set([Concept("<s1>", "robot")], [str(p) for p, _ in pairs], [f"<s1>={m}" for _, m in pairs])
    cls = get_method("custom-diffusion")
    # the pilots' ToyWorld settings (benchmarks/creatures_pilots.py): captions in the world's words, no
    # augmentation (the base draws one subject at one size, centred), lr 1e-4 x batch 2, 250 steps
    cfg = cls.Config(steps=250, batch_size=2, grad_accum=1, lr=1e-4, augment=False, templates=("a {}",))
    out = train(cls, load_base(None), data, cfg, tmp_path / "robot.safetensors", progress=False)
    s = SampleSettings(steps=25, guidance=4.0)

    def unnamed_identity(prompt, bundles, name):
        paths = generate(prompt, load_with_bundles(None, bundles), 8, 0, tmp_path / name, s)
        found = [analyse(np.asarray(Image.open(p).convert("RGB"))).subjects for p in paths]
        return float(np.mean([identity(match(f, [robot])[0], robot, UNNAMED_PARTS) for f in found]))

    learned = unnamed_identity("a <s1> robot on a gray background", [str(out)], "learned")
    plain = unnamed_identity("a robot on a gray background", [], "plain")
    assert learned > plain + 0.15, (learned, plain)
