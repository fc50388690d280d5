"""export --format a1111|comfyui|kohya, checked by diffusers' own loaders (which nobody here wrote) and by the
key layouts kohya, AUTOMATIC1111 and ComfyUI document; generate --lora / --embedding with those files."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from multiconcept.bundle import Bundle, load_bundle, save_bundle

PROMPT = "photo of a <a1> cat and <b1> dog"


def learn_args(scene, out, method, *extra):
    return ["learn", "-m", method, "-c", "<a1>=cat", "-c", "<b1>=dog", "-i", scene["image"],
            "--mask", f"<a1>={scene['m1']}", "--mask", f"<b1>={scene['m2']}", "-o", out, "--base", "tiny",
            "--steps", "2", "--grad-accum", "1", "--no-progress", *extra]


def ours(run_cli, bundle, out, *extra) -> np.ndarray:
    code, _, err = run_cli("generate", PROMPT, *(["-b", bundle] if bundle else []), "-n", "1", "--seed", "3",
                           "--steps", "3", "-o", out, "--base", "tiny", *extra)
    assert code == 0, err
    return np.asarray(Image.open(out / "000003.png"), dtype=np.int16)


def through_diffusers(folder, tokens: dict[str, str], lora: str) -> np.ndarray:
    """What the export's README tells a diffusers user to do, on a fresh tiny pipeline."""
    from multiconcept.models import load_base

    pipe = load_base("tiny").pipe
    for token, word in tokens.items():
        pipe.load_textual_inversion(str(folder / "embeddings" / f"{word}.safetensors"), token=token)
    pipe.load_lora_weights(str(folder / "loras"), weight_name=f"{lora}.safetensors")
    img = pipe(PROMPT, num_inference_steps=3, guidance_scale=6.0, generator=torch.Generator().manual_seed(3)).images[0]
    return np.asarray(img, dtype=np.int16)


# A1111's own mapping of kohya's SD 1.x/2.x names onto the original (LDM) model's blocks
# (extensions-builtin/Lora/networks.py, convert_diffusers_name_to_compvis): a key it cannot map loads nothing.
def a1111_target(stem: str) -> str | None:
    for pattern, to in (
            (r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)", lambda a, b, r: f"input_blocks_{1 + 3 * a + b}_1_{r}"),
            (r"lora_unet_mid_block_attentions_(\d+)_(.+)", lambda a, r: f"middle_block_1_{r}"),
            (r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)", lambda a, b, r: f"output_blocks_{3 * a + b}_1_{r}"),
            (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda a, r: f"text_layers_{a}_{r}")):
        m = re.fullmatch(pattern, stem)
        if m:
            return to(*[int(g) if g.isdigit() else g for g in m.groups()])
    return None


def te_stem(module: str) -> str:
    """kohya's name of a text encoder module: its path in transformers 4's CLIPTextModel (which had a
    `text_model` level that transformers 5's lacks)."""
    return "lora_te_" + (module if module.startswith("text_model.") else "text_model." + module).replace(".", "_")


def kohya_stems(state_dict) -> set[str]:
    parts = {k.split(".", 1)[1] for k in state_dict}
    assert parts == {"lora_down.weight", "lora_up.weight", "alpha"}, parts
    return {k.split(".", 1)[0] for k in state_dict}


def test_lora_bundle_exports_in_kohya_layout_with_its_alpha_and_loads_back(scene, run_cli, tmp_path):
    from multiconcept.models import load_base

    bundle = tmp_path / "style.safetensors"
    assert run_cli(*learn_args(scene, bundle, "lora", "--lr", "0.05", "-p", "rank=4", "-p", "alpha=8",
                               "-p", "train_text_encoder=true"))[0] == 0
    want = ours(run_cli, bundle, tmp_path / "ours")
    code, stdout, err = run_cli("export", bundle, "--format", "comfyui", "-o", tmp_path / "exp")
    assert code == 0, err
    sd = load_file(str(tmp_path / "exp" / "loras" / "style.safetensors"))
    # the documented layout: prefix + the module's path with '.' -> '_', for every LoRA'd layer of the base
    pipe = load_base("tiny").pipe
    unet = {n for n, _ in pipe.unet.named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))}
    te = {n for n, _ in pipe.text_encoder.named_modules() if n.endswith(("_proj",)) and ".self_attn." in n}
    assert kohya_stems(sd) == {"lora_unet_" + n.replace(".", "_") for n in unet} | {te_stem(n) for n in te}
    assert all(a1111_target(s) for s in kohya_stems(sd))
    alphas = {k: v for k, v in sd.items() if k.endswith(".alpha")}
    assert all(v.dim() == 0 and v.dtype == torch.float32 and float(v) == 8.0 for v in alphas.values())  # not the rank
    assert all(v.shape[0] == 4 for k, v in sd.items() if k.endswith("lora_down.weight"))
    for word in ("a1", "b1"):
        emb = load_file(str(tmp_path / "exp" / "embeddings" / f"{word}.safetensors"))
        assert list(emb) == ["emb_params"] and emb["emb_params"].shape == (1, 32)
    readme = (tmp_path / "exp" / "README.md").read_text()
    assert "photo of a embedding:a1 cat and embedding:b1 dog" in readme and "<lora:style:1>" in readme
    assert readme.index("## ComfyUI") < readme.index("## AUTOMATIC1111")

    got = through_diffusers(tmp_path / "exp", {"<a1>": "a1", "<b1>": "b1"}, "style")
    assert np.abs(want - got).max() <= 2
    # and back in: the exported LoRA and embeddings through generate --lora / --embedding, no bundle
    files = tmp_path / "exp"
    back = ours(run_cli, None, tmp_path / "back", "--lora", files / "loras" / "style.safetensors",
                "--embedding", files / "embeddings" / "a1.safetensors",
                "--embedding", f"<b1>={files / 'embeddings' / 'b1.safetensors'}")
    assert np.abs(want - back).max() <= 2
    # a token both a bundle and an embedding define: the usual one-line error, before the base loads
    code, _, err = run_cli("generate", PROMPT, "-b", bundle, "--embedding", files / "embeddings" / "a1.safetensors",
                           "-n", "1", "--steps", "1", "-o", tmp_path / "clash", "--base", "tiny")
    assert code == 2 and "<a1> is defined by both" in err and len(err.strip().splitlines()) == 1, err


def test_disendiff_as_an_svd_lora_reproduces_the_bundle_at_full_rank(scene, run_cli, tmp_path):
    from multiconcept.export import DEFAULT_RANK
    from multiconcept.export.svd import factorise

    bundle = tmp_path / "dd.safetensors"
    assert run_cli(*learn_args(scene, bundle, "disendiff", "--lr", "0.05", "-p", "train_qkv=true"))[0] == 0
    want = ours(run_cli, bundle, tmp_path / "ours")
    code, stdout, err = run_cli("export", bundle, "--format", "a1111", "--rank", "full", "-o", tmp_path / "exp")
    assert code == 0, err
    assert "relative Frobenius error 0 over all layers" in stdout
    sd = load_file(str(tmp_path / "exp" / "loras" / "dd.safetensors"))
    deltas = load_bundle(bundle).with_prefix("unet_delta/")
    assert kohya_stems(sd) == {"lora_unet_" + n[: -len(".weight")].replace(".", "_") for n in deltas}
    assert any("attn2_to_q" in s for s in kohya_stems(sd)) and all(a1111_target(s) for s in kohya_stems(sd))
    # one alpha, the largest rank kept (to_q of the 64-wide layers: 64; to_k/to_v read 32-wide text: 32)
    ranks = {sd[k].shape[0] for k in sd if k.endswith("lora_down.weight")}
    assert ranks == {32, 64} and {float(sd[k]) for k in sd if k.endswith(".alpha")} == {64.0}
    got = through_diffusers(tmp_path / "exp", {"<a1>": "a1", "<b1>": "b1"}, "dd")
    assert np.abs(want - got).max() <= 2, np.abs(want - got).max()
    assert "<lora:dd:1>" in (tmp_path / "exp" / "README.md").read_text()

    # the error falls as the rank rises, is float noise at full rank, and stays under the stated bound at the
    # default rank: 16 of the tiny model's 32 (ToyWorld's measured errors are in the README)
    errors = [factorise({k: v for k, v in deltas.items()}, r).relative_error for r in (1, 2, 4, 8, DEFAULT_RANK, 24, None)]
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-6, errors
    assert errors[4] < 0.25, errors
    code, stdout, err = run_cli("export", bundle, "--format", "kohya", "-o", tmp_path / "default")
    assert code == 0 and f"at rank {DEFAULT_RANK}: relative Frobenius error {errors[4]:.4g}" in stdout, (stdout, err)
    with safe_open(str(tmp_path / "default" / "loras" / "dd.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_shape()[0] == DEFAULT_RANK for k in f.keys() if k.endswith("lora_down.weight"))


@pytest.mark.parametrize("geometry", ["sd15", "sd21"])
def test_key_names_follow_the_documented_layout_on_stable_diffusion_geometry(geometry):
    """SD 1.5 / 2.1's UNet and text encoder from their configs (no weights): every LoRA key the export writes is
    kohya's name of a real module, and A1111's own mapping puts it on the original model's block."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from multiconcept.export.kohya import kohya_lora

    sd2 = geometry == "sd21"
    unet_cfg = dict(sample_size=96 if sd2 else 64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                    cross_attention_dim=1024 if sd2 else 768, attention_head_dim=(5, 10, 20, 20) if sd2 else 8,
                    use_linear_projection=sd2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    te_cfg = CLIPTextConfig(hidden_size=1024 if sd2 else 768, intermediate_size=4096 if sd2 else 3072,
                            num_hidden_layers=23 if sd2 else 12, num_attention_heads=16 if sd2 else 12)
    with torch.device("meta"):
        unet, te = UNet2DConditionModel(**unet_cfg), CLIPTextModel(te_cfg)
    modules = {"unet": {n: m for n, m in unet.named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))},
               "text_encoder": {n: m for n, m in te.named_modules() if ".self_attn." in n and n.endswith("_proj")}}
    assert len(modules["unet"]) == 16 * 2 * 4 and len(modules["text_encoder"]) == te_cfg.num_hidden_layers * 4
    peft = {f"{c}.{n}.lora_{ab}.weight": torch.empty((4, m.in_features) if ab == "A" else (m.out_features, 4), device="meta")
            for c, ms in modules.items() for n, m in ms.items() for ab in "AB"}
    sd = kohya_lora(peft, 2.0)
    stems = kohya_stems(sd)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in stems
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0" in stems
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in stems and not any(s.startswith("lora_te1") for s in stems)
    assert stems == {"lora_unet_" + n.replace(".", "_") for n in modules["unet"]} | {te_stem(n) for n in modules["text_encoder"]}
    # the original model holds its attention blocks at input 1, 2, 4, 5, 7, 8, middle 1, output 3-11
    targets = [a1111_target(s) for s in stems]
    blocks = {re.match(r"((?:input|output)_blocks_\d+|middle_block)", t).group(1) for t in targets if not t.startswith("text")}
    assert blocks == {f"input_blocks_{i}" for i in (1, 2, 4, 5, 7, 8)} | {"middle_block"} | {
        f"output_blocks_{i}" for i in range(3, 12)}
    assert all(float(v) == 2.0 for k, v in sd.items() if k.endswith(".alpha"))


def test_infusion_and_bad_ranks_are_refused_in_one_line_before_the_base_loads(run_cli, tmp_path):
    inf = save_bundle(Bundle("infusion", ["<cat>"], ["cat"], "tiny", "0" * 16, {}, {},
                             {"value_residual/cat/mid_block.attentions.0": torch.zeros(64)}), tmp_path / "inf.safetensors")
    code, _, err = run_cli("export", inf, "--format", "a1111", "-o", tmp_path / "o")
    assert code == 2 and "is Infusion" in err and "no weight delta or LoRA" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("export", inf, "--format", "a1111", "--rank", "0", "-o", tmp_path / "o")
    assert code == 2 and "must be a whole number >= 1 or 'full'" in err
    assert not (tmp_path / "o").exists()


def test_bad_embedding_files_are_one_line_naming_them(run_cli, tmp_path):
    save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 64)}, str(tmp_path / "xl.safetensors"))
    save_file({"emb_params": torch.zeros(1, 48)}, str(tmp_path / "wide.safetensors"))
    save_file({"emb_params": torch.zeros(1, 32)}, str(tmp_path / "cat.safetensors"))
    for name, phrase in (("xl", "is for SDXL"), ("wide", "vectors of 32"), ("missing", "must be an existing .safetensors")):
        code, _, err = run_cli("generate", f"a <{name}> cat", "--embedding", tmp_path / f"{name}.safetensors", "-n", "1",
                               "--steps", "1", "-o", tmp_path / "g", "--base", "tiny")
        assert code == 2 and phrase in err and len(err.strip().splitlines()) == 1, (name, err)
    # the same token twice
    twice = f"<x>={tmp_path / 'cat.safetensors'}"
    code, _, err = run_cli("generate", "a <x> cat", "--embedding", twice, "--embedding", twice, "-n", "1", "--steps", "1",
                           "-o", tmp_path / "g", "--base", "tiny")
    assert code == 2 and "<x> is defined by both" in err, err
    assert not (tmp_path / "g").exists()
