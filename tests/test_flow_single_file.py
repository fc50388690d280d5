"""Single-file FLUX.1, SD3 / 3.5 and FLUX.2 [klein] bases (--base FILE.safetensors --base-config DIR) and `bake` on
them: tiny pipelines written in the original layouts (BFL's FLUX names, Stability's MM-DiT names; our writer,
export/original_layout.py) and read back by diffusers' own `from_single_file`, except FLUX.1's transformer, whose
reader in diffusers 0.42 knows only FLUX.1's real widths: there the map is checked against that reader at those
widths instead."""

import re
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
# the same weights read into other memory (from_pretrained's, or ours from the file) may take other BLAS kernels and
# round the last bit otherwise: images within a level (cloning both sides' weights makes them equal)
SAME_WEIGHTS_ELSEWHERE = 1
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
def learned(tiny, module_scene, tmp_path_factory):
    """{architecture: bundle} learned through the command line on each single file (at 32 px: a saved FLUX
    pipeline's native size is its class's 1024 px default halved by the tiny VAE, 256)."""
    from multiconcept.cli import main

    root = tmp_path_factory.mktemp("flow-learned")
    out = {}
    for arch, (method, extra) in LEARN.items():
        folder, file = tiny[arch]
        out[arch] = root / f"{arch}.safetensors"
        main(["learn", "-m", method, "-c", "<a1>=cat", "-c", "<b1>=dog", "-i", module_scene["image"],
              "--mask", f"<a1>={module_scene['m1']}", "--mask", f"<b1>={module_scene['m2']}", "-o", str(out[arch]),
              "--base", file, "--base-config", folder, "--steps", "2", "--grad-accum", "1", "--lr", "0.05",
              "-p", "resolution=32", "--no-progress", *extra])
    return out


def image(out: Path, base, bundles=(), embeddings=()) -> np.ndarray:
    """What `generate` draws (the command line has no size option, and a saved FLUX pipeline's native size is 256 px,
    its class's default): 32 px, 3 steps, seed 3."""
    from multiconcept.workflows.external import add_embedding
    from multiconcept.workflows.generate import SampleSettings, generate, load_with_bundles

    loaded = load_with_bundles(base, [str(b) for b in bundles])
    for e in embeddings:
        add_embedding(loaded, str(e))
    path = generate(PROMPT, loaded, 1, 3, out, SampleSettings(steps=3, height=32, width=32))[0]
    return np.asarray(Image.open(path), dtype=np.int16)


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


# ---------------------------------------------------------------- learn, generate and bake on a single file


@pytest.mark.parametrize("arch", ["flux1", "sd3", "flux2"])
def test_a_concept_learned_on_a_single_file_generates_there_and_on_its_folder(tiny, learned, tmp_path, arch):
    from multiconcept.bundle import read_header

    folder, file = tiny[arch]
    header = read_header(learned[arch])
    assert header["base_name"] == file and set(header["base_weights"]) == {"fp16", "bf16"}
    on_file = image(tmp_path / "file", SingleFile(Path(file), folder), [learned[arch]])
    on_folder = image(tmp_path / "folder", folder, [learned[arch]])
    assert np.abs(on_file - on_folder).max() <= SAME_WEIGHTS_ELSEWHERE


# Custom Diffusion's deltas are added as generation adds them (FLUX.1: the same pixels, but for weights in other
# memory); a merged LoRA differs from peft's unmerged one by rounding. Measured (benchmarks/bench_flow_bake.py, 4 seeds,
# 10 steps): FLUX.1 Custom Diffusion 0 levels, SD3 LoRA at most 1 (one pixel in 4,096), klein LoRA at most 1
BAKE_TOLERANCE = {"flux1": SAME_WEIGHTS_ELSEWHERE, "sd3": 2, "flux2": 2}


@pytest.mark.parametrize("arch", ["flux1", "sd3", "flux2"])
def test_a_baked_checkpoint_with_its_embeddings_draws_what_the_bundle_draws(tiny, learned, run_cli, tmp_path, monkeypatch,
                                                                             arch):
    folder, file = tiny[arch]
    base = ["--base", file, "--base-config", folder]
    out = tmp_path / "baked" / "pets.safetensors"
    code, _, err = run_cli("bake", learned[arch], "-o", out, *base)
    assert code == 0, err
    assert {p.relative_to(out.parent).as_posix() for p in out.parent.rglob("*") if p.is_file()} == {
        "pets.safetensors", "pets.README.md", "embeddings/a1.safetensors", "embeddings/b1.safetensors"}
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == set(load_file(file).keys())  # the original layout, every weight
    embeddings = [out.parent / "embeddings" / "a1.safetensors", out.parent / "embeddings" / "b1.safetensors"]
    on_file = SingleFile(Path(file), folder)
    baked = image(tmp_path / "baked-images", SingleFile(out, folder), embeddings=embeddings)
    bundle = image(tmp_path / "bundle-images", on_file, [learned[arch]])
    plain = image(tmp_path / "plain-images", on_file, embeddings=embeddings)
    assert np.abs(baked - bundle).max() <= BAKE_TOLERANCE[arch]
    assert np.abs(plain - bundle).max() > 10  # the weight changes are in the checkpoint, not only in the tokens
    assert load_base(SingleFile(out, folder)).weights != load_base(folder).weights
    readme = (out.parent / "pets.README.md").read_text()
    assert f"--base pets.safetensors --base-config {folder} --embedding embeddings/a1.safetensors" in readme
    if arch != "flux1":  # the README's diffusers code draws the same (FLUX.1's from_single_file: real widths only)
        code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
        monkeypatch.chdir(out.parent)
        scope = {}
        exec(code[: code.index("image = pipe(")], scope)
        pipe, base = scope["pipe"], load_base(folder)
        theirs = pipe(prompt=[PROMPT], num_inference_steps=3, guidance_scale=6.0, height=32, width=32,
                      max_sequence_length=base.sequence_length, generator=[torch.Generator().manual_seed(3)]).images[0]
        assert np.abs(np.asarray(theirs, dtype=np.int16) - bundle).max() <= BAKE_TOLERANCE[arch]


@pytest.mark.parametrize("arch", ["sd3", "flux2"])
def test_export_from_a_single_file_writes_what_the_folder_writes_and_its_readme_loads_the_file(tiny, learned, run_cli,
                                                                                                 tmp_path, arch):
    """The README's code makes the pipeline from the single file (from_single_file with --base-config's configs;
    klein: its transformer from the file, the rest from the pipeline) and draws what `generate` draws. (FLUX.1:
    diffusers' from_single_file reads its transformer at FLUX.1's real widths only.)"""
    folder, file = tiny[arch]
    for name, base in (("file", ["--base", file, "--base-config", folder]), ("folder", ["--base", folder])):
        code, _, err = run_cli("export", learned[arch], "--format", "diffusers", "-o", tmp_path / name, *base)
        assert code == 0, err
    a, b = (load_file(str(tmp_path / n / "pytorch_lora_weights.safetensors")) for n in ("file", "folder"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    readme = (tmp_path / "file" / "README.md").read_text()
    assert f'from_single_file("{file}"' in readme and f'"{folder}"' in readme
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    scope = {}
    exec(code[: code.index("image = pipe(")], scope)
    base = load_base(folder)
    theirs = scope["pipe"](prompt=[PROMPT], num_inference_steps=3, guidance_scale=6.0, height=32, width=32,
                           max_sequence_length=base.sequence_length, generator=[torch.Generator().manual_seed(3)]).images[0]
    ours = image(tmp_path / "ours", SingleFile(Path(file), folder), [learned[arch]])
    assert np.abs(np.asarray(theirs, dtype=np.int16) - ours).max() <= 2


# ---------------------------------------------------------------- refusals: one line, exit 2, nothing written


def test_flow_files_that_cannot_load_are_refused_in_one_line(tiny, scene, run_cli, tmp_path, monkeypatch, capsys):
    from test_bad_input import refused, tree

    from multiconcept.errors import UserError
    from multiconcept.export.original_layout import original_keys

    monkeypatch.chdir(scene["dir"])
    work = tmp_path / "work"
    work.mkdir()
    flux_folder, flux_file = tiny["flux1"]
    # a FLUX.1 Fill transformer's image input takes the masked image too (384 channels; diffusers: flux-fill)
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 2), "double_blocks.0.img_mod.lin.weight":
               torch.zeros(6, 2), "img_in.weight": torch.zeros(2, 384)}, str(work / "fill.safetensors"))
    # SD3's CLIP-L and CLIP-G of one width: diffusers' reader would load the first into both
    save_file(original_tensors(tiny_sd3_pipeline(unprojected_clip_l=True), "sd3"), str(work / "same-width.safetensors"))
    # a FLUX.1 of two double blocks and no single block: the file has weights the tiny's configs have no place for
    other = tiny_flux_pipeline(single_layers=0)
    other.save_pretrained(work / "flux-joint-only")
    save_file(original_tensors(other, "flux1"), str(work / "flux-joint-only.safetensors"))
    cases = [(tiny["flux2"][1], [], "is a FLUX.2 transformer: pass --base-config"),
             (work / "fill.safetensors", [], "is a FLUX.1 Fill (inpainting) model"),
             (work / "same-width.safetensors", ["--base-config", tiny["sd3"][0]], "both 16 wide"),
             (flux_file, ["--base-config", tiny["sd3"][0]], "is a FLUX.1 checkpoint but --base-config"),
             (flux_file, ["--base-config", str(work / "flux-joint-only")], "has no place for (e.g. "
                                                                            "model.diffusion_model.single_blocks.0."),
             (work / "flux-joint-only.safetensors", ["--base-config", flux_folder], "lacks 8 of the transformer's"),
             (flux_file, [], "pass --base-config")]  # offline: the hub's FLUX.1 [dev] configs cannot be fetched
    before = tree(scene["dir"])
    capsys.readouterr()  # save_pretrained's progress bars
    for file, extra, phrase in cases:
        args = ["learn", "-m", "textual-inversion", "-c", "<a1>=cat", "-i", "scene.png", "-o",
                tmp_path / "out" / "b.safetensors", "--steps", "1", "--no-progress", "--base", file, *extra]
        line = refused(run_cli(*args), phrase)
        assert str(file) in line, line
        assert not (tmp_path / "out").exists() and tree(scene["dir"]) == before, phrase
    # tuning-free encoders train on UNet bases only: a flow single file tells by its header, before anything loads
    refused(run_cli("train-encoder", "--method", "fastcomposer", "--data", "toyworld", "--out", tmp_path / "fc",
                    "--base", flux_file, "--base-config", flux_folder), "runs on a UNet base", flux_file)
    assert not (tmp_path / "fc").exists()
    # the writer: SD3's layout has no CLIP-L projection, so a pipeline whose projection is not the identity is refused
    with pytest.raises(UserError, match="CLIP-L has a text projection other than the identity"):
        original_keys(tiny_sd3_pipeline(clip_widths=(12, 20)), "sd3")
