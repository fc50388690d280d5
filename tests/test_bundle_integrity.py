"""Bundles prove their integrity; export and --lora refuse files that do not fit, leaving nothing behind.

Every bad file here is made by the test from a bundle learned on the tiny base, and refused through
the real entry point: one line on stderr starting "error:", exit code 2, nothing written.
"""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from multiconcept.bundle import DIGEST_FIELD, HEADER_KEY, load_bundle, save_bundle

ENTRY_POINT = Path(sys.executable).parent / "multiconcept"


def _cli(*args) -> int:
    """main() in-process without capsys, for module-scoped fixtures."""
    from multiconcept import cli

    saved = sys.argv
    sys.argv = ["multiconcept", *map(str, args)]
    try:
        cli.main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = saved
    return 0


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A Custom Diffusion bundle (tokens + K/V deltas) learned on the tiny base through the CLI."""
    d = tmp_path_factory.mktemp("learned")
    a = np.full((32, 32, 3), 128, np.uint8)
    a[4:14, 4:14] = (230, 30, 30)
    Image.fromarray(a).save(d / "scene.png")
    out = d / "cd.safetensors"
    code = _cli("learn", "-m", "custom-diffusion", "-c", "<a1>=cat", "-i", d / "scene.png", "-o", out,
                "--base", "tiny", "--steps", "2", "--grad-accum", "1", "--no-progress")
    assert code == 0
    return out


def one_line_error(code: int, stderr: str, *phrases: str) -> str:
    assert code == 2, stderr
    assert stderr.startswith("error: ") and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    for p in phrases:
        assert p in stderr, (p, stderr)
    return stderr.strip()


def copy_to(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def data_offset(path: Path) -> int:
    """Where the tensor bytes start: 8-byte header length + the JSON header."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def write_old_style(path: Path, header: dict, tensors: dict) -> Path:
    """A bundle as multiconcept wrote them before the digest: the header key only."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={HEADER_KEY: json.dumps(header)})
    return path


def header_of(path: Path) -> dict:
    """The header as bundles written before the digest held it."""
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[HEADER_KEY])
    header.pop(DIGEST_FIELD)
    return header


def generate_args(bundle, out):
    return ["generate", "a <a1> cat", "-b", bundle, "-n", "1", "--steps", "1", "-o", out, "--base", "tiny"]


# ---------------------------------------------------------------- digest

def test_new_bundles_are_verified_and_old_ones_load_unchecked(learned, run_cli, tmp_path):
    with safe_open(str(learned), framework="pt") as f:
        assert len(json.loads(f.metadata()[HEADER_KEY])[DIGEST_FIELD]) == 64
    code, stdout, stderr = run_cli("inspect", learned)
    assert code == 0 and "integrity: verified" in stdout, stderr
    assert json.loads(run_cli("inspect", learned, "--json")[1])["integrity"] == "verified"

    old = write_old_style(tmp_path / "old.safetensors", header_of(learned), load_file(str(learned)))
    code, stdout, stderr = run_cli("inspect", old)
    assert code == 0 and "integrity: unchecked" in stdout, stderr
    code, _, stderr = run_cli(*generate_args(old, tmp_path / "g"))
    assert code == 0 and stderr.strip() == "", stderr
    assert [p.name for p in (tmp_path / "g").iterdir()] == ["000000.png"]


def test_digest_is_the_content_not_the_layout(learned, tmp_path):
    """Re-saving the same bundle (another file, tensors in another order) gives the same digest."""
    b = load_bundle(learned)
    b.tensors = dict(reversed(list(b.tensors.items())))
    again = save_bundle(b, tmp_path / "again.safetensors")
    with safe_open(str(learned), framework="pt") as f1, safe_open(str(again), framework="pt") as f2:
        assert json.loads(f1.metadata()[HEADER_KEY])[DIGEST_FIELD] == json.loads(f2.metadata()[HEADER_KEY])[DIGEST_FIELD]


@pytest.mark.parametrize("where", ["tensor bytes", "header"])
def test_flipped_byte_is_refused_by_the_installed_command(learned, run_cli, tmp_path, where):
    bad = copy_to(learned, tmp_path / "bad.safetensors")
    raw = bytearray(bad.read_bytes())
    if where == "tensor bytes":
        raw[data_offset(bad) + 7] ^= 0x01  # low mantissa bit of a float: still a finite, plausible value
    else:
        # a hyper-parameter's digit in the header text (JSON inside the file's JSON, so quotes are escaped):
        # the header still parses, only its values differ
        key = b'\\"seed\\": '
        i = raw.index(key) + len(key)
        assert raw[i : i + 1] == b"0"
        raw[i : i + 1] = b"7"
    bad.write_bytes(bytes(raw))
    out = tmp_path / "g"
    if where == "tensor bytes":  # once through the installed command (a subprocess costs seconds of imports)
        r = subprocess.run([str(ENTRY_POINT), *map(str, generate_args(bad, out))], capture_output=True, text=True)
        code, stderr = r.returncode, r.stderr
    else:
        code, _, stderr = run_cli(*generate_args(bad, out))
    one_line_error(code, stderr, f"bundle {bad} is corrupt (content sha256", "re-learn it or restore a copy")
    assert not out.exists()


def test_truncated_bundle_is_refused(learned, run_cli, tmp_path):
    bad = tmp_path / "cut.safetensors"
    raw = learned.read_bytes()
    bad.write_bytes(raw[: (data_offset(learned) + len(raw)) // 2])
    code, _, stderr = run_cli(*generate_args(bad, tmp_path / "g"))
    one_line_error(code, stderr, f"{bad} is not a readable .safetensors bundle", "truncated")
    assert not (tmp_path / "g").exists()


# ---------------------------------------------------------------- values

def _with_value(learned, value) -> dict:
    tensors = load_file(str(learned))
    name = next(k for k in sorted(tensors) if k.startswith("unet_delta/"))
    t = tensors[name].clone()
    t.view(-1)[3] = value
    tensors[name] = t
    return tensors, name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensor_in_an_old_bundle_is_corrupt(learned, run_cli, tmp_path, value):
    tensors, name = _with_value(learned, value)
    bad = write_old_style(tmp_path / "nan.safetensors", header_of(learned), tensors)
    code, _, stderr = run_cli(*generate_args(bad, tmp_path / "g"))
    one_line_error(code, stderr, f"bundle {bad} is corrupt ({name} holds NaN or infinite values)")
    assert not (tmp_path / "g").exists()


def test_non_finite_tensor_with_a_valid_digest_is_a_diverged_run(learned, run_cli, tmp_path):
    tensors, name = _with_value(learned, float("nan"))
    b = load_bundle(learned)
    b.tensors = tensors
    bad = save_bundle(b, tmp_path / "diverged.safetensors")
    code, _, stderr = run_cli("inspect", bad)
    one_line_error(code, stderr, f"holds NaN or infinite values in {name} (training diverged)", "lower --lr")


def test_huge_values_warn_in_one_line_and_still_load(learned, tmp_path, caplog):
    tensors, name = _with_value(learned, 1e30)
    b = load_bundle(learned)
    b.tensors = tensors
    odd = save_bundle(b, tmp_path / "huge.safetensors")
    # the installed command: the warning must reach the terminal as one line (in-process, pytest takes the log)
    r = subprocess.run([str(ENTRY_POINT), "inspect", str(odd)], capture_output=True, text=True)
    assert r.returncode == 0 and "integrity: verified" in r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: bundle {odd}: {name} has values up to 1e+30, "), r.stderr
    # a trained bundle stays below the bound: no warning for it
    with caplog.at_level(logging.WARNING, logger="multiconcept"):
        load_bundle(learned)
        assert caplog.records == []
        load_bundle(odd)
        assert [r.levelname for r in caplog.records] == ["WARNING"]


@pytest.mark.parametrize("change,phrase", [
    (lambda h: h.pop("method"), "'method' is missing"),
    (lambda h: h.update(tokens="<a1>"), "'tokens' is missing or not a JSON list"),
    (lambda h: h.update(class_words=[]), "1 tokens but 0 class words"),
    (lambda h: h.update(format_version=True), "format version True"),
])
def test_header_missing_a_field_is_refused(learned, run_cli, tmp_path, change, phrase):
    header = header_of(learned)
    change(header)
    bad = write_old_style(tmp_path / "h.safetensors", header, load_file(str(learned)))
    code, _, stderr = run_cli("inspect", bad)
    one_line_error(code, stderr, phrase)


# ---------------------------------------------------------------- export

def _refit(learned, tmp_path, rename) -> Path:
    """The learned bundle with its tensors renamed or reshaped, saved with a valid digest."""
    b = load_bundle(learned)
    b.tensors = dict(rename(b.tensors))
    return save_bundle(b, tmp_path / "refit.safetensors")


@pytest.mark.parametrize("rename,phrase", [
    (lambda t: ((k.replace("attn2", "attn9"), v) for k, v in t.items()), "which this base's UNet does not have"),
    (lambda t: ((k, v[:-1] if k.startswith("token_embedding/") else v) for k, v in t.items()),
     "but this base's text encoder uses (32,)"),
    (lambda t: ((k, v[:, :-1] if k.startswith("unet_delta/") else v) for k, v in t.items()), "has shape"),
    (lambda t: ((k.replace("unet_delta/", "value_residual/").replace("token_embedding/", "other/"), v)
                for k, v in t.items()), "holds nothing diffusers can load"),
])
def test_export_refuses_tensors_that_do_not_fit_and_writes_nothing(learned, run_cli, tmp_path, rename, phrase):
    bad = _refit(learned, tmp_path, rename)
    out = tmp_path / "exp" / "nested"
    code, _, stderr = run_cli("export", bad, "-o", out, "--base", "tiny")
    one_line_error(code, stderr, phrase)
    assert not (tmp_path / "exp").exists()
    # into an existing folder: its files stay as they were, and no staging folder is left
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "README.md").write_text("mine")
    code, _, stderr = run_cli("export", bad, "-o", keep, "--base", "tiny")
    one_line_error(code, stderr, phrase)
    assert [p.name for p in keep.iterdir()] == ["README.md"] and (keep / "README.md").read_text() == "mine"


def test_export_into_an_existing_file_is_refused(learned, run_cli, tmp_path):
    f = tmp_path / "exp.txt"
    f.write_text("mine")
    code, _, stderr = run_cli("export", learned, "-o", f, "--base", "tiny")
    one_line_error(code, stderr, f"--out {f} is an existing file")
    assert f.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["exp.txt"]


def test_export_into_an_existing_folder_adds_its_files(learned, run_cli, tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    code, _, stderr = run_cli("export", learned, "-o", keep, "--base", "tiny")
    assert code == 0, stderr
    assert sorted(p.name for p in keep.iterdir()) == ["README.md", "a1.safetensors", "notes.txt",
                                                      "pytorch_custom_diffusion_weights.safetensors"]


# ---------------------------------------------------------------- --lora

def tiny_lora(path: Path) -> Path:
    """A diffusers-format LoRA on one of the tiny UNet's attention layers (rank 4, width 32)."""
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    g = torch.Generator().manual_seed(0)
    save_file({f"{layer}.lora_A.weight": torch.randn(4, 32, generator=g),
               f"{layer}.lora_B.weight": torch.randn(32, 4, generator=g)}, str(path))
    return path


def test_a_well_formed_lora_loads(learned, run_cli, tmp_path):
    """The control for the bad LoRAs below: the file they are cut from is accepted."""
    code, _, stderr = run_cli(*generate_args(learned, tmp_path / "g"), "--lora", tiny_lora(tmp_path / "l.safetensors"))
    assert code == 0, stderr


def _random_bytes(p: Path) -> Path:
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return p


def _truncated(p: Path) -> Path:
    raw = tiny_lora(p).read_bytes()
    p.write_bytes(raw[: len(raw) - 100])
    return p


def _wrong_keys(p: Path) -> Path:
    save_file({"text_model.embeddings.weight": torch.zeros(4, 32)}, str(p))
    return p


def _lora_keys_for_no_layer(p: Path) -> Path:
    save_file({"decoder.mid.lora_A.weight": torch.zeros(4, 32), "decoder.mid.lora_B.weight": torch.zeros(32, 4)}, str(p))
    return p


def _wrong_size(p: Path) -> Path:
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    save_file({f"{layer}.lora_A.weight": torch.zeros(4, 48), f"{layer}.lora_B.weight": torch.zeros(32, 4)}, str(p))
    return p


def _nan(p: Path) -> Path:
    sd = load_file(str(tiny_lora(p)))
    next(iter(sd.values()))[0, 0] = float("nan")
    save_file(sd, str(p))
    return p


@pytest.mark.parametrize("make,phrase", [
    (_random_bytes, "is corrupt or not a safetensors file"),
    (_truncated, "is corrupt or not a safetensors file"),
    (_wrong_keys, "does not fit this base"),
    (_lora_keys_for_no_layer, "changes no layer of this base"),
    (_wrong_size, "does not fit this base"),
    (_nan, "holds NaN or infinite values"),
])
def test_bad_lora_file_is_one_line_naming_it(learned, run_cli, tmp_path, make, phrase):
    lora = make(tmp_path / "style.safetensors")
    out = tmp_path / "g"
    code, stdout, stderr = run_cli(*generate_args(learned, out), "--lora", lora)
    one_line_error(code, stderr, f"LoRA {lora} ", phrase)
    assert stdout.strip() == "" and not out.exists()
