"""`multiconcept benchmark`: protocols, identical numbers on a re-run, resume,
the report's sections, Ray = local, and bad input."""

import json
from pathlib import Path

import pytest

from multiconcept.errors import UserError
from multiconcept.models.tiny_evaluators import save_tiny_clip
from multiconcept.protocols import COMBINED, expand, load_protocol, parse_protocol
from multiconcept.workflows.benchmark import BenchmarkSettings, benchmark, parse_seeds, seed_runs
from multiconcept.workflows.benchmark.report import SECTIONS
from multiconcept.workflows.benchmark.results import paired_units
from multiconcept.workflows.sources import write_toyworld_source

# A three-prompt protocol keeps the suite fast; the shipped files are checked below.
SMALL_PROTOCOL = "# test\n[both]\na {a} and a {b}\n[each]\na {x} on a gray background\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    (root / "small.txt").write_text(SMALL_PROTOCOL)
    write_toyworld_source("robot_a", "bird_b", root / "pair", seed=0)
    settings = BenchmarkSettings(
        methods=("textual-inversion", "custom-diffusion"), protocol=str(root / "small.txt"), base="tiny", steps=1,
        params=(("grad_accum", "1"),), seeds=(0, 1), sample_steps=2, clip=str(save_tiny_clip(root / "clip")),
        scale="clipscore", threads=1)
    first = benchmark([root / "pair"], settings, root / "a", progress=False)
    return {"root": root, "settings": settings, "first": first}


def numbers(results: dict) -> str:
    """Everything but the run's timings, as canonical JSON."""
    return json.dumps({k: v for k, v in results.items() if k != "run"}, sort_keys=True)


def test_first_run_scores_every_cell(setup):
    res, root = setup["first"], setup["root"]
    assert [c["method"] for c in res["cells"]] == ["textual-inversion", "custom-diffusion"]
    assert res["columns"] == ["combined", "concept 1", "concept 2", "mean"]
    for method in ("textual-inversion", "custom-diffusion"):
        table = res["table"][method]
        for key in ("image_alignment", "text_alignment", "text_alignment_clipscore", "leakage", "toyworld_leak"):
            assert key in table, key
        assert table["image_alignment"]["combined"] is not None and table["leakage"]["combined"] is None
        # one source, two seeds: two units; the table is their mean, the cell summary's mean of columns
        units = res["units"][method]["image_alignment"]
        assert sorted(units["mean"]) == ["pair/seed 0", "pair/seed 1"]
        cell = next(c for c in res["cells"] if c["method"] == method)
        assert table["image_alignment"]["mean"] == pytest.approx(cell["summary"]["mean"]["clip_i"])
        a, b = units["concept 1"].values()
        assert res["sem"][method]["image_alignment"]["concept 1"] == pytest.approx(abs(a - b) / 2)
    u = {m: res["units"][m]["image_alignment"]["mean"] for m in ("custom-diffusion", "textual-inversion")}
    d = paired_units(u["custom-diffusion"], u["textual-inversion"])
    diffs = [u["custom-diffusion"][k] - u["textual-inversion"][k] for k in u["custom-diffusion"]]
    assert d.n == 2 and d.mean == pytest.approx(sum(diffs) / 2)
    assert res["run"]["stages"]["generate"] == {"jobs": 12, "ran": 12, "seconds": res["run"]["stages"]["generate"]["seconds"]}
    saved = json.loads((root / "a" / "results.json").read_text())
    assert numbers(saved) == numbers(res)


def test_rerun_with_the_same_seeds_gives_identical_numbers(setup):
    root = setup["root"]
    again = benchmark([root / "pair"], setup["settings"], root / "b", progress=False)
    assert numbers(again) == numbers(setup["first"])
    for cell in ("pair/textual-inversion", "pair/custom-diffusion"):
        a, b = root / "a" / "cells" / cell, root / "b" / "cells" / cell
        assert (a / "bundle.safetensors").read_bytes() == (b / "bundle.safetensors").read_bytes()
        assert (a / "images/p01/000001.png").read_bytes() == (b / "images/p01/000001.png").read_bytes()


def test_resume_recomputes_only_what_is_missing(setup):
    root, settings = setup["root"], setup["settings"]
    res = benchmark([root / "pair"], settings, root / "a", progress=False)
    assert {k: v["ran"] for k, v in res["run"]["stages"].items()} == {"learn": 0, "generate": 0, "score": 0}
    (root / "a/cells/pair/custom-diffusion/images/p02/000001.png").unlink()
    res = benchmark([root / "pair"], settings, root / "a", progress=False)
    assert {k: v["ran"] for k, v in res["run"]["stages"].items()} == {"learn": 0, "generate": 1, "score": 1}
    assert numbers(res) == numbers(setup["first"])


def test_changed_settings_in_the_same_folder_are_refused(setup):
    root = setup["root"]
    other = BenchmarkSettings(**{**setup["settings"].__dict__, "seeds": (5,)})
    with pytest.raises(UserError, match="other settings"):
        benchmark([root / "pair"], other, root / "a", progress=False)


def test_report_contains_every_section(setup):
    page = (setup["root"] / "a" / "report.html").read_text()
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page, title
    assert page.count("data:image/png;base64") >= 2 * 3 * 2 + 1  # the grids (methods x prompts x seeds) and the chart
    assert "alignment vs leakage" in page and "Concept 1" in page and "Mean" in page
    assert page.count(" · T ") == 2 * 3  # each grid cell (methods x prompts) carries its prompt's scores
    assert "_a1" not in page and "attention" in page.lower()
    assert "http" not in page.replace("http-equiv", "")  # offline: nothing to fetch


def test_ray_gives_the_same_numbers_as_the_local_executor(setup):
    pytest.importorskip("ray")
    root, first = setup["root"], setup["first"]
    one = BenchmarkSettings(**{**setup["settings"].__dict__, "methods": ("custom-diffusion",)})  # half the jobs
    res = benchmark([root / "pair"], one, root / "ray", use_ray=True, ray_cpus=1, progress=False)
    assert res["run"]["executor"] == "ray" and res["run"]["stages"]["generate"]["ran"] == 6
    assert json.dumps(res["cells"], sort_keys=True) == json.dumps(first["cells"][1:], sort_keys=True)
    assert res["table"]["custom-diffusion"] == first["table"]["custom-diffusion"]


def test_cli_benchmark_and_its_errors(setup, run_cli, tmp_path):
    root = setup["root"]
    # toyworld:A+B renders the same scene as write_toyworld_source, so the cells line up with the fixture's
    common = ["--source", "toyworld:robot_a+bird_b@0", "--protocol", root / "small.txt", "--base", "tiny",
              "--steps", "1", "-p", "grad_accum=1", "--sample-steps", "2", "--clip", setup["settings"].clip,
              "--no-progress"]
    code, stdout, stderr = run_cli("benchmark", "--methods", "textual-inversion", "--seeds", "3", "-o", tmp_path / "cli",
                                   *common)
    assert code == 0, stderr
    assert "wrote" in stdout and (tmp_path / "cli" / "report.html").is_file()
    saved = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert saved["settings"]["seeds"] == [3] and saved["sources"][0]["name"] == "robot_a+bird_b@0"
    rendered = tmp_path / "cli" / "sources" / "robot_a+bird_b@0"
    assert (rendered / "image.png").read_bytes() == (root / "pair" / "image.png").read_bytes()

    def fails(*args, match):
        code, _, stderr = run_cli("benchmark", *args)
        assert code == 2 and match in stderr and stderr.strip().count("\n") == 0, stderr

    fails("--methods", "nope", "-o", tmp_path / "x", *common, match="nope")
    (tmp_path / "bare").mkdir()
    fails("--methods", "textual-inversion", "-o", tmp_path / "x", *common[2:], "--source", tmp_path / "bare",
          match="has no concepts.json")
    fails("--methods", "textual-inversion", "--seeds", "a-b", "-o", tmp_path / "x", *common, match="--seeds")
    fails("--methods", "textual-inversion", "-o", tmp_path / "x", *common[2:], "--source", "toyworld:robot_a+nope",
          match="toyworld:A+B")
    fails("--methods", "textual-inversion", "-o", tmp_path / "x", *common[2:], "--source", "toyworld:robot_a+robot_b",
          match="needs two kinds")
    fails("--methods", "textual-inversion", "--scale", "huge", "-o", tmp_path / "x", *common, match="unknown scale")


# ---------------------------------------------------------------- protocols

def test_shipped_protocols():
    two = load_protocol("two-concept")
    assert len(two.both) == 10 and len(two.each) == 10
    prompts = expand(two, [("<c1>", "cat"), ("<c2>", "dog")])
    assert len(prompts) == 30
    assert [p.kind for p in prompts].count(COMBINED) == 10 and [p.kind for p in prompts].count("<c2>") == 10
    assert prompts[1].text == "a <c1> cat and a <c2> dog on the beach"
    toy = load_protocol("two-concept", "toyworld")
    assert toy.path.name == "two-concept.toyworld.txt" and len(toy.both) == 10 and len(toy.each) == 10
    assert any("background" in p for p in toy.each) and not any("beach" in p for p in toy.both + toy.each)
    db = load_protocol("dreambench")
    assert len(db.each) == 25 and db.each[2] == "a {x} on the beach" and not db.both
    assert "CC-BY-4.0" in db.path.read_text()
    assert len(load_protocol("dreambench", "toyworld").each) == 25
    assert len(load_protocol("multi-subject").both) == 10


def test_protocol_errors():
    with pytest.raises(UserError, match="unknown protocol"):
        load_protocol("nope")
    with pytest.raises(UserError, match="needs {x}"):
        parse_protocol("[each]\na {a} here\n")
    with pytest.raises(UserError, match="unknown section"):
        parse_protocol("[all]\na {a}\n")
    with pytest.raises(UserError, match="one concept"):
        expand(load_protocol("two-concept"), [("<c1>", "cat")])


def test_seeds_and_runs():
    assert parse_seeds("0-3,10") == (0, 1, 2, 3, 10)
    with pytest.raises(UserError):
        parse_seeds("1,1")
    # the first seed alone (its batch records heatmaps), then consecutive batches
    assert seed_runs((0, 1, 2, 3, 4, 5, 9), 2) == [(0,), (1, 2), (3, 4), (5,), (9,)]


def test_dreambench_file_keeps_the_published_templates():
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench_prompts.json"  # shared/ beside the repo
    if not data.is_file():
        pytest.skip("the shared DreamBench prompt list is not beside this checkout")
    published = json.loads(data.read_text())["object_prompts"]
    assert [t.replace("{token} {cls}", "{x}") for t in published] == list(load_protocol("dreambench").each)


def test_protocol_prompts_name_concepts_the_method_way():
    from multiconcept.methods import get_method
    from multiconcept.protocols import expand, load_protocol

    protocol = load_protocol("two-concept", "toyworld")
    concepts = [("<c1>", "robot"), ("<c2>", "bird")]
    cd = expand(protocol, concepts, get_method("custom-diffusion").prompt_phrase)
    inf = expand(protocol, concepts, get_method("infusion").prompt_phrase)
    assert all("<c1> robot" in p.text for p in cd if p.kind == "<c1>")
    assert all("<c" not in p.text and "robot" in p.text for p in inf if p.kind == "<c1>")
