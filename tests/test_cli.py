"""Every CLI verb end to end on the tiny base, and every bad input's message."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from multiconcept.workflows.generate import read_png_metadata


def learn_args(scene, out, method="custom-diffusion", *extra):
    return ["learn", "-m", method, "-c", "<a1>=cat", "-c", "<b1>=dog", "-i", scene["image"],
            "--mask", f"<a1>={scene['m1']}", "--mask", f"<b1>={scene['m2']}", "-o", out, "--base", "tiny",
            "--steps", "2", "--grad-accum", "1", "--no-progress", *extra]


@pytest.fixture
def cd_bundle(scene, run_cli):
    out = scene["dir"] / "cd.safetensors"
    code, stdout, stderr = run_cli(*learn_args(scene, out))
    assert code == 0, stderr
    return out


def test_learn_inspect_generate_export_methods(scene, run_cli, cd_bundle, tmp_path):
    code, stdout, _ = run_cli("inspect", cd_bundle)
    assert code == 0 and "custom-diffusion" in stdout and "<a1> (cat)" in stdout and "tensor bytes" in stdout
    code, stdout, _ = run_cli("inspect", cd_bundle, "--json")
    info = json.loads(stdout)
    assert info["header"]["tokens"] == ["<a1>", "<b1>"] and info["tensor_bytes"] > 0

    gen = tmp_path / "gen"
    code, stdout, stderr = run_cli("generate", "photo of a <a1> cat and <b1> dog", "-b", cd_bundle, "-n", "2",
                                   "--seed", "5", "--steps", "2", "-o", gen, "--base", "tiny", "--attention-maps")
    assert code == 0, stderr
    pngs = sorted(gen.glob("*.png"))
    assert [p.name for p in pngs] == ["000005.png", "000006.png"]
    meta = read_png_metadata(pngs[1])
    assert meta["prompt"] == "photo of a <a1> cat and <b1> dog" and meta["seed"] == 6
    assert meta["scheduler"] == "ddim" and meta["steps"] == 2 and meta["guidance"] == 6.0
    assert meta["bundles"] == ["cd.safetensors"]
    heat = sorted(p.name for p in (gen / "attention").glob("000005_*.png"))
    assert any(h.endswith("_a1.png") for h in heat) and any(h.endswith("_cat.png") for h in heat)

    code, stdout, _ = run_cli("export", cd_bundle, "--format", "diffusers", "-o", tmp_path / "exp")
    assert code == 0 and (tmp_path / "exp" / "pytorch_custom_diffusion_weights.safetensors").exists()
    assert "load_attn_procs" in (tmp_path / "exp" / "README.md").read_text()

    code, stdout, _ = run_cli("methods")
    assert code == 0 and all(m in stdout for m in ("textual-inversion", "custom-diffusion", "lora"))
    code, stdout, _ = run_cli("methods", "custom-diffusion")
    assert code == 0 and "train_projections" in stdout


def test_demo_end_to_end(run_cli, tmp_path):
    code, stdout, stderr = run_cli("demo", "-o", tmp_path / "demo", "--base", "tiny", "--steps", "2")
    assert code == 0, stderr
    page = (tmp_path / "demo" / "index.html").read_text()
    for section in ("Source and masks", "Generations", "Attention heatmaps", "Metrics", "CLIP-I &lt;s1&gt;",
                    "data:image/png;base64"):
        assert section in page
    assert "http" not in page.replace("http-equiv", "")  # works offline: nothing fetched
    assert "<s1>" not in page and "<code>a &lt;s1&gt; robot and a &lt;s2&gt; bird" in page  # prompts escaped
    assert "identity (parts right)" in page and "blue robot with an orange head, a block hat and a black spot" in page


@pytest.mark.parametrize("method", ["custom-diffusion", "textual-inversion", "lora"])
def test_export_gives_same_images_in_plain_diffusers(scene, run_cli, tmp_path, method):
    from multiconcept.export import load_exported_into
    from multiconcept.models import load_base

    bundle = tmp_path / f"{method}.safetensors"
    extra = ["--lr", "0.05"] if method != "custom-diffusion" else ["--lr", "0.001"]
    assert run_cli(*learn_args(scene, bundle, method, *extra))[0] == 0
    prompt = "photo of a <a1> cat and <b1> dog"
    assert run_cli("generate", prompt, "-b", bundle, "-n", "1", "--seed", "3", "--steps", "3", "-o", tmp_path / "ours",
                   "--base", "tiny")[0] == 0
    assert run_cli("export", bundle, "-o", tmp_path / "exp")[0] == 0
    pipe = load_base("tiny").pipe
    plain = pipe(prompt, num_inference_steps=3, guidance_scale=6.0, generator=torch.Generator().manual_seed(3)).images[0]
    load_exported_into(pipe, tmp_path / "exp", ["<a1>", "<b1>"])
    exported = pipe(prompt, num_inference_steps=3, guidance_scale=6.0, generator=torch.Generator().manual_seed(3)).images[0]
    ours = np.asarray(Image.open(tmp_path / "ours" / "000003.png"), dtype=np.int16)
    diff = np.abs(ours - np.asarray(exported, dtype=np.int16)).max()
    assert diff <= 2, diff  # SDPA vs Custom Diffusion's explicit attention: rounding only
    # and the concepts did change the image compared with the untouched base
    assert np.abs(ours - np.asarray(plain, dtype=np.int16)).max() > 2


# ---------------------------------------------------------------- bad input

def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def bad_cases(scene, tmp):
    big_mask = tmp / "big.png"
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(big_mask)
    empty = tmp / "empty.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(empty)
    cmyk = tmp / "cmyk.jpg"
    Image.new("CMYK", (32, 32)).save(cmyk)
    corrupt = _write(tmp / "corrupt.png", b"\x89PNG\r\n\x1a\nnot really")
    out = str(tmp / "x.safetensors")
    base = ["learn", "-m", "custom-diffusion", "--base", "tiny", "--steps", "1", "-o", out, "--no-progress"]
    return {
        "missing image": (base + ["-c", "<a1>=cat", "-i", str(tmp / "nope.png")], "does not exist"),
        "corrupt image": (base + ["-c", "<a1>=cat", "-i", corrupt], "corrupt or not an image"),
        "unsupported mode": (base + ["-c", "<a1>=cat", "-i", str(cmyk)], "mode CMYK, which is not supported"),
        "mask size": (base + ["-c", "<a1>=cat", "-i", scene["image"], "--mask", f"<a1>={big_mask}"],
                      "40x40 but its image is 32x32"),
        "empty mask": (base + ["-c", "<a1>=cat", "-i", scene["image"], "--mask", f"<a1>={empty}"], "is empty"),
        "special token": (base + ["-c", "<|endoftext|>=cat", "-i", scene["image"]], "no spaces or |"),
        "unknown method": (["learn", "-m", "nope", "-c", "<a1>=cat", "-i", scene["image"], "-o", out], "unknown method"),
        "bad param": (base + ["-c", "<a1>=cat", "-i", scene["image"], "-p", "weight_decay=abc"], "not a valid float"),
        "bad latents": (base + ["-c", "<a1>=cat", "-i", scene["image"], "-p", "latents=median"],
                        "latents must be auto, sample or mean"),
        "bad loss region": (base + ["-c", "<a1>=cat", "-i", scene["image"], "-p", "loss_region=box"],
                            "loss_region must be masks, unnamed-out or all"),
        "bad unnamed": (base + ["-c", "<a1>=cat", "-i", scene["image"], "-p", "unnamed=blur"], "unnamed must be keep or erase"),
    }


@pytest.mark.parametrize("case", ["missing image", "corrupt image", "unsupported mode", "mask size", "empty mask",
                                  "special token", "unknown method", "bad param", "bad latents",
                                  "bad loss region", "bad unnamed"])
def test_bad_learn_input(scene, run_cli, tmp_path, case):
    args, message = bad_cases(scene, tmp_path)[case]
    code, stdout, stderr = run_cli(*args)
    assert code == 2
    assert stderr.startswith("error: ") and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not (tmp_path / "x.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name or p.name.endswith(".ckpt")] == []


@pytest.mark.parametrize("case,prompt,message", [
    ("class word absent", "a <a1> on the beach", "class word 'cat' of <a1> is absent"),
    ("prompt too long", "a <a1> cat " + "very " * 80, "longer than the text encoder's limit of 77"),
])
def test_bad_generate_prompt(run_cli, cd_bundle, tmp_path, case, prompt, message):
    code, _, stderr = run_cli("generate", prompt, "-b", cd_bundle, "-n", "1", "--steps", "1", "-o", tmp_path / "g",
                              "--base", "tiny")
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "g").glob("*.png")) if (tmp_path / "g").exists() else True


def test_bundle_on_other_base_is_refused(run_cli, cd_bundle, tmp_path):
    from multiconcept.models.tiny import tiny_pipeline

    other = tiny_pipeline(seed=1)
    other.save_pretrained(tmp_path / "other")
    code, _, stderr = run_cli("generate", "a <a1> cat", "-b", cd_bundle, "-n", "1", "--steps", "1", "-o", tmp_path / "g",
                              "--base", tmp_path / "other")
    assert code == 2 and "was learned on base 'tiny'" in stderr and str(tmp_path / "other") in stderr
    assert "pass --base tiny" in stderr and len(stderr.strip().splitlines()) == 1


def test_a_bundle_of_a_rebuilt_base_of_the_same_name_is_refused_in_one_line(run_cli, scene, tmp_path):
    """A base rebuilt under its old name (ToyWorld's new world, a checkpoint downloaded again) has another
    fingerprint: its old bundles are refused, and the fix is to learn again, not to pass the same name."""
    from multiconcept.models.tiny import tiny_pipeline

    tiny_pipeline(seed=0).save_pretrained(tmp_path / "base")
    bundle = tmp_path / "b.safetensors"
    assert run_cli("learn", "-m", "textual-inversion", "-c", "<a1>=cat", "-i", scene["image"], "-o", bundle,
                   "--base", tmp_path / "base", "--steps", "1", "--batch-size", "1", "--no-progress")[0] == 0
    tiny_pipeline(seed=1).save_pretrained(tmp_path / "base")  # rebuilt: same folder, other weights
    code, _, stderr = run_cli("generate", "a <a1> cat", "-b", bundle, "-n", "1", "--steps", "1", "-o", tmp_path / "g",
                              "--base", tmp_path / "base")
    assert code == 2 and "learn the concepts again on this base" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "g").exists()


def test_colliding_tokens_are_refused(run_cli, cd_bundle, tmp_path):
    twin = tmp_path / "twin.safetensors"
    twin.write_bytes(cd_bundle.read_bytes())
    code, _, stderr = run_cli("generate", "a <a1> cat", "-b", cd_bundle, "-b", twin, "-n", "1", "--steps", "1",
                              "-o", tmp_path / "g", "--base", "tiny")
    assert code == 2 and "<a1> is defined by both" in stderr


@pytest.mark.parametrize("content,message", [(b"garbage", "not a readable .safetensors bundle"), (None, "does not exist")])
def test_inspect_bad_file(run_cli, tmp_path, content, message):
    f = tmp_path / "b.safetensors"
    if content is not None:
        f.write_bytes(content)
    code, _, stderr = run_cli("inspect", f)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1


def test_regularisation_folder_and_generated(scene, run_cli, tmp_path):
    reg = tmp_path / "reg"
    reg.mkdir()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(reg / "r0.png")
    (reg / "r0.txt").write_text("photo of a cat")
    out = tmp_path / "r.safetensors"
    code, _, err = run_cli(*learn_args(scene, out), "--reg-dir", reg, "--reg-generate", "2", "--reg-steps", "2")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "r.reg").iterdir()) == ["reg_0000.png", "reg_0000.txt",
                                                                       "reg_0001.png", "reg_0001.txt"]
    assert (tmp_path / "r.reg" / "reg_0000.txt").read_text() == "photo of a cat and dog"
    (reg / "r0.txt").unlink()
    code, _, err = run_cli(*learn_args(scene, tmp_path / "r2.safetensors"), "--reg-dir", reg)
    assert code == 2 and "has no caption file r0.txt" in err


def test_lora_with_text_encoder_exports_and_matches(scene, run_cli, tmp_path):
    from multiconcept.export import load_exported_into
    from multiconcept.models import load_base

    out = tmp_path / "l.safetensors"
    code, _, err = run_cli(*learn_args(scene, out, "lora", "-p", "train_text_encoder=true", "--lr", "0.05"))
    assert code == 0, err
    code, stdout, _ = run_cli("inspect", out, "--json")
    assert any(t["name"].startswith("lora/text_encoder.") for t in json.loads(stdout)["tensors"])
    prompt = "photo of a <a1> cat"
    assert run_cli("generate", prompt, "-b", out, "-n", "1", "--seed", "1", "--steps", "3", "-o", tmp_path / "ours",
                   "--base", "tiny")[0] == 0
    assert run_cli("export", out, "-o", tmp_path / "exp")[0] == 0
    pipe = load_base("tiny").pipe
    load_exported_into(pipe, tmp_path / "exp", ["<a1>", "<b1>"])
    img = pipe(prompt, num_inference_steps=3, guidance_scale=6.0, generator=torch.Generator().manual_seed(1)).images[0]
    ours = np.asarray(Image.open(tmp_path / "ours" / "000001.png"), dtype=np.int16)
    assert np.abs(ours - np.asarray(img, dtype=np.int16)).max() <= 2


@pytest.mark.parametrize("args,message", [
    (("--steps", "0"), "unet_steps (--steps) must be at least 1"),
    (("--text-encoder", "clip"), "must be one of evaluator-tuned, evaluator, scratch"),
    (("--noise-schedule", "cosine"), "must be one of linear, scaled_linear, scaled_linear_zero_snr"),
    (("--prediction-type", "epsilon"), "use it with --prediction-type v_prediction"),
    (("--snr-gamma", "0"), "snr_gamma (--snr-gamma) must be positive"),
    (("--timestep-sampling", "cosine"), "must be one of uniform, logit_normal"),
    (("--timestep-std", "0"), "timestep_std (--timestep-std) must be positive"),
    (("--noise-offset", "-0.1"), "noise_offset (--noise-offset) must be within [0, 1)"),
    (("--easy-share", "1.5"), "easy_share (--easy-share) must be within [0, 1]"),
    (("--world", "shapes"), "No such option: --world"),
    (("--caption-colour-p", "0"), "caption_colour_p (--caption-colour-p) must be within (0, 1]"),
    (("--timestep-mean", "nan"), "'--timestep-mean': nan is not a finite number"),
])
def test_toyworld_build_verb_validates(run_cli, tmp_path, args, message):
    code, _, err = run_cli("toyworld", "build", *args, "--out", tmp_path / "o", "--work", tmp_path / "w")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()
