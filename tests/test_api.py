"""The Python API as README shows it, run on the tiny base."""

import re
from pathlib import Path

import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_snippet_runs(scene, tmp_path, monkeypatch):
    # the snippet as printed, on the tiny base and with few steps (the only substitutions)
    code = readme_snippet()
    for old, new in ((re.search(r'BASE = "[^"]+"', code).group(0), 'BASE = "tiny"'),
                     ('{"steps": 400}', '{"steps": 2}'), ("steps=50", "steps=2")):
        assert old in code
        code = code.replace(old, new)
    for name, key in (("pets.jpg", "image"), ("cat_mask.png", "m1"), ("dog_mask.png", "m2")):
        Image.open(scene[key]).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    names = {}
    exec(compile(code, "README.md", "exec"), names)
    assert names["bundle"].tokens == ["<cat1>", "<dog1>"] and names["bundle"].method == "disendiff"
    assert len(names["images"]) == 4 and Image.open(tmp_path / "beach.png").size == (32, 32)


def test_typed_settings_are_checked_and_in_memory_images_accepted(scene, tmp_path):
    from multiconcept import Concept, Source, UserError, learn

    image = Image.open(scene["image"])
    progress = []
    b = learn("textual-inversion", [Concept("<a1>", "cat")], [Source(image)], tmp_path / "a.safetensors", base="tiny",
              settings={"steps": 3, "lr": 1e-3}, on_step=lambda p: progress.append(p.step))
    assert b.tokens == ["<a1>"] and progress == [1, 2, 3]
    with pytest.raises(UserError, match="setting steps='3' must be of type int"):
        learn("textual-inversion", [Concept("<a1>", "cat")], [Source(image)], tmp_path / "b.safetensors", base="tiny",
              settings={"steps": "3"})
    with pytest.raises(UserError, match="lr must be greater than 0"):
        learn("textual-inversion", [Concept("<a1>", "cat")], [Source(image)], tmp_path / "b.safetensors", base="tiny",
              settings={"lr": 0.0})
    stopped = learn("textual-inversion", [Concept("<a1>", "cat")], [Source(image)], tmp_path / "c.safetensors",
                    base="tiny", settings={"steps": 5}, cancel=lambda: len(progress) >= 4,
                    on_step=lambda p: progress.append(p.step))
    assert stopped is None and not (tmp_path / "c.safetensors").exists()
    assert (tmp_path / "c.safetensors.ckpt" / "checkpoint.safetensors").is_file()  # resume=True continues


def test_importing_the_package_and_its_cli_loads_no_torch():
    """`multiconcept --help` and the error paths stay fast: torch (seconds to import) loads on first use."""
    import subprocess
    import sys

    code = ("import sys, multiconcept, multiconcept.cli; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'gradio') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
