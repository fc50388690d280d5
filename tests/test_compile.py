"""`--compile on`: a compiled training step agrees with an eager one, attention capture stays out of the graph
without retracing it, and a bad value is one line (models/compiled.py)."""

import pytest
import torch
from torch._dynamo.utils import counters

from multiconcept.data import build_concept_set
from multiconcept.methods import get_method
from multiconcept.methods.finetune import Trainer
from multiconcept.models import load_base
from multiconcept.models.compiled import compile_denoiser, is_compiled
from multiconcept.prompts import Concept


def disendiff_step(scene):
    """DisenDiff on the tiny base: tokens, attn2 K/V, and its losses on captured maps (every kind of part a
    compiled step must carry). Returns a function of step -> (loss, gradients), the trainer and the base."""
    torch.manual_seed(0)
    base = load_base("tiny")
    data = build_concept_set([Concept("<s1>", "square"), Concept("<s2>", "box")], [scene["image"]],
                             [f"<s1>={scene['m1']}", f"<s2>={scene['m2']}"])
    cls = get_method("disendiff")
    m = cls(base, data, cls.Config(batch_size=2, grad_accum=1, augment=False, attention_resolution=16))
    params = [p for g in m.setup() for p in g["params"]]
    tr = Trainer(m, base, data, m.cfg)

    def step(s: int):
        for p in params:
            p.grad = None
        loss, logs = tr.loss(tr.batch(s, 0), torch.Generator().manual_seed(s))
        loss.backward()
        return loss.detach(), logs, [p.grad.clone() for p in params]

    return step, base


def test_compiled_step_agrees_with_eager_and_capture_does_not_retrace(scene):
    step, base = disendiff_step(scene)
    eager = [step(s) for s in (0, 1, 2)]
    undo = compile_denoiser(base.denoiser, "on")
    assert is_compiled(base.denoiser)
    graphs = counters["stats"]["unique_graphs"]
    compiled = [step(s) for s in (0, 1)]
    traced = counters["stats"]["unique_graphs"] - graphs
    assert traced > 0  # the blocks really went through torch.compile
    compiled.append(step(2))  # a third step: new capture processors, same graphs
    assert counters["stats"]["unique_graphs"] - graphs == traced
    for (le, logs_e, ge), (lc, logs_c, gc) in zip(eager, compiled):
        assert torch.allclose(le, lc, rtol=1e-4, atol=1e-6)
        assert logs_c["bind"] == pytest.approx(logs_e["bind"], rel=1e-4, abs=1e-6)  # maps captured while compiled
        for a, b in zip(ge, gc):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)
    undo()
    assert not is_compiled(base.denoiser)
    again = step(0)
    assert torch.equal(again[0], eager[0][0])  # eager again, bit for bit


@pytest.mark.parametrize("verb", ["learn", "generate"])
def test_a_bad_compile_value_is_one_line(scene, run_cli, tmp_path, verb):
    if verb == "learn":
        args = ["learn", "-m", "textual-inversion", "-c", "<s1>=square", "-i", scene["image"], "-o",
                tmp_path / "b.safetensors", "--base", "tiny", "--steps", "1"]
    else:
        args = ["generate", "a square", "--base", "tiny", "-o", tmp_path / "out", "-n", "1", "--steps", "1"]
    code, _, err = run_cli(*args, "--compile", "maybe")
    assert code == 2
    assert err.strip().count("\n") == 0 and "compile" in err and "maybe" in err
    assert not (tmp_path / "b.safetensors").exists() and not (tmp_path / "out").exists()


def test_a_compiled_run_resumes_bit_identical_and_only_compiled(scene, tmp_path):
    from multiconcept import UserError
    from multiconcept.bundle import load_bundle
    from multiconcept.methods.finetune import train

    cls = get_method("custom-diffusion")
    data = lambda: build_concept_set([Concept("<s1>", "square")], [scene["image"]], [f"<s1>={scene['m1']}"])
    cfg = cls.Config(steps=4, grad_accum=1, batch_size=2, augment=False, checkpoint_every=2, compile="on")
    full = load_bundle(train(cls, load_base("tiny"), data(), cfg, tmp_path / "full.safetensors", progress=False))
    part = tmp_path / "part.safetensors"
    assert train(cls, load_base("tiny"), data(), cfg, part, progress=False, stop_after=2) is None
    with pytest.raises(UserError, match="made with other settings"):  # an eager resume would drift in the last bits
        train(cls, load_base("tiny"), data(), cls.Config(**{**vars(cfg), "compile": "off"}), part, progress=False,
              resume=True)
    resumed = load_bundle(train(cls, load_base("tiny"), data(), cfg, part, progress=False, resume=True))
    assert full.tensors.keys() == resumed.tensors.keys()
    assert all(torch.equal(full.tensors[k], resumed.tensors[k]) for k in full.tensors)
    assert resumed.hyperparameters["compile"] == "on"


def test_the_toyworld_build_refuses_a_bad_compile_value_and_resumes_either_way():
    from multiconcept import UserError
    from multiconcept.workflows.toyworld_build.settings import BuildConfig, stage_digest

    with pytest.raises(UserError, match=r"compile \(--compile\) must be one of off, on, got 'maybe'"):
        BuildConfig(compile="maybe")
    # a runtime field, as threads: a build started before the setting existed resumes with it
    assert stage_digest(BuildConfig(compile="on"), "unet") == stage_digest(BuildConfig(), "unet")


def test_compiled_sampling_draws_the_eager_images_and_maps():
    import numpy as np

    from multiconcept.workflows.generate import Loaded, SampleSettings, draw

    loaded = Loaded(load_base("tiny"))
    runs = {}
    for mode in ("off", "on"):
        got = list(draw("a square and a box", loaded, 2, 0, SampleSettings(steps=2, batch_size=2, compile=mode),
                        attention_maps=True))
        runs[mode] = ([np.asarray(img, dtype=np.int16) for _, img, _, _ in got], got[0][2].maps(16))
    assert not is_compiled(loaded.base.denoiser)  # undone after sampling
    for a, b in zip(runs["off"][0], runs["on"][0]):
        assert np.abs(a - b).max() <= 2
    assert torch.allclose(runs["off"][1], runs["on"][1], rtol=1e-3, atol=1e-5)  # maps captured while compiled


def test_the_demo_compiles_its_training_only(tmp_path, monkeypatch):
    """`demo --compile on`: the setting reaches learning (and the page's settings), never the demo's sampling,
    whose 12 images cost less eager than a whole-UNet compile (docs/speed.md)."""
    from multiconcept.workflows import demo

    learned, sampled = [], []
    real_learn, real_generate = demo.learn_concepts, demo.generate

    def learn(method, data, out, settings, **kw):
        learned.append(settings["compile"])
        return real_learn(method, data, out, settings={**settings, "compile": "off"}, **kw)  # compiling is tested above

    def generate(prompt, loaded, n, seed, out, settings, **kw):
        sampled.append(settings.compile)
        return real_generate(prompt, loaded, n, seed, out, settings, **kw)

    monkeypatch.setattr(demo, "learn_concepts", learn)
    monkeypatch.setattr(demo, "generate", generate)
    demo.run_demo(tmp_path / "demo", base="tiny", steps=1, n_images=1, compile="on")
    assert learned == ["on"] and sampled == ["off"] * 3
    assert "compile=on" in (tmp_path / "demo" / "index.html").read_text()
