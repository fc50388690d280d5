"""SDXL bases: the tiny SDXL-shaped pipeline, its conditioning, learn -> generate, and architecture checks."""

import pytest
import torch

from multiconcept.bundle import load_bundle
from multiconcept.data import build_concept_set
from multiconcept.errors import UserError
from multiconcept.methods import get_method
from multiconcept.methods.finetune import train
from multiconcept.models import load_base
from multiconcept.models.conditioning import added_conditioning, encode_prompts, micro_conditioning
from multiconcept.prompts import Concept
from multiconcept.workflows.generate import SampleSettings, generate, load_with_bundles


@pytest.fixture(scope="module")
def sdxl_base():
    return load_base("tiny-sdxl")


def test_tiny_sdxl_is_recognised_as_sdxl_and_sd_stays_sd1(sdxl_base):
    assert sdxl_base.architecture == "sdxl" and len(sdxl_base.text_encoders) == 2
    assert sdxl_base.unet.config.addition_embed_type == "text_time"
    assert load_base("tiny").architecture == "sd1"


def test_conditioning_is_what_the_sdxl_pipeline_builds(sdxl_base):
    """Our encoder (used by training and generation) against diffusers' own encode_prompt and time ids."""
    prompt, h, w = "photo of a red cat", 32, 32
    with torch.no_grad():
        ours = encode_prompts(sdxl_base, [prompt])
        embeds, _, pooled, _ = sdxl_base.pipe.encode_prompt(prompt, device=sdxl_base.device,
                                                             do_classifier_free_guidance=False)
    assert ours.hidden.shape[-1] == sdxl_base.unet.config.cross_attention_dim
    assert torch.equal(ours.hidden, embeds) and torch.equal(ours.pooled, pooled)
    m = micro_conditioning(h, w)
    theirs = sdxl_base.pipe._get_add_time_ids(m["original_size"], m["crops_coords_top_left"], m["target_size"],
                                              dtype=pooled.dtype, text_encoder_projection_dim=pooled.shape[-1])
    assert torch.equal(added_conditioning(sdxl_base, pooled, h, w)["time_ids"], theirs)


def one_concept(scene):
    return build_concept_set([Concept("<a1>", "cat")], [scene["image"]], [f"<a1>={scene['m1']}"])


def learn(scene, tmp_path, method, base="tiny-sdxl", steps=2):
    cls = get_method(method)
    cfg = cls.Config(steps=steps, grad_accum=1, batch_size=1, lr=5e-2, scale_lr=False, checkpoint_every=0)
    return train(cls, load_base(base), one_concept(scene), cfg, tmp_path / f"{method}-{base}.safetensors", progress=False)


def test_textual_inversion_learns_both_encoders_rows_and_generates(scene, tmp_path):
    out = learn(scene, tmp_path, "textual-inversion")
    bundle = load_bundle(out)
    assert bundle.architecture == "sdxl"
    fresh = load_base("tiny-sdxl")
    rows = [bundle.tensors["token_embedding/<a1>"], bundle.tensors["token_embedding_2/<a1>"]]
    for tok, te, row in zip(fresh.tokenizers, fresh.text_encoders, rows):
        # each row starts at its own encoder's embedding of the class word; both must have moved
        start = te.get_input_embeddings().weight[tok("cat", add_special_tokens=False)["input_ids"]].mean(0)
        assert row.shape == start.shape and not torch.allclose(row, start)

    loaded = load_with_bundles("tiny-sdxl", [str(out)])
    for tok, te, row in zip(loaded.base.tokenizers, loaded.base.text_encoders, rows):
        assert torch.equal(te.get_input_embeddings().weight[tok.convert_tokens_to_ids("<a1>")], row)
    paths = generate("photo of a <a1> cat", loaded, 1, 0, tmp_path / "img", SampleSettings(steps=2, guidance=3.0))
    assert paths[0].is_file()

    from multiconcept.export.diffusers import export_diffusers

    with pytest.raises(UserError, match="SDXL base, which export does not write yet"):
        export_diffusers(out, loaded.base, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()

    with pytest.raises(UserError) as e:  # the reverse direction is the next test
        load_with_bundles("tiny", [str(out)])
    assert "SDXL" in str(e.value) and "SD 1.x" in str(e.value) and "\n" not in str(e.value)


def test_an_sd1_bundle_is_refused_on_sdxl_naming_both(scene, tmp_path):
    out = learn(scene, tmp_path, "textual-inversion", base="tiny", steps=1)
    with pytest.raises(UserError) as e:
        load_with_bundles("tiny-sdxl", [str(out)])
    assert "SD 1.x" in str(e.value) and "SDXL" in str(e.value) and "\n" not in str(e.value)


def test_infusion_is_refused_on_sdxl_in_one_line(scene, tmp_path, run_cli):
    # no mask: Infusion would derive one from the UNet's attention before training
    code, _, err = run_cli("learn", "-m", "infusion", "-c", "<a1>=cat", "-i", scene["image"], "--base", "tiny-sdxl",
                           "-o", tmp_path / "i.safetensors", "--param", "steps=1")
    assert code == 2 and "infusion does not run on SDXL bases yet" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.safetensors"))


def test_lora_learns_on_the_sdxl_unet_and_generates(scene, tmp_path):
    out = learn(scene, tmp_path, "lora")
    bundle = load_bundle(out)
    assert {"token_embedding/<a1>", "token_embedding_2/<a1>"} <= set(bundle.tensors)
    trained = {k: v for k, v in bundle.tensors.items() if k.startswith("lora/unet.") and "lora_B" in k}
    assert any("attn2" in k for k in trained) and any(v.abs().max() > 0 for v in trained.values())  # B starts at 0
    loaded = load_with_bundles("tiny-sdxl", [str(out)])
    assert loaded.base.lora_adapters
    paths = generate("photo of a <a1> cat", loaded, 1, 0, tmp_path / "img", SampleSettings(steps=2, guidance=3.0))
    assert paths[0].is_file()
