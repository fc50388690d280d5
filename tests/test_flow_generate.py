"""Generation and attention maps on the tiny FLUX.1, FLUX.2 [klein] and SD3 pipelines: the joint-attention capture
processor against the base's own processor, bundles of every method through `generate`, heatmaps, the demo page."""

import numpy as np
import pytest
import torch
from PIL import Image

from multiconcept.attention import AttentionStore
from multiconcept.joint_attention import capture_joint_attention, joint_qkv
from multiconcept.models import load_base

FLOW_BASES = ["tiny-flux", "tiny-flux2", "tiny-sd3"]


def block_inputs(base, name: str):
    """The first joint block's attention module and the inputs it gets in one transformer call."""
    attn = base.flow.text_attention(base.denoiser)[name]
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs)
        seen["args"] = args

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    z = torch.randn((1, 16, 8, 8) if base.architecture == "flux2" else (1, 4, 16, 16),
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden, pooled = base.flow.encode(base.pipe, ["photo of a red cat"], base.sequence_length)
        out = base.flow.predict(base.pipe, z, torch.tensor([600.0]), hidden, pooled, 3.5)
    handle.remove()
    return attn, seen, (z, hidden, pooled, out)


@pytest.mark.parametrize("name", FLOW_BASES)
def test_captured_probabilities_times_v_are_the_blocks_sdpa_output(name):
    """With the q/k norms and rotary embedding the base's processor applies, the joint softmax times V (then the
    output projections) is what the block's own SDPA processor returns; the captured map is that softmax's
    image-query x text-key block renormalised over the text keys; and a captured forward equals an uncaptured one."""
    base = load_base(name)
    block = "transformer_blocks.1.attn"
    attn, seen, (z, hidden, pooled, plain_out) = block_inputs(base, block)
    x, text = seen["hidden_states"], seen["encoder_hidden_states"]
    rotary = seen.get("image_rotary_emb")
    text_first = base.flow.text_first
    with torch.no_grad():
        theirs_img, theirs_txt = attn.processor(attn, x, text, None, rotary)
        q, k, v = joint_qkv(attn, x, text, rotary, text_first)
        probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)  # batch heads query key, every key
        out = (probs @ v).transpose(1, 2).flatten(2)
        n = text.shape[1]
        img, txt = (out[:, n:], out[:, :n]) if text_first else (out[:, :-n], out[:, -n:])
        ours_img = attn.to_out[0](img)
        ours_txt = txt if getattr(attn, "context_pre_only", False) else attn.to_add_out(txt)
        image_q = slice(n, None) if text_first else slice(0, -n)
        text_k = slice(0, n) if text_first else slice(-n, None)
        block_probs = probs[:, :, image_q, text_k]
        renormalised = block_probs / block_probs.sum(-1, keepdim=True)
    assert torch.allclose(ours_img, theirs_img, atol=1e-5) and torch.allclose(ours_txt, theirs_txt, atol=1e-5)

    store = AttentionStore()
    with capture_joint_attention(base.denoiser, store, base.flow, blocks=[block]), torch.no_grad():
        captured_out = base.flow.predict(base.pipe, z, torch.tensor([600.0]), hidden, pooled, 3.5)
    assert torch.allclose(captured_out, plain_out, atol=1e-5)
    (maps,) = store.layer_maps().values()  # batch heads token h w
    h, w = store.latent_hw
    expected = renormalised.transpose(-1, -2).reshape(*renormalised.shape[:2], n, h, w)
    assert torch.allclose(maps, expected, atol=1e-5)
    assert type(attn.processor).__name__ != "JointCaptureProcessor"  # restored


def learn(scene, tmp_path, base: str, method: str, **params):
    from multiconcept.data import build_concept_set
    from multiconcept.methods import get_method
    from multiconcept.methods.finetune import train
    from multiconcept.prompts import Concept

    cls = get_method(method)
    cfg = cls.Config(**{"steps": 2, "grad_accum": 1, "batch_size": 1, "scale_lr": False, "checkpoint_every": 0,
                        "lr": 5e-2, **params})
    data = build_concept_set([Concept("<a1>", "cat")], [scene["image"]], [f"<a1>={scene['m1']}"])
    return train(cls, load_base(base), data, cfg, tmp_path / f"{method}-{base}.safetensors", progress=False)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.parametrize("name", FLOW_BASES)
def test_generate_with_bundles_and_attention_maps(scene, tmp_path, run_cli, name):
    """A Textual Inversion bundle and a LoRA bundle together through `multiconcept generate`: the image differs from
    the base's, the PNG names the flow scheduler, and every prompt token has a heatmap."""
    from multiconcept.workflows.generate import read_png_metadata

    ti = learn(scene, tmp_path, name, "textual-inversion")
    lora = learn(scene, tmp_path, name, "lora", lr=5e-3)
    # the two bundles define the same token: LoRA's under another name
    lora2 = tmp_path / "lora2.safetensors"
    from multiconcept.bundle import load_bundle, save_bundle

    b = load_bundle(lora)
    b.tokens = ["<b1>"]
    b.tensors = {k.replace("<a1>", "<b1>"): v for k, v in b.tensors.items()}
    save_bundle(b, lora2)
    args = ["generate", "photo of a <a1> cat and <b1> cat", "--base", name, "--steps", "2", "-n", "1"]
    code, _, err = run_cli(*args, "-b", ti, "-b", lora2, "-o", tmp_path / "with", "--attention-maps")
    assert code == 0, err
    code, _, err = run_cli("generate", "photo of a cat", "--base", name, "--steps", "2", "-n", "1", "-o", tmp_path / "base")
    assert code == 0, err
    assert np.abs(pixels(tmp_path / "with" / "000000.png") - pixels(tmp_path / "base" / "000000.png")).max() > 0
    assert read_png_metadata(tmp_path / "with" / "000000.png")["scheduler"] == "flow-euler"
    maps = sorted((tmp_path / "with" / "attention").glob("000000_*.png"))
    labels = [p.stem.split("_", 2)[2] for p in maps]
    assert "a1" in labels and "b1" in labels, labels


@pytest.mark.parametrize("name", FLOW_BASES)
def test_infusion_generates_only_where_the_class_word_is(scene, tmp_path, run_cli, name):
    out = learn(scene, tmp_path, name, "infusion")

    def draw(prompt, bundles, folder):
        args = ["generate", prompt, "--base", name, "--steps", "2", "-n", "1", "--guidance", "3", "-o", tmp_path / folder]
        assert run_cli(*args, *bundles)[0] == 0
        return pixels(tmp_path / folder / "000000.png")

    assert np.abs(draw("photo of a cat", ["-b", out], "a") - draw("photo of a cat", [], "b")).max() > 0
    assert np.array_equal(draw("photo of a dog", ["-b", out], "c"), draw("photo of a dog", [], "d"))


def test_a_scheduler_of_the_other_family_is_refused(run_cli, tmp_path):
    code, _, err = run_cli("generate", "a cat", "--base", "tiny-flux", "--scheduler", "ddim", "-o", tmp_path / "x")
    assert code == 2 and "flow-euler" in err and len(err.strip().splitlines()) == 1


def test_demo_page_on_a_flow_base(tmp_path):
    from multiconcept.workflows.demo import run_demo

    page = run_demo(tmp_path / "demo", base="tiny-sd3", steps=2, n_images=1)
    html = page.read_text()
    heatmaps = sorted((tmp_path / "demo" / "images" / "attention").glob("both_*.png"))
    section = html[html.index("Attention heatmaps"):]
    # every heatmap of the first image is on the page, captioned with its token (s1, s2: the two concepts)
    assert heatmaps and section.count("<figure>") >= len(heatmaps)
    assert "_s1</figcaption>" in section and "_s2</figcaption>" in section
    assert "flow-euler" in html
