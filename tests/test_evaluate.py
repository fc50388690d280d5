"""`multiconcept evaluate`: PNG metadata → which reference each image is scored
against, exact ToyWorld leakage, scales in the JSON, the overfitting slot, and
one-line errors for bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from multiconcept.data import load_image, load_mask
from multiconcept.models.tiny_evaluators import save_tiny_clip, save_tiny_vit
from multiconcept.toyworld import concept, layout_specs, render
from multiconcept.workflows.evaluate import evaluate
from multiconcept.workflows.generate import png_metadata
from multiconcept.workflows.sources import concept_crop, write_toyworld_source

TOKENS = ["<c1>", "<c2>"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"clip": str(save_tiny_clip(root / "clip", image_size=32)), "dino": str(save_tiny_vit(root / "vit"))}


def write_gen(path, image, prompt, seed=0, tokens=TOKENS, classes=("robot", "bird")):
    meta = {"prompt": prompt, "seed": seed, "steps": 2, "scheduler": "ddim", "guidance": 6.0, "tokens": list(tokens),
            "class_words": list(classes), "bundles": ["cells.safetensors"], "base": "tiny"}
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=png_metadata(meta))
    return path


def concept_scene(*names):
    layout = "center" if len(names) == 1 else "pair"
    specs = layout_specs([concept(n).creature for n in names], layout, np.random.default_rng(3), list(names))
    return render(specs, "gray", layout).pil()


@pytest.fixture
def toy(tmp_path):
    """A ToyWorld source and generations whose right answers are known."""
    src = write_toyworld_source("robot_a", "bird_b", tmp_path / "source", seed=1)  # robot on the left: <c1>
    assert [c.class_word for c in src.concepts] == ["robot", "bird"]
    image = load_image(src.image)
    crop2 = concept_crop(image, load_mask(src.concepts[1].mask, image.size))
    gen = tmp_path / "gen"
    write_gen(gen / "both" / "000000.png", image, "a <c1> robot and a <c2> bird")
    write_gen(gen / "c1" / "000000.png", concept_scene("robot_a"), "a <c1> robot on a gray background")
    write_gen(gen / "c1" / "000001.png", concept_scene("robot_a", "bird_b"), "a <c1> robot on a gray background", 1)
    write_gen(gen / "c2" / "000000.png", crop2, "a <c2> bird")
    (gen / "c2" / "attention").mkdir()
    Image.new("RGB", (8, 8)).save(gen / "c2" / "attention" / "000000_00_bird.png")  # heatmaps are not generations
    return {"source": src, "gen": gen, "dir": tmp_path}


def by_file(result):
    return {r["file"]: r for r in result["images"]}


def test_toyworld_sources_name_concepts_left_to_right(tmp_path):
    """The base draws the first-named subject on the left, so <c1> must be the left one."""
    from multiconcept.workflows.sources import load_source

    src = write_toyworld_source("robot_a", "bird_b", tmp_path / "a", seed=2)  # bird left, robot right
    assert [c.class_word for c in src.concepts] == ["bird", "robot"]
    assert src.concepts[0].signature == concept("bird_b").creature
    (tmp_path / "a" / "concepts.json").unlink()  # the scene.json reading names them the same way
    assert [c.class_word for c in load_source(tmp_path / "a").concepts] == ["bird", "robot"]
    assert load_source(tmp_path / "a").concepts[1].signature == concept("robot_a").creature


def test_image_scored_against_itself_gives_clip_i_one(tmp_path, models):
    img = concept_scene("robot_a")
    img.save(tmp_path / "ref.png")
    write_gen(tmp_path / "gen" / "000000.png", img, "a <c1> robot", tokens=["<c1>"], classes=["robot"])
    result = evaluate(tmp_path / "gen", [f"<c1>={tmp_path / 'ref.png'}"], clip=models["clip"], dino=models["dino"])
    (rec,) = result["images"]
    assert rec["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert rec["dino"] == pytest.approx(1.0, abs=1e-5)
    assert rec["text"] == "a robot"  # token removed, class word kept


def test_source_folder_references_leakage_and_scale_through_the_cli(toy, models, run_cli):
    out = toy["dir"] / "results.json"
    code, stdout, stderr = run_cli("evaluate", toy["gen"], "--reference", toy["source"].folder, "--clip", models["clip"],
                                   "--dino", models["dino"], "--scale", "clipscore", "--out", out)
    assert code == 0, stderr
    res = json.loads(out.read_text())
    recs = by_file(res)
    assert sorted(recs) == ["both/000000.png", "c1/000000.png", "c1/000001.png", "c2/000000.png"]
    both = recs["both/000000.png"]
    assert both["kind"] == "combined" and both["clip_i_against"] == "source image"
    assert both["clip_i"] == pytest.approx(1.0, abs=1e-5)  # the source image itself
    assert set(both["clip_i_subjects"]) == set(TOKENS)
    c2 = recs["c2/000000.png"]
    assert c2["kind"] == "<c2>" and c2["clip_i"] == pytest.approx(1.0, abs=1e-5)  # exactly the reference crop
    assert c2["dino"] == pytest.approx(1.0, abs=1e-5) and c2["leakage_clip_i"] < 1 - 1e-4
    assert recs["c1/000000.png"]["toyworld_leak"] == 0.0 and recs["c1/000000.png"]["toyworld_identity"] == 1.0
    assert recs["c1/000001.png"]["toyworld_leak"] == 1.0  # the other concept drawn beside it
    for r in res["images"]:
        assert r["clip_t_clipscore"] == pytest.approx(2.5 * max(r["clip_t"], 0.0))
    s = res["summary"]
    assert s["columns"] == ["combined", "<c1>", "<c2>"]
    assert s["<c1>"]["toyworld_leak"] == pytest.approx(0.5)
    assert s["mean"]["clip_i"] == pytest.approx(np.mean([s[c]["clip_i"] for c in s["columns"]]))
    assert res["models"]["scale_formula"] == "2.5*max(cos,0)" and res["models"]["clip"]["name"] == models["clip"]
    assert "Combined" in stdout and "wrote" in stdout


def test_reference_masks_cut_the_concept_crops(toy, models):
    src = toy["source"]
    masks = [f"{c.token}={c.mask}" for c in src.concepts]
    res = evaluate(toy["gen"], [str(src.image)], masks, clip=models["clip"])
    assert by_file(res)["c2/000000.png"]["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert "toyworld_leak" not in by_file(res)["c1/000000.png"]  # no ground truth without the source folder


def test_concept_crop_blanks_the_background_and_is_square():
    img = Image.fromarray(np.full((20, 30, 3), 7, np.uint8))
    mask = np.zeros((20, 30), np.uint8)
    mask[2:6, 3:13] = 255
    crop = np.asarray(concept_crop(img, Image.fromarray(mask)))
    assert crop.shape == (10, 10, 3)
    assert (crop[3:7] == 7).all() and (crop[:3] == 255).all() and (crop[7:] == 255).all()


def test_overfitting_slot_puts_the_result_under_overfitting(toy, models, monkeypatch, tmp_path):
    seen = {}

    def overfitting_report(base, bundles, out_dir, evaluator, seed):
        seen.update(base=base, bundles=bundles, out_dir=out_dir, evaluator=evaluator, seed=seed)
        return {"latent_fisher_divergence": 0.5}

    import multiconcept.workflows.overfitting as module

    monkeypatch.setattr(module, "overfitting_report", overfitting_report)
    bundle = tmp_path / "b.safetensors"
    bundle.write_bytes(b"x")
    res = evaluate(toy["gen"], [str(toy["source"].folder)], clip=models["clip"], overfitting=True, bundles=[str(bundle)],
                   out=tmp_path / "r.json", seed=3)
    assert res["overfitting"] == {"latent_fisher_divergence": 0.5}
    assert seen["base"] == "tiny" and seen["bundles"] == [str(bundle)] and seen["seed"] == 3
    assert seen["evaluator"] == models["clip"] and seen["out_dir"] == tmp_path / "r.overfitting"
    assert json.loads((tmp_path / "r.json").read_text())["overfitting"] == {"latent_fisher_divergence": 0.5}


def one_line_error(run_cli, *args):
    code, _, stderr = run_cli(*args)
    assert code == 2, stderr
    assert stderr.strip().count("\n") == 0 and stderr.startswith("error: ")
    return stderr


def test_bad_inputs_give_one_line_errors(toy, models, run_cli, monkeypatch, tmp_path):
    ref = ["--reference", toy["source"].folder, "--clip", models["clip"]]
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.new("RGB", (8, 8)).save(plain / "x.png")
    assert "no multiconcept metadata" in one_line_error(run_cli, "evaluate", plain, *ref)
    assert "does not exist" in one_line_error(run_cli, "evaluate", toy["gen"], "--reference", tmp_path / "nope.png",
                                              "--clip", models["clip"])
    assert "unknown scale 'huge'" in one_line_error(run_cli, "evaluate", toy["gen"], *ref, "--scale", "huge")
    assert "no reference for <c1>" in one_line_error(run_cli, "evaluate", toy["gen"], "--reference",
                                                     f"<c2>={toy['source'].image}", "--clip", models["clip"])
    (tmp_path / "empty").mkdir()
    assert "holds no PNG" in one_line_error(run_cli, "evaluate", tmp_path / "empty", *ref)
    assert "not a transformers model folder" in one_line_error(run_cli, "evaluate", toy["gen"], "--reference",
                                                               toy["source"].folder, "--clip", plain)
