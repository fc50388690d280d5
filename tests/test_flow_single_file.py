"""Single-file FLUX.1, SD3 / 3.5 and FLUX.2 [klein] bases (--base FILE.safetensors --base-config DIR) and `bake` on
them: tiny pipelines written in the original layouts (BFL's FLUX names, Stability's MM-DiT names; our writer,
export/original_layout.py) and read back by diffusers' own `from_single_file`, except FLUX.1's transformer, whose
reader in diffusers 0.42 knows only FLUX.1's real widths: there the map is checked against that reader at those
widths instead."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from multiconcept.export.original_layout import original_tensors
from multiconcept.models import SingleFile, load_base
from multiconcept.models.tiny_flow import tiny_flux2_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline

PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
PROMPT = "photo of a <a1> cat and <b1> dog"
# each base's method: Custom Diffusion on FLUX.1 (its K/V deltas land in the fused txt_attn.qkv), LoRA on SD3 with
# both CLIPs' LoRA, LoRA on klein (its single block's fused to_qkv_mlp_proj)
LEARN = {"flux1": ("custom-diffusion", []), "sd3": ("lora", ["-p", "train_text_encoder=true"]),
         "flux2": ("lora", [])}
BUILD = {"flux1": tiny_flux_pipeline,
         # SD3's encoders as its files hold them: CLIP-G wider than CLIP-L, CLIP-L unprojected (tiny_flow.py says why)
         "sd3": lambda: tiny_sd3_pipeline(clip_widths=(12, 20), unprojected_clip_l=True),
         "flux2": tiny_flux2_pipeline}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{architecture: (diffusers folder, single file)} of one random pipeline each."""
    root = tmp_path_factory.mktemp("flow-single-file")
    out = {}
    for arch, build in BUILD.items():
        pipe = build()
        pipe.save_pretrained(root / f"{arch}-folder")
        save_file(original_tensors(pipe, arch), str(root / f"{arch}.safetensors"))
        out[arch] = (str(root / f"{arch}-folder"), str(root / f"{arch}.safetensors"))
    return out


@pytest.fixture(scope="module")
def learned(tiny, tmp_path_factory):
    """{architecture: bundle} learned through the command line on each single file."""
    from multiconcept.cli import main

    root = tmp_path_factory.mktemp("flow-learned")
    a = np.full((32, 32, 3), 128, np.uint8)
    a[4:14, 4:14], a[18:30, 18:30] = (230, 30, 30), (30, 30, 230)
    Image.fromarray(a).save(root / "scene.png")
    for name, box in (("m1", (4, 14)), ("m2", (18, 30))):
        m = np.zeros((32, 32), np.uint8)
        m[box[0]:box[1], box[0]:box[1]] = 255
        Image.fromarray(m).save(root / f"{name}.png")
    out = {}
    for arch, (method, extra) in LEARN.items():
        folder, file = tiny[arch]
        out[arch] = root / f"{arch}.safetensors"
        main(["learn", "-m", method, "-c", "<a1>=cat", "-c", "<b1>=dog", "-i", str(root / "scene.png"),
              "--mask", f"<a1>={root / 'm1.png'}", "--mask", f"<b1>={root / 'm2.png'}", "-o", str(out[arch]),
              "--base", file, "--base-config", folder, "--steps", "2", "--grad-accum", "1", "--lr", "0.05",
              "--no-progress", *extra])
    return out


def image(run_cli, out: Path, *args) -> np.ndarray:
    code, _, err = run_cli("generate", PROMPT, "-n", "1", "--seed", "3", "--steps", "3", "-o", out, *args)
    assert code == 0, err
    return np.asarray(Image.open(out / "000003.png"), dtype=np.int16)


def same_weights(a, b) -> None:
    for part in PARTS:
        x, y = getattr(a.pipe, part, None), getattr(b.pipe, part, None)
        assert (x is None) == (y is None), part
        if x is not None:
            want, got = x.state_dict(), y.state_dict()
            assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), part
    assert (a.fingerprint, a.weights) == (b.fingerprint, b.weights) and set(a.weights) == {"fp16", "bf16"}


# ---------------------------------------------------------------- the layouts


@pytest.mark.parametrize("arch", ["flux1", "sd3", "flux2"])
def test_every_weight_round_trips_through_from_single_file(tiny, arch, tmp_path):
    folder, file = tiny[arch]
    a, b = load_base(folder), load_base(SingleFile(Path(file), folder))
    assert a.architecture == b.architecture == arch
    same_weights(a, b)
    # T5's token table is stored once (`shared`); its encoder reads the same tensor again once loaded
    t5 = getattr(b.pipe, {"flux1": "text_encoder_2", "sd3": "text_encoder_3"}.get(arch, "-"), None)
    assert t5 is None or t5.encoder.embed_tokens.weight is t5.shared.weight
    with safe_open(file, framework="pt") as f:
        keys = {k: f.get_slice(k).get_shape() for k in f.keys()}
    if arch == "flux1":  # ComfyUI's all-in-one FLUX.1 checkpoint; q, k, v fused per stream, linear1 = q, k, v, MLP in
        t = "model.diffusion_model."
        assert keys[t + "double_blocks.1.txt_attn.qkv.weight"] == [3 * 16, 16]
        assert keys[t + "single_blocks.0.linear1.weight"] == [3 * 16 + 64, 16]
        assert {t + "double_blocks.0.img_attn.norm.query_norm.scale", t + "guidance_in.in_layer.weight",
                t + "final_layer.adaLN_modulation.1.weight", "vae.decoder.up.1.block.0.conv1.weight",
                "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
                "text_encoders.t5xxl.transformer.shared.weight"} <= set(keys)
        # BFL's own file is the transformer alone: --base-config gives the VAE, CLIP-L and T5
        alone = tmp_path / "flux1-dev.safetensors"
        save_file({k: v for k, v in load_file(file).items() if k.startswith(t)}, str(alone))
        same_weights(a, load_base(SingleFile(alone, folder)))
    elif arch == "sd3":  # Stability's SD3.5 file with its text encoders
        t = "model.diffusion_model."
        assert keys[t + "joint_blocks.0.context_block.attn.qkv.weight"] == [3 * 16, 16]
        assert keys[t + "joint_blocks.0.x_block.attn2.qkv.weight"] == [3 * 16, 16]  # SD3.5's dual attention
        assert {t + "pos_embed", t + "joint_blocks.1.context_block.adaLN_modulation.1.weight",
                t + "joint_blocks.0.x_block.attn.ln_q.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
                "text_encoders.clip_g.transformer.text_projection.weight",
                "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight"} <= set(keys)
        assert t + "joint_blocks.1.context_block.attn.proj.weight" not in keys  # the last block's text stream ends
    else:  # BFL's klein file: the transformer alone, no prefix
        assert keys["double_blocks.0.img_attn.qkv.weight"] == [3 * 16, 16]
        assert keys["single_blocks.0.linear1.weight"] == [144, 16] and "single_stream_modulation.lin.weight" in keys
        assert all(k.startswith(("double_blocks.", "single_blocks.", "double_stream", "single_stream", "time_in.",
                                 "img_in.", "txt_in.", "final_layer.")) for k in keys)


def test_the_flux1_map_is_what_diffusers_reads_at_flux1_widths():
    """diffusers' FLUX.1 reader (the function from_single_file calls for FluxTransformer2DModel) cuts linear1 at
    FLUX.1 [dev]'s own widths, so our names are checked against it there: FLUX.1 [dev]'s whole geometry (19 double,
    38 single blocks, width 3072) on the meta device, every weight one column wide (the reader cuts rows only)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    from multiconcept.models.flow_layout import transformer_keys
    from multiconcept.models.layout import build

    with init_empty_weights():
        model = FluxTransformer2DModel(guidance_embeds=True)
    assert (len(model.transformer_blocks), len(model.single_transformer_blocks)) == (19, 38)
    g = torch.Generator().manual_seed(0)
    thin = {f"transformer.{k}": torch.randn(v.shape[0], *([1] if v.dim() > 1 else []), generator=g)
            for k, v in model.state_dict().items()}
    original = {"model.diffusion_model." + k: build(s, thin) for k, s in transformer_keys("flux1", model).items()}
    read = SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]["checkpoint_mapping_fn"](checkpoint=original)
    assert not original  # the reader took every tensor we wrote
    assert read.keys() == {k.removeprefix("transformer.") for k in thin}
    assert all(torch.equal(read[k.removeprefix("transformer.")], v) for k, v in thin.items())
