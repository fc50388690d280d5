"""Single-file checkpoints as a base (--base FILE.safetensors --base-config DIR), the weights digest beside the
fingerprint, and `multiconcept bake`: a tiny SD and a tiny SDXL pipeline written in the original layout
(export/original_layout.py) and read back by diffusers' own from_single_file, which nobody here wrote."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from multiconcept.cli import main
from multiconcept.export.original_layout import original_tensors
from multiconcept.models import SingleFile, architecture_of, load_base
from multiconcept.models.tiny import tiny_pipeline, tiny_sdxl_pipeline

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
PROMPT = "photo of a <a1> cat and <b1> dog"


def write_single_file(pipe, path: Path, layout: str | None = None) -> str:
    save_file(original_tensors(pipe, layout or architecture_of(pipe)), str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"sd" | "sdxl": (diffusers folder, single file)} of one random pipeline each. The SDXL's second encoder
    is wider than its first, as a real SDXL's is: diffusers tells the two apart by their widths."""
    root = tmp_path_factory.mktemp("single-file")
    out = {}
    for kind, pipe in (("sd", tiny_pipeline()), ("sdxl", tiny_sdxl_pipeline(second_width=48))):
        pipe.save_pretrained(root / f"{kind}-folder")
        out[kind] = (str(root / f"{kind}-folder"), write_single_file(pipe, root / f"{kind}.safetensors"))
    # SD 2.x's layout (its text encoder in OpenCLIP's names) of the tiny SD, whose UNet stays SD-1-shaped
    out["sd2"] = (out["sd"][0], write_single_file(tiny_pipeline(), root / "sd2.safetensors", "sd2"))
    return out


@pytest.fixture(scope="module")
def learned(tiny, module_scene, tmp_path_factory):
    """Bundles learned on the single files through the command line: Custom Diffusion on SD, LoRA (UNet and
    both text encoders) on SDXL; {"sd" | "sdxl": bundle path}."""
    root = tmp_path_factory.mktemp("learned")
    out = {}
    for kind, method, extra in (("sd", "custom-diffusion", []), ("sdxl", "lora", ["-p", "train_text_encoder=true"])):
        folder, file = tiny[kind]
        out[kind] = root / f"{kind}.safetensors"
        main(["learn", "-m", method, "-c", "<a1>=cat", "-c", "<b1>=dog", "-i", module_scene["image"],
              "--mask", f"<a1>={module_scene['m1']}", "--mask", f"<b1>={module_scene['m2']}", "-o", str(out[kind]),
              "--base", file, "--base-config", folder, "--steps", "2", "--grad-accum", "1", "--lr", "0.05",
              "--no-progress", *extra])
    return out


def image(run_cli, out: Path, *args) -> np.ndarray:
    code, _, err = run_cli("generate", PROMPT, "-n", "1", "--seed", "3", "--steps", "3", "-o", out, *args)
    assert code == 0, err
    return np.asarray(Image.open(out / "000003.png"), dtype=np.int16)


# ---------------------------------------------------------------- the layout and the prints


@pytest.mark.parametrize("kind", ["sd", "sd2", "sdxl"])
def test_every_weight_round_trips_through_from_single_file(tiny, kind):
    folder, file = tiny[kind]
    a, b = load_base(folder), load_base(SingleFile(Path(file), folder))
    assert a.architecture == b.architecture == ("sdxl" if kind == "sdxl" else "sd1")
    for part in PARTS:
        if getattr(a.pipe, part, None) is None:
            continue
        want, got = getattr(a.pipe, part).state_dict(), getattr(b.pipe, part).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), part
    # the same model as a file and as a folder: the same print and weights digest
    assert (a.fingerprint, a.weights) == (b.fingerprint, b.weights) and set(a.weights) == {"fp16", "bf16"}
    with safe_open(file, framework="pt") as f:
        keys = {k: f.get_slice(k).get_shape() for k in f.keys()}
    # keys as the original code names them (the tiny UNet has 1 layer per block; SD 1.5 and SDXL have 2)
    common = {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
              "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
              "model.diffusion_model.input_blocks.2.0.op.weight", "first_stage_model.decoder.up.1.block.0.conv1.weight",
              "first_stage_model.encoder.mid.attn_1.q.weight", "first_stage_model.decoder.norm_out.weight"}
    assert common <= set(keys) and keys["first_stage_model.encoder.mid.attn_1.q.weight"] == [32, 32, 1, 1]
    if kind == "sd2":
        assert keys["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"] == [3 * 32, 32]
        assert "cond_stage_model.model.positional_embedding" in keys
    elif kind == "sd":
        assert {"cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight",
                "model.diffusion_model.output_blocks.1.2.conv.weight"} <= set(keys)
    else:
        assert keys["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"] == [3 * 48, 48]
        assert {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "conditioner.embedders.1.model.text_projection", "model.diffusion_model.label_emb.0.0.weight",
                "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.output_blocks.3.2.conv.weight"} <= set(keys)
        # OpenCLIP's projection is stored for x @ P: the transpose of diffusers' Linear weight
        proj = a.pipe.text_encoder_2.text_projection.weight
        assert torch.equal(load_file(file)["conditioner.embedders.1.model.text_projection"], proj.T)


def test_a_perturbed_attention_gets_another_digest_and_existing_prints_stay(tiny, learned, tmp_path):
    """The 16-digit fingerprint is what it always was (configs and four probe tensors' statistics: the tiny bases'
    prints as recorded when tiny_vae() was shared), so it cannot see attention weights moved by 1e-3; the
    weights digest does, on both grids, and a bundle of the original refuses the perturbed copy."""
    from multiconcept.errors import UserError
    from multiconcept.workflows.generate import load_with_bundles

    assert load_base("tiny").fingerprint == "c2438ac5a389f582" and load_base("tiny-sdxl").fingerprint == "d1775efedf3ff9f0"
    folder, file = tiny["sd"]
    original = load_base(SingleFile(Path(file), folder))
    pipe = tiny_pipeline()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if ".attn1." in name or ".attn2." in name:
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
    moved = load_base(SingleFile(Path(write_single_file(pipe, tmp_path / "moved.safetensors")), folder))
    assert moved.fingerprint == original.fingerprint
    assert all(moved.weights[grid] != original.weights[grid] for grid in ("fp16", "bf16"))
    with pytest.raises(UserError, match="whose weights differ from those of the loaded base") as e:
        load_with_bundles(moved, [str(learned["sd"])])
    assert "\n" not in str(e.value)
    # bf16 rounds a base's weights alike from the file and from the folder: the bundle holds there
    in_bf16 = load_base(folder, dtype="bf16")
    assert set(in_bf16.weights) == {"bf16"} and in_bf16.weights["bf16"] == original.weights["bf16"]
    load_with_bundles(in_bf16, [str(learned["sd"])])


# ---------------------------------------------------------------- learn, generate, export on a single file


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_a_concept_learned_on_a_single_file_generates_there_and_on_its_folder(tiny, learned, run_cli, tmp_path, kind):
    from multiconcept.bundle import read_header

    folder, file = tiny[kind]
    header = read_header(learned[kind])
    assert header["base_name"] == file and set(header["base_weights"]) == {"fp16", "bf16"}
    on_file = image(run_cli, tmp_path / "file", "-b", learned[kind], "--base", file, "--base-config", folder)
    on_folder = image(run_cli, tmp_path / "folder", "-b", learned[kind], "--base", folder)
    assert np.array_equal(on_file, on_folder)


def test_export_from_a_single_file_writes_what_the_folder_writes(tiny, learned, run_cli, tmp_path):
    folder, file = tiny["sd"]
    for name, base in (("file", ["--base", file, "--base-config", folder]), ("folder", ["--base", folder])):
        code, _, err = run_cli("export", learned["sd"], "--format", "a1111", "-o", tmp_path / name, *base)
        assert code == 0, err
    for rel in ("embeddings/a1.safetensors", "embeddings/b1.safetensors", "loras/sd.safetensors"):
        a, b = load_file(str(tmp_path / "file" / rel)), load_file(str(tmp_path / "folder" / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel


def test_train_encoder_and_compose_on_a_single_file(tiny, subject_folder, run_cli, tmp_path):
    import json

    folder, file = tiny["sd"]
    base = ["--base", file, "--base-config", folder]
    model = tmp_path / "fc"
    code, _, err = run_cli("train-encoder", "--method", "fastcomposer", "--data", subject_folder, "--image-encoder", "tiny",
                           "--out", model, "--steps", "2", "--batch-size", "2", "--no-progress", *base)
    assert code == 0, err
    config = json.loads((model / "fastcomposer.json").read_text())
    assert config["base_name"] == file and config["base_weights"] == load_base(folder).weights
    img, m0 = subject_folder / "000000.png", subject_folder / "000000_0.png"
    code, _, err = run_cli("compose", "a star <img> on a gray background", "--subject", f"{img}:{m0}", "--model", model,
                           "-n", "1", "--steps", "2", "--out", tmp_path / "out", *base)
    assert code == 0, err
    assert (tmp_path / "out" / "000000.png").is_file()


def test_evaluate_overfitting_on_a_single_file(tiny, learned, scene, run_cli, tmp_path, monkeypatch):
    import json

    import multiconcept.workflows.overfitting as of
    from multiconcept.models.tiny_evaluators import save_tiny_clip

    monkeypatch.setattr(of, "PROTOCOL", of.OverfittingProtocol(fisher_prompts=1, fisher_seeds=1, fisher_timesteps=(500,),
                                                                fisher_steps=2, wasserstein_contexts=2,
                                                                wasserstein_seeds=1, sample_steps=2))
    folder, file = tiny["sd"]
    base = ["--base", file, "--base-config", folder]
    image(run_cli, tmp_path / "gens", "-b", learned["sd"], *base)
    clip = save_tiny_clip(tmp_path / "clip", image_size=32)
    code, _, err = run_cli("evaluate", tmp_path / "gens", "-r", scene["image"], "--clip", clip, "--overfitting",
                           "-b", learned["sd"], "-o", tmp_path / "results.json", *base)
    assert code == 0, err
    report = json.loads((tmp_path / "results.json").read_text())["overfitting"]
    assert report["base"] == file and report["latent_fisher_divergence"]["value"] > 0


def test_the_web_page_learns_on_a_single_file(tiny, scene, tmp_path):
    from multiconcept.bundle import read_header
    from multiconcept.ui.common import Page
    from multiconcept.ui.learn_tab import MAX_CONCEPTS, learn

    folder, file = tiny["sd"]
    page = Page(work=tmp_path / "work", base=SingleFile(Path(file), folder))  # what `ui --base FILE --base-config` makes
    concepts = [("<a1>", "cat", None, scene["m1"], None)] + [("", "", None, None, None)] * (MAX_CONCEPTS - 1)
    args = [scene["image"], 1, "textual-inversion", 1, 1e-3, 0, "photo of a {}", ""] + [v for c in concepts for v in c]
    page.cancels.open("local")
    *_, last = learn(page, *args)
    assert "Learned &lt;a1&gt;" in last[0], last[0]
    assert read_header(last[-1])["base_name"] == file


# ---------------------------------------------------------------- bake

# Custom Diffusion's deltas are added in fp32 exactly as generation adds them: the same pixels. A LoRA merged
# into its weights (W + alpha/r·BA) differs from peft's unmerged x·W + alpha/r·(x·A)·B by float rounding only.
# Measured (4 seeds, 10 DDIM steps): Custom Diffusion and DisenDiff 0 levels on both; LoRA 0 on SD, at most 1 on SDXL.
BAKE_TOLERANCE = {"sd": 0, "sdxl": 2}


@pytest.mark.parametrize("kind, base_is", [("sd", "folder"), ("sdxl", "file")])
def test_a_baked_checkpoint_with_its_embeddings_draws_what_the_bundle_draws(tiny, learned, run_cli, tmp_path, kind,
                                                                             base_is):
    folder, file = tiny[kind]
    base = ["--base", folder] if base_is == "folder" else ["--base", file, "--base-config", folder]
    out = tmp_path / "baked" / "pets.safetensors"
    code, stdout, err = run_cli("bake", learned[kind], "-o", out, *base)
    assert code == 0, err
    assert {p.relative_to(out.parent).as_posix() for p in out.parent.rglob("*") if p.is_file()} == {
        "pets.safetensors", "pets.README.md", "embeddings/a1.safetensors", "embeddings/b1.safetensors"}
    readme = (out.parent / "pets.README.md").read_text()
    assert "photo of a a1 cat and b1 dog" in readme and "embedding:a1" in readme and "from_single_file" in readme
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == set(load_file(file).keys())  # the original layout, every weight
    embeddings = ["--embedding", out.parent / "embeddings" / "a1.safetensors",
                  "--embedding", out.parent / "embeddings" / "b1.safetensors"]
    baked = image(run_cli, tmp_path / "baked-images", "--base", out, "--base-config", folder, *embeddings)
    bundle = image(run_cli, tmp_path / "bundle-images", "-b", learned[kind], *base)
    plain = image(run_cli, tmp_path / "plain-images", "--base", file, "--base-config", folder, *embeddings)
    assert np.abs(baked - bundle).max() <= BAKE_TOLERANCE[kind]
    assert np.abs(plain - bundle).max() > 10  # the weight changes are in the checkpoint, not only in the tokens
    # the baked file is another model: its weights digest differs from the base's
    assert load_base(SingleFile(out, folder)).weights != load_base(folder).weights
    half = tmp_path / "half" / "pets.safetensors"
    assert run_cli("bake", learned[kind], "-o", half, "--save-dtype", "fp16", *base)[0] == 0
    assert {t.dtype for t in load_file(str(half)).values()} == {torch.float16}
    assert abs(half.stat().st_size / out.stat().st_size - 0.5) < 0.01


# ---------------------------------------------------------------- refusals: one line, exit 2, nothing written


def learn_on(base_args, out):
    return ["learn", "-m", "textual-inversion", "-c", "<a1>=cat", "-i", "scene.png", "-o", out, "--steps", "1",
            "--no-progress", *base_args]


def test_files_that_are_no_checkpoint_are_refused_from_their_header(tiny, scene, run_cli, tmp_path, monkeypatch):
    from test_bad_input import refused, tree

    folder, file = tiny["sd"]
    monkeypatch.chdir(scene["dir"])
    work = tmp_path / "work"
    work.mkdir()
    data = Path(file).read_bytes()
    (work / "noise.safetensors").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (work / "cut.safetensors").write_bytes(data[: len(data) // 2])
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)},
              str(work / "style.safetensors"))
    save_file({"emb_params": torch.zeros(1, 32)}, str(work / "cat1.safetensors"))
    torch.save({"state_dict": {}}, work / "model.ckpt")
    torch.save({"state_dict": {}}, work / "renamed.safetensors")
    sd = load_file(file)
    save_file({k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}, str(work / "no-text.safetensors"))
    cases = [("noise.safetensors", [], "is not a safetensors file"),
             ("cut.safetensors", [], "is truncated"),
             ("style.safetensors", [], "is a LoRA, not a checkpoint"),
             ("cat1.safetensors", [], "is a textual-inversion embedding"),
             ("model.ckpt", [], "never unpickles"),
             ("renamed.safetensors", [], "is a PyTorch pickle"),
             ("upper.SAFETENSORS", [], "rename it to end in .safetensors"),
             ("no-text.safetensors", [], "pass --base-config DIR"),
             ("sd.safetensors", [], "pass --base-config"),  # offline: diffusers cannot fetch the configs it picks
             ("sd.safetensors", ["--base-config", tiny["sdxl"][0]], "is an SD 1.x checkpoint but --base-config"),
             ("sd.safetensors", ["--base-config", str(work / "nowhere")], "is not a diffusers pipeline folder")]
    (work / "sd.safetensors").write_bytes(data)
    (work / "upper.SAFETENSORS").write_bytes(data)
    before = tree(scene["dir"])
    for name, extra, phrase in cases:
        line = refused(run_cli(*learn_on(["--base", work / name, *extra], tmp_path / "out" / "b.safetensors")), phrase)
        assert str(work / name) in line or extra[-1] in line, line  # names the file, or the --base-config at fault
        assert not (tmp_path / "out").exists() and tree(scene["dir"]) == before, name
    refused(run_cli(*learn_on(["--base", "tiny", "--base-config", folder], tmp_path / "b.safetensors")),
            "--base-config goes with a single-file checkpoint")
    # the configs supply what the file lacks: the same model as the folder, to the print
    assert load_base(SingleFile(work / "no-text.safetensors", folder)).weights == load_base(folder).weights


def test_bake_refusals(tiny, learned, run_cli, tmp_path):
    from test_bad_input import refused

    from multiconcept.bundle import Bundle, save_bundle

    folder, file = tiny["sd"]
    base = ["--base", file, "--base-config", folder]
    save_bundle(Bundle("infusion", ["cat"], ["cat"], file, "0" * 16,
                       tensors={"value_residual/cat/mid_block.attentions.0": torch.zeros(64)}), tmp_path / "inf.safetensors")
    refused(run_cli("bake", tmp_path / "inf.safetensors", "-o", tmp_path / "x.safetensors", *base), "is Infusion")
    refused(run_cli("bake", learned["sd"], "-o", tmp_path / "x.ckpt", *base), "must name a .safetensors file")
    refused(run_cli("bake", learned["sdxl"], "-o", tmp_path / "x.safetensors", *base), "was learned on an SDXL base")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "embeddings").exists()
    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    refused(run_cli("bake", learned["sd"], "-o", tmp_path / "taken.safetensors", *base), "--overwrite")
    assert (tmp_path / "taken.safetensors").read_bytes() == b"mine"
