"""Every kind of bad input: one line naming the problem and the fix, exit code 2,
no traceback, nothing left behind. Inputs are made here; most run through
main() in-process, the usage errors through the installed entry point."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ENTRY = str(Path(sys.executable).with_name("multiconcept"))


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def refused(result, *fragments):
    code, _, stderr = result
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (the pixel data is tiny):
    a decompression bomb as far as any reader that trusts the header knows."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x00"))
                     + chunk(b"IEND", b""))
    return path


def learn(scene, out, *extra, image=None, m1=None):
    return ["learn", "-m", "custom-diffusion", "-c", "<a1>=cat", "-c", "<b1>=dog", "-i", image or scene["image"],
            "--mask", f"<a1>={m1 or scene['m1']}", "--mask", f"<b1>={scene['m2']}", "-o", out, "--base", "tiny",
            "--steps", "2", "--no-progress", *extra]


# ---------------------------------------------------------------- usage errors, through the real entry point

@pytest.mark.parametrize("args, fragment", [
    (["learn", "--bogus"], "No such option: --bogus"),
    (["learn", "-m", "lora", "-c", "<a>=cat", "-i", "x.png", "-o", "b.safetensors", "--lr", "abc"], "'--lr'"),
    (["generate", "a cat", "-n", "abc"], "'-n'"),
    (["learn", "-m", "lora", "-c", "<a>=cat", "-i", "x.png"], "Missing option '--out'"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_usage_errors_are_one_line_exit_2(tmp_path, args, fragment):
    r = subprocess.run([ENTRY, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    line = refused((r.returncode, r.stdout, r.stderr), fragment)
    assert "--help" in line
    assert tree(tmp_path) == set()


def test_no_arguments_prints_help_once():
    r = subprocess.run([ENTRY], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.count("Usage") == 1 and not r.stderr


def test_the_error_comes_first_and_alone_on_the_toyworld_base(tmp_path):
    """Errors found after the base loads: no loading bars or deprecation notes before them."""
    from multiconcept.models import toyworld_available

    if not toyworld_available():
        pytest.skip("ToyWorld base not installed")
    prompt = "a robot " + "and a bird " * 40
    r = subprocess.run([ENTRY, "generate", prompt, "-o", str(tmp_path / "out"), "--steps", "1"], capture_output=True,
                       text=True, timeout=300)
    refused((r.returncode, r.stdout, r.stderr), "longer than the text encoder's limit")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- images

@pytest.mark.parametrize("side", [9000, 100_000])  # over our limit; over PIL's own decompression-bomb limit
def test_oversized_images_are_refused_wherever_read(scene, run_cli, tmp_path, side):
    bomb = png_claiming(tmp_path / "bomb.png", side, side)
    before = tree(tmp_path)
    cases = [
        learn(scene, tmp_path / "a.safetensors", image=bomb),
        learn(scene, tmp_path / "a.safetensors", m1=bomb),
        ["generate", "a cat", "--init-image", bomb, "--inpaint-mask", scene["m1"], "-o", tmp_path / "g", "--base", "tiny"],
        ["generate", "a cat", "--init-image", scene["image"], "--inpaint-mask", bomb, "-o", tmp_path / "g", "--base", "tiny"],
        ["evaluate", tmp_path / "gens", "--reference", bomb, "-o", tmp_path / "r.json"],
        ["compose", "a cat <img>", "-s", bomb, "--model", tmp_path, "-o", tmp_path / "c"],
    ]
    for args in cases:
        if args[0] == "evaluate":  # needs a generation to score
            from multiconcept.workflows.generate import png_metadata

            (tmp_path / "gens").mkdir()
            meta = {"prompt": "a cat", "steps": 1, "scheduler": "ddim", "guidance": 6.0, "seed": 0, "tokens": []}
            Image.new("RGB", (32, 32)).save(tmp_path / "gens" / "000000.png", pnginfo=png_metadata(meta))
            before = tree(tmp_path)
        line = refused(run_cli(*args), "bomb.png")
        assert ("8192" in line) if side == 9000 else ("decompression-bomb" in line), line
        assert tree(tmp_path) == before, args


def test_max_image_side_is_a_setting(scene, run_cli, tmp_path, monkeypatch):
    from multiconcept.images import limits

    monkeypatch.setattr(limits, "max_side", limits.max_side)  # the option sets it for the process
    big = tmp_path / "big.png"
    Image.new("RGB", (48, 48)).save(big)
    refused(run_cli("--max-image-side", "40", *learn(scene, tmp_path / "a.safetensors", image=big)), "over the limit of 40")
    refused(run_cli("--max-image-side", "8", "methods"), "--max-image-side must be at least 32")


def test_too_small_source_and_non_mask_masks(scene, run_cli, tmp_path):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (200, 0, 0)).save(tiny)
    refused(run_cli(*learn(scene, tmp_path / "a.safetensors", image=tiny)), "1x1 pixels, too small to learn from", "32")
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(noise)
    refused(run_cli(*learn(scene, tmp_path / "a.safetensors", m1=noise)), "is not a mask", "white on black")
    assert not (tmp_path / "a.safetensors").exists()


def test_a_source_image_of_one_flat_colour_is_refused(scene, run_cli, tmp_path):
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(clear)  # fully transparent: reads as all white
    flat = tmp_path / "flat.png"
    Image.new("RGB", (40, 40), (90, 90, 90)).save(flat)
    for image in (clear, flat):
        refused(run_cli(*learn(scene, tmp_path / "a.safetensors", image=image)), str(image), "one flat colour throughout")
    assert not (tmp_path / "a.safetensors").exists()
    # a plain object inside its mask is fine: only a whole image without a second colour holds nothing
    plain = np.full((40, 40, 3), 90, np.uint8)
    plain[10:30, 10:30] = (200, 40, 40)
    Image.fromarray(plain).save(tmp_path / "plain.png")
    Image.fromarray(((plain[..., 0] == 200) * 255).astype(np.uint8)).save(tmp_path / "plain_mask.png")
    args = ["learn", "-m", "custom-diffusion", "-c", "<a1>=cat", "-i", tmp_path / "plain.png", "--mask",
            f"<a1>={tmp_path / 'plain_mask.png'}", "-o", tmp_path / "a.safetensors", "--base", "tiny", "--steps", "1",
            "--no-progress"]
    assert run_cli(*args)[0] == 0


def test_one_loader_rgba_is_white_in_images_and_black_in_masks(tmp_path):
    from multiconcept.images import read_image, read_mask

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 8:24] = (255, 255, 255, 255)  # an opaque white square on transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image, mask = np.asarray(read_image(tmp_path / "a.png")), np.asarray(read_mask(tmp_path / "a.png"))
    assert (image[0, 0] == 255).all() and mask[0, 0] == 0 and mask[16, 16] == 255


# ---------------------------------------------------------------- numbers

@pytest.mark.parametrize("extra, fragment", [
    (["--batch-size", "0"], "'--batch-size'"),
    (["--grad-accum", "0"], "'--grad-accum'"),
    (["--lr", "nan"], "'--lr'"),
    (["--lr", "-1"], "'--lr'"),
    (["--param", "lr=nan"], "setting lr must be a finite number"),
    (["--param", "batch_size=0"], "setting batch_size must be at least 1"),
    (["--param", "flip_p=2"], "flip_p is a probability"),
])
def test_learn_numbers_out_of_range(scene, run_cli, tmp_path, extra, fragment):
    before = tree(tmp_path)
    refused(run_cli(*learn(scene, tmp_path / "a.safetensors", *extra)), fragment)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("extra, fragment", [
    (["--steps", "0"], "'--steps'"),
    (["--guidance", "nan"], "'--guidance'"),
    (["-n", "0"], "'-n'"),
    (["--lora-scale", "inf"], "'--lora-scale'"),
])
def test_generate_numbers_out_of_range_leave_no_folder(run_cli, tmp_path, extra, fragment):
    refused(run_cli("generate", "a cat", "-o", tmp_path / "out", "--base", "tiny", *extra), fragment)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- output paths

def test_learn_output_checked_before_training(scene, run_cli, tmp_path):
    (tmp_path / "folder.safetensors").mkdir()
    refused(run_cli(*learn(scene, tmp_path / "folder.safetensors")), "is a folder")
    refused(run_cli(*learn(scene, tmp_path / "x.bin")), "must end in .safetensors")


def test_existing_bundle_needs_overwrite(scene, run_cli, tmp_path):
    out = tmp_path / "a.safetensors"
    assert run_cli(*learn(scene, out))[0] == 0
    first = out.read_bytes()
    refused(run_cli(*learn(scene, out, "--seed", "1")), "already exists", "--overwrite")
    assert out.read_bytes() == first
    assert run_cli(*learn(scene, out, "--seed", "1", "--overwrite"))[0] == 0
    assert out.read_bytes() != first


def test_generate_output_is_a_file_or_holds_the_same_seeds(run_cli, tmp_path):
    (tmp_path / "file").write_text("mine")
    refused(run_cli("generate", "a cat", "-o", tmp_path / "file", "--base", "tiny", "--steps", "1", "-n", "1"), "is a file")
    assert (tmp_path / "file").read_text() == "mine"
    args = ["generate", "a cat", "-o", tmp_path / "g", "--base", "tiny", "--steps", "1", "-n", "1"]
    assert run_cli(*args)[0] == 0
    kept = (tmp_path / "g" / "000000.png").read_bytes()
    refused(run_cli(*args), "000000.png already exists", "--overwrite")
    assert (tmp_path / "g" / "000000.png").read_bytes() == kept
    assert run_cli(*args, "--overwrite")[0] == 0


# ---------------------------------------------------------------- checkpoints

def test_resume_from_a_corrupt_checkpoint_says_how_to_start_over(scene, run_cli, tmp_path):
    out = tmp_path / "a.safetensors"
    ckpt = tmp_path / "a.safetensors.ckpt" / "checkpoint.safetensors"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{trunc")
    line = refused(run_cli(*learn(scene, out, "--resume")), "checkpoint", "corrupt or truncated", "to start over")
    assert str(ckpt.parent) in line and not out.exists()


def test_temp_files_of_a_killed_write_are_cleaned(scene, run_cli, tmp_path):
    out = tmp_path / "a.safetensors"
    work = tmp_path / "a.safetensors.ckpt"
    work.mkdir()
    (work / ".checkpoint.safetensors.k3j2.tmp").write_bytes(b"half")
    (tmp_path / ".a.safetensors.x9q1.tmp").write_bytes(b"half")
    assert run_cli(*learn(scene, out, "--resume"))[0] == 0
    assert tree(tmp_path) - {"scene.png", "m1.png", "m2.png"} == {"a.safetensors"}


# ---------------------------------------------------------------- prompts and logs

def test_prompt_token_no_bundle_defines(scene, run_cli, tmp_path):
    bundle = tmp_path / "a.safetensors"
    assert run_cli(*learn(scene, bundle))[0] == 0
    line = refused(run_cli("generate", "a <a1> cat and a <x> dog", "-b", bundle, "-o", tmp_path / "g", "--base", "tiny"),
                   "<x>", "no loaded bundle defines")
    assert "<a1>, <b1>" in line and not (tmp_path / "g").exists()
    refused(run_cli("generate", "a <x> cat", "-o", tmp_path / "g", "--base", "tiny"), "no bundle is loaded")


def test_log_file_keeps_the_steps_of_a_killed_run(scene, tmp_path):
    log = tmp_path / "log.jsonl"
    args = learn(scene, tmp_path / "a.safetensors", "--param", f"log_file={log}")
    args[args.index("--steps") + 1] = "100000"
    proc = subprocess.Popen([ENTRY, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and (not log.exists() or log.read_text().count("\n") < 3):
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    lines = log.read_text().splitlines()
    assert len(lines) >= 3, "the log holds no step of a run killed after three steps"
    assert [json.loads(l)["step"] for l in lines[:3]] == [1, 2, 3]
