"""The web page's plain parts (no browser, no gradio): masks painted in the editor, the serving
rules, the job runner, and the API calls the page makes (test_ui_browser.py drives the page)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from multiconcept.errors import UserError
from multiconcept.ui.jobs import Cancels, run_streaming
from multiconcept.ui.launch import check_exposure, is_loopback, parse_auth
from multiconcept.ui.masks import editor_value, mask_from_editor, paint_size


def canvas_with_stroke(size=(512, 512), box=(64, 128, 192, 256)):
    layer = np.zeros((size[1], size[0], 4), np.uint8)
    x0, y0, x1, y1 = box
    layer[y0:y1, x0:x1] = (255, 40, 140, 255)
    return layer


def test_the_painted_layer_becomes_the_mask_at_the_image_size():
    image = Image.new("RGB", (64, 64), (20, 20, 20))
    value = editor_value(image)
    assert value["background"].size == (512, 512) and value["layers"] == []
    value = {**value, "layers": [canvas_with_stroke()]}
    mask = np.asarray(mask_from_editor(value, (64, 64))) > 127
    want = np.zeros((64, 64), bool)
    want[16:32, 8:24] = True  # the stroke's box / 8
    assert (mask == want).all()
    assert mask_from_editor(editor_value(image), (64, 64)) is None  # nothing painted: no mask


def test_empty_layers_fall_back_to_where_the_composite_was_painted():
    # gradio releases that sent the layers back empty (gradio issues 10298, 10573): the composite still shows paint
    bg = np.full((512, 512, 3), 20, np.uint8)
    comp = bg.copy()
    comp[128:256, 64:192] = (255, 40, 140)
    mask = np.asarray(mask_from_editor({"background": bg, "layers": [], "composite": comp}, (64, 64))) > 127
    assert mask[16:32, 8:24].all() and mask.sum() == 16 * 16
    blank = {"background": bg, "layers": [np.zeros((512, 512, 4), np.uint8)], "composite": bg}
    assert mask_from_editor(blank, (64, 64)) is None


def test_a_wide_photo_is_painted_smaller_and_its_mask_comes_back_full_size():
    assert paint_size((4000, 1000)) == (512, 128)
    value = {"background": None, "layers": [canvas_with_stroke((512, 128), (0, 0, 256, 128))], "composite": None}
    mask = mask_from_editor(value, (4000, 1000))
    assert mask.size == (4000, 1000)
    m = np.asarray(mask) > 127
    assert m[:, :1990].all() and not m[:, 2010:].any()


def test_the_page_stays_on_this_machine_unless_a_password_guards_it():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    assert check_exposure("127.0.0.1", None, False) is None
    assert check_exposure("0.0.0.0", "ann:s3cret", False) == ("ann", "s3cret")
    assert parse_auth("ann:pa:ss") == ("ann", "pa:ss")
    with pytest.raises(UserError, match="--host 0.0.0.0 opens the page to other machines: add --auth USER:PASS"):
        check_exposure("0.0.0.0", None, False)
    with pytest.raises(UserError, match="--share makes a public link: add --auth"):
        check_exposure("127.0.0.1", None, True)
    for bad in ("ann", "ann:", ":pw"):
        with pytest.raises(UserError, match="--auth must be USER:PASS"):
            parse_auth(bad)


def test_the_ui_verb_refuses_an_open_host_in_one_line(run_cli):
    code, out, err = run_cli("ui", "--host", "0.0.0.0")
    assert code == 2 and err.strip().startswith("error: --host 0.0.0.0 opens the page") and len(err.strip().splitlines()) == 1


def test_a_job_streams_its_newest_report_then_its_result():
    def work(report):
        for i in range(3):
            report(i)
            time.sleep(0.05)
        return "bundle"

    got = list(run_streaming(work, threading.Event(), poll=0.01))
    assert got[-1] == ("done", "bundle") and [v for k, v in got if k == "report"][-1] == 2

    def bad(report):
        raise UserError("image x.png is corrupt\n  or not an image: re-export it")

    assert list(run_streaming(bad, threading.Event(), poll=0.01)) == [("error", "image x.png is corrupt or not an image: "
                                                                                "re-export it")]


def test_closing_the_stream_cancels_the_job_and_waits_for_it():
    cancel, ended = threading.Event(), threading.Event()

    def work(report):
        while not cancel.is_set():
            report("step")
            time.sleep(0.01)
        ended.set()
        return None

    stream = run_streaming(work, cancel, poll=0.01)
    assert next(stream)[0] == "report"
    stream.close()  # the browser went away
    assert cancel.is_set() and ended.is_set()


def test_cancel_reaches_only_a_job_that_was_asked_for():
    cancels = Cancels()
    assert not cancels.cancel("s1")  # nothing pending: nothing is cancelled later
    cancels.open("s1")
    assert cancels.cancel("s1") and cancels.get("s1").is_set()
    cancels.close("s1")
    assert not cancels.get("s1").is_set()


def test_settings_typed_as_text_follow_the_command_lines_rules():
    from multiconcept import api

    got = api.parse_settings("disendiff", {"lr": "1e-4", "augment": "false", "templates": "a {}|the {}", "steps": "7"})
    assert got == {"lr": 1e-4, "augment": False, "templates": ("a {}", "the {}"), "steps": 7}
    with pytest.raises(UserError, match="no setting 'nope'"):
        api.parse_settings("disendiff", {"nope": "1"})
    names = [s.name for s in api.method_settings("disendiff")]
    assert "steps" in names and all(s.help for s in api.method_settings("disendiff") if s.name == "lr")
    assert "disendiff" in api.methods()


def test_learning_reports_attention_heatmaps_and_generation_writes_them(scene, tmp_path):
    from multiconcept import api

    shown = []

    def on_step(p):
        shown.append([(label, img.size) for label, img in api.attention_images(p, Image.open(scene["image"]))])

    source = api.Source(scene["image"], masks={"<a1>": scene["m1"], "<b1>": scene["m2"]})
    one_sample = {"steps": 1, "grad_accum": 1, "batch_size": 1, "union_sampling": False}
    api.learn("disendiff", [api.Concept("<a1>", "cat"), api.Concept("<b1>", "dog")], [source],
              tmp_path / "c.safetensors", base="tiny", settings=one_sample, on_step=on_step)
    assert shown[-1] == [("<a1>", (32, 32)), ("cat (<a1>)", (32, 32)), ("<b1>", (32, 32)), ("dog (<b1>)", (32, 32))]
    made = api.generate_files("a <a1> cat and a <b1> dog", [tmp_path / "c.safetensors"], tmp_path / "out", n=1, seed=3,
                              attention_maps=True, base="tiny", sampling=api.SampleSettings(steps=1))
    assert [g.seed for g in made] == [3] and made[0].path.is_file()
    assert made[0].metadata["prompt"] == "a <a1> cat and a <b1> dog"
    assert [label for label, _ in made[0].attention] == ["a", "a1", "cat", "and", "a", "b1", "dog"][: len(made[0].attention)]
    assert all(p.is_file() for _, p in made[0].attention) and len(made[0].attention) >= 5
    with pytest.raises(UserError, match="already exists"):
        api.generate_files("a <a1> cat", [tmp_path / "c.safetensors"], tmp_path / "out", n=1, seed=3, base="tiny")


def test_a_cancelled_learning_job_leaves_nothing_behind(scene, tmp_path):
    # the Learn tab's own job function, without a browser: Cancel after the first step
    from multiconcept.ui.common import Page
    from multiconcept.ui.learn_tab import MAX_CONCEPTS, learn

    page = Page(work=tmp_path / "work", base="tiny")
    concepts = [("<a1>", "cat", None, scene["m1"], None), ("<b1>", "dog", None, scene["m2"], None)]
    concepts += [("", "", None, None, None)] * (MAX_CONCEPTS - 2)
    args = [scene["image"], 2, "textual-inversion", 50, 1e-3, 0, "photo of a {}", ""]
    args += [v for c in concepts for v in c]
    statuses = []
    page.cancels.open("local")
    for update in learn(page, *args):
        statuses.append(update[0])
        if "step 1/50" in update[0]:
            page.cancels.cancel("local")
    assert "Cancelled: nothing was written." in statuses[-1]
    assert list((tmp_path / "work" / "learn").iterdir()) == []  # no bundle, checkpoint or inputs left
    bad = list(args)
    bad[8 + 1] = ""  # concept 1's class word
    assert "error:</b> concept 1 needs a token and a class word" in next(learn(page, *bad))[0]


def test_compose_subjects_become_the_command_lines_specs(tmp_path, monkeypatch):
    from multiconcept.ui.compose_tab import model_note, subject_specs

    rows = [("a.png", None, "", ""), ("b.png", "b_mask.png", "", ""), (None, None, "", "")]
    assert subject_specs("FastComposer", rows) == (["a.png", "b.png:b_mask.png"], [None, None])
    rows = [("a.png", None, "1,2,30,40", "0.1,0.1,0.5,0.5"), ("b.png", None, "", "")]
    assert subject_specs("Subject-Diffusion", rows) == (["a.png:1,2,30,40", "b.png"], ["0.1,0.1,0.5,0.5", None])
    with pytest.raises(UserError, match="subject 1: boxes and places are Subject-Diffusion's"):
        subject_specs("FastComposer", rows)
    with pytest.raises(UserError, match="subject 1 has both a mask and a box"):
        subject_specs("Subject-Diffusion", [("a.png", "m.png", "1,2,3,4", "")])
    with pytest.raises(UserError, match="subject 2 has a mask, box or place but no image"):
        subject_specs("FastComposer", [("a.png", None, "", ""), (None, "m.png", "", "")])
    assert "No model at" in model_note("Subject-Diffusion", str(tmp_path / "none"))
    assert "Model folder" in model_note("FastComposer", str(tmp_path))
    from multiconcept.ui import compose_tab

    monkeypatch.setattr(compose_tab, "SHIPPED", {"fastcomposer": tmp_path, "subject-diffusion": tmp_path / "none"})
    assert "shipped FastComposer model." in model_note("FastComposer", "")
    assert "not in this install" in model_note("Subject-Diffusion", " ")
