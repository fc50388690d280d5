"""SDXL bases: the tiny SDXL-shaped pipeline, its conditioning, learn -> generate, and architecture checks."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

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


def two_concepts(scene):
    return build_concept_set([Concept("<a1>", "cat"), Concept("<b1>", "dog")], [scene["image"]],
                             [f"<a1>={scene['m1']}", f"<b1>={scene['m2']}"])


def learn(scene, tmp_path, method, base="tiny-sdxl", steps=2, concepts=one_concept, **params):
    cls = get_method(method)
    cfg = cls.Config(steps=steps, grad_accum=1, batch_size=1, scale_lr=False, checkpoint_every=0, **{"lr": 5e-2, **params})
    return train(cls, load_base(base), concepts(scene), cfg, tmp_path / f"{method}-{base}.safetensors", progress=False)


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

    with pytest.raises(UserError) as e:  # the reverse direction is the next test
        load_with_bundles("tiny", [str(out)])
    assert "SDXL" in str(e.value) and "SD 1.x" in str(e.value) and "\n" not in str(e.value)


def test_an_sd1_bundle_is_refused_on_sdxl_naming_both(scene, tmp_path):
    out = learn(scene, tmp_path, "textual-inversion", base="tiny", steps=1)
    with pytest.raises(UserError) as e:
        load_with_bundles("tiny-sdxl", [str(out)])
    assert "SD 1.x" in str(e.value) and "SDXL" in str(e.value) and "\n" not in str(e.value)


def test_infusion_learns_residuals_on_every_sdxl_cross_attention_layer(scene, tmp_path, run_cli):
    # no mask: Infusion derives one from the SDXL UNet's attention (both encoders, pooled text, time ids)
    out = tmp_path / "i.safetensors"
    code, _, err = run_cli("learn", "-m", "infusion", "-c", "<a1>=cat", "-i", scene["image"], "--base", "tiny-sdxl",
                           "-o", out, "--param", "steps=2", "--param", "lr=0.05")
    assert code == 0, err
    bundle = load_bundle(out)
    base = load_base("tiny-sdxl")
    layers = [n for n, _ in base.unet.named_modules() if n.endswith(".attn2")]
    values = bundle.with_prefix("value_residual/cat/")
    assert bundle.architecture == "sdxl" and bundle.extra["derived_masks"] == 1
    assert sorted(values) == sorted(layers) and all(v.abs().max() > 0 for v in values.values())

    def draw(prompt, bundles, folder):
        args = ["generate", prompt, "--base", "tiny-sdxl", "--steps", "2", "-o", tmp_path / folder, *bundles]
        assert run_cli(*args)[0] == 0
        return np.asarray(Image.open(tmp_path / folder / "000000.png"), dtype=np.int16)

    # the class word carries the concept; a prompt without it is drawn exactly as by the base
    assert np.abs(draw("photo of a cat", ["-b", out], "a") - draw("photo of a cat", [], "b")).max() > 2
    assert np.array_equal(draw("photo of a dog", ["-b", out], "c"), draw("photo of a dog", [], "d"))


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


# ---------------------------------------------------------------- exports

PROMPT = "photo of a <a1> cat and <b1> dog"
EXPORTABLE = {"textual-inversion": {}, "custom-diffusion": {"lr": 1e-3}, "lora": {"train_text_encoder": True},
              "disendiff": {"attention_resolution": 8, "train_qkv": True}}


def ours(bundle, folder) -> np.ndarray:
    loaded = load_with_bundles("tiny-sdxl", [str(bundle)])
    path = generate(PROMPT, loaded, 1, 3, folder, SampleSettings(steps=3, guidance=6.0))[0]
    return np.asarray(Image.open(path), dtype=np.int16)


def plain_diffusers(load=None) -> np.ndarray:
    """A fresh SDXL pipeline, what an export's README tells a diffusers user to load into it, one image
    (with DDIM, generate's default; the tiny SDXL pipeline ships Euler, as SDXL does)."""
    from diffusers import DDIMScheduler

    pipe = load_base("tiny-sdxl").pipe
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if load is not None:
        load(pipe)
    img = pipe(PROMPT, num_inference_steps=3, guidance_scale=6.0, generator=torch.Generator().manual_seed(3)).images[0]
    return np.asarray(img, dtype=np.int16)


@pytest.mark.parametrize("method", list(EXPORTABLE))
def test_every_sdxl_export_gives_the_same_images_in_plain_diffusers(scene, tmp_path, method):
    from multiconcept.export import export_diffusers, load_exported_into

    bundle = learn(scene, tmp_path, method, concepts=two_concepts, **EXPORTABLE[method])
    want = ours(bundle, tmp_path / "ours")
    export_diffusers(bundle, load_base("tiny-sdxl"), tmp_path / "exp")
    for word in ("a1", "b1"):  # each token's two rows in one file, as A1111, ComfyUI and kohya's SDXL scripts read it
        rows = load_file(str(tmp_path / "exp" / f"{word}.safetensors"))
        assert {k: tuple(v.shape) for k, v in rows.items()} == {"clip_l": (1, 32), "clip_g": (1, 32)}
    assert "StableDiffusionXLPipeline" in (tmp_path / "exp" / "README.md").read_text()
    got = plain_diffusers(lambda pipe: load_exported_into(pipe, tmp_path / "exp", ["<a1>", "<b1>"]))
    assert np.abs(want - got).max() <= 2, np.abs(want - got).max()
    assert np.abs(want - plain_diffusers()).max() > 2  # and the concepts changed the image


def sgm_target(stem: str, layers_per_block: int) -> str | None:
    """Where a kohya SDXL key lands in diffusers' UNet, by the original model's numbering (input_blocks.0 is
    conv_in; per level, the layers and a downsampler; output blocks one layer more and no separate upsampler)."""
    import re

    step = layers_per_block + 1
    for pattern, to in (
            (r"lora_unet_input_blocks_(\d+)_1_(.+)",
             lambda i, r: f"down_blocks.{(i - 1) // step}.attentions.{(i - 1) % step}.{r}"),
            (r"lora_unet_middle_block_1_(.+)", lambda r: f"mid_block.attentions.0.{r}"),
            (r"lora_unet_output_blocks_(\d+)_1_(.+)", lambda i, r: f"up_blocks.{i // step}.attentions.{i % step}.{r}")):
        m = re.fullmatch(pattern, stem)
        if m:
            return to(*[int(g) if g.isdigit() else g for g in m.groups()])
    return None


@pytest.mark.parametrize("method", ["lora", "disendiff"])
def test_sdxl_kohya_export_names_modules_as_kohyas_sdxl_scripts_and_loads_back(scene, tmp_path, run_cli, method):
    from multiconcept.export import export_for_tools

    bundle = learn(scene, tmp_path, method, concepts=two_concepts, **EXPORTABLE[method])
    want = ours(bundle, tmp_path / "ours")
    base = load_base("tiny-sdxl")
    result = export_for_tools(bundle, base, tmp_path / "exp", tool="kohya", rank=None)
    lora = tmp_path / "exp" / "loras" / f"{result.lora}.safetensors"
    sd = load_file(str(lora))
    stems = {k.split(".", 1)[0] for k in sd}
    unet_modules = {n for n, _ in base.unet.named_modules()}
    unet = {s for s in stems if s.startswith("lora_unet_")}
    # the original model's names, each landing on an attention projection of this UNet (the key with its
    # module path's dots as underscores, which the numbering can be checked against)
    assert unet and all(sgm_target(s, 1) for s in unet), sorted(unet)[:3]
    assert {sgm_target(s, 1).replace(".", "_") for s in unet} <= {m.replace(".", "_") for m in unet_modules}
    if method == "lora":  # both text encoders, kohya's SDXL prefixes
        assert any(s.startswith("lora_te1_text_model_encoder_layers_") for s in stems)
        assert any(s.startswith("lora_te2_text_model_encoder_layers_") for s in stems)
    for word in ("a1", "b1"):
        assert set(load_file(str(tmp_path / "exp" / "embeddings" / f"{word}.safetensors"))) == {"clip_l", "clip_g"}
    readme = (tmp_path / "exp" / "README.md").read_text()
    assert "sdxl_gen_img.py" in readme and 'rows["clip_g"]' in readme

    def load(pipe):  # the README's diffusers code
        for word in ("a1", "b1"):
            rows = load_file(str(tmp_path / "exp" / "embeddings" / f"{word}.safetensors"))
            pairs = (("clip_l", pipe.text_encoder, pipe.tokenizer), ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2))
            for key, te, tok in pairs:
                pipe.load_textual_inversion(rows[key], token=f"<{word}>", text_encoder=te, tokenizer=tok)
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)

    assert np.abs(want - plain_diffusers(load)).max() <= 2
    # and back in through generate --lora / --embedding, no bundle
    code, _, err = run_cli("generate", PROMPT, "--base", "tiny-sdxl", "--lora", lora, "--steps", "3",
                           "--embedding", tmp_path / "exp" / "embeddings" / "a1.safetensors",
                           "--embedding", f"<b1>={tmp_path / 'exp' / 'embeddings' / 'b1.safetensors'}",
                           "-n", "1", "--seed", "3", "-o", tmp_path / "back")
    assert code == 0, err
    back = np.asarray(Image.open(tmp_path / "back" / "000003.png"), dtype=np.int16)
    assert np.abs(want - back).max() <= 2


def test_an_sd_embedding_on_sdxl_and_the_reverse_are_one_line_each(scene, tmp_path, run_cli):
    from safetensors.torch import save_file

    save_file({"emb_params": torch.zeros(1, 32)}, tmp_path / "sd.safetensors")
    save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 32)}, tmp_path / "xl.safetensors")
    for base, emb, says in (("tiny-sdxl", "sd.safetensors", "is not an SDXL embedding"),
                            ("tiny", "xl.safetensors", "is for SDXL (clip_l and clip_g)")):
        code, _, err = run_cli("generate", "a <x> cat", "--base", base, "--embedding", f"<x>={tmp_path / emb}",
                               "-n", "1", "--steps", "1", "-o", tmp_path / base)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
