import os
import socket
import sys

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def write_scene(folder) -> dict:
    """A 32x32 image with a red square (concept 1) and a blue square (concept 2) and their masks, in `folder`."""
    a = np.full((32, 32, 3), 128, np.uint8)
    a[4:14, 4:14] = (230, 30, 30)
    a[18:30, 18:30] = (30, 30, 230)
    img = folder / "scene.png"
    Image.fromarray(a).save(img)
    m1 = np.zeros((32, 32), np.uint8)
    m1[4:14, 4:14] = 255
    m2 = np.zeros((32, 32), np.uint8)
    m2[18:30, 18:30] = 255
    Image.fromarray(m1).save(folder / "m1.png")
    Image.fromarray(m2).save(folder / "m2.png")
    return {"image": str(img), "m1": str(folder / "m1.png"), "m2": str(folder / "m2.png"), "dir": folder}


@pytest.fixture
def scene(tmp_path):
    return write_scene(tmp_path)


@pytest.fixture(scope="module")
def module_scene(tmp_path_factory):
    """`scene`, once per test module (for module-scoped fixtures that learn from it)."""
    return write_scene(tmp_path_factory.mktemp("scene"))


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run `multiconcept ARGS` in-process through main(); returns (exit code, stdout, stderr)."""
    from multiconcept import cli

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["multiconcept", *map(str, args)])
        code = 0
        try:
            cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="module")
def subject_folder(tmp_path_factory):
    """Two ToyWorld scenes of two subjects each, with their masks, as `train-encoder --data` reads them."""
    from multiconcept.toyworld import concept, layout_specs, render
    from multiconcept.workflows.train_encoder import Annotation, Record, write_subject_folder

    folder = tmp_path_factory.mktemp("subjects")
    recs = []
    for i, (a, b) in enumerate([("robot_a", "bird_b"), ("ghost_c", "robot_b")]):
        creatures = [concept(a).creature, concept(b).creature]
        scene = render(layout_specs(creatures, "pair", np.random.default_rng(i)), "gray", "pair")
        recs.append(Record(scene.image, f"a {creatures[0].words()} and a {creatures[1].words()} on a gray background",
                           [Annotation(s.creature.kind, s.mask, s.box) for s in scene.subjects]))
    return write_subject_folder(recs, folder)


@pytest.fixture(scope="session")
def free_port():
    """Call it for a TCP port on 127.0.0.1 that nothing listens on now (for a server or a launcher a test starts)."""
    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick
