"""The web page in a real browser (`make test-ui`): headless Chromium (Debian's, driven by
Playwright) against a running `multiconcept ui`. Uploads ToyWorld's pair, paints one mask and
uploads the other, learns a few steps, generates, and checks that images appear and that the
painted mask reached the workflow as the painted region. Screenshots of each tab go to
build/ui-screenshots/ (MULTICONCEPT_UI_SHOTS overrides; MULTICONCEPT_UI_STEPS and MULTICONCEPT_UI_GEN_STEPS set
the learning and sampling steps).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.skipif(not os.environ.get("MULTICONCEPT_UI_TEST"), reason="the browser test runs in `make test-ui`")

CHROMIUM = os.environ.get("MULTICONCEPT_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("MULTICONCEPT_UI_SHOTS", Path(__file__).resolve().parents[1] / "build" / "ui-screenshots"))
STEPS = int(os.environ.get("MULTICONCEPT_UI_STEPS", "12"))  # learning steps; `make demo` learns the pair in 250
GEN_STEPS = int(os.environ.get("MULTICONCEPT_UI_GEN_STEPS", "10"))
# the settings of `make demo` (docs/demo.md): ToyWorld's captions, no augmentation, lr 1e-4
MORE = "augment=false\ngrad_accum=1\nunion_sampling=true\nunnamed=erase\nloss_region=all"
# the painted stroke over the left object (the heart), as fractions of the image: rows at these heights,
# from x0 to x1
STROKE_ROWS, STROKE_X = (0.36, 0.46, 0.56), (0.08, 0.32)


STILL = """document.addEventListener('DOMContentLoaded', () => {
  const s = document.createElement('style');
  s.textContent = '*, *::before, *::after { animation: none !important; transition: none !important; }';
  document.head.appendChild(s);
});"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, free_port):
    work = tmp_path_factory.mktemp("ui-work")
    port = free_port()
    log = open(work / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "multiconcept", "ui", "--port", str(port), "--work", str(work),
                             "--max-upload-mb", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"multiconcept ui did not start: {(work / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url, work
    proc.terminate()
    proc.wait(20)
    log.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from multiconcept.toyworld import left_to_right, write_two_concept_folder

    folder = tmp_path_factory.mktemp("pair")
    scene = write_two_concept_folder("robot_a", "bird_b", folder, seed=0)
    left, right = left_to_right(scene.subjects)
    return folder, scene.background, left, right


def paint_stroke(page, editor: str) -> None:
    """Drag the brush along STROKE_ROWS over the image shown in the editor's canvas."""
    canvas = page.locator(f"{editor} canvas").last
    box = canvas.bounding_box()
    zoom = float(page.locator(f"{editor}").get_by_text("%").first.inner_text().strip("% ")) / 100
    side = 512 * zoom  # the page shows the image scaled to 512 px on its longer side, at the editor's zoom
    left, top = box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2
    for row in STROKE_ROWS:
        page.mouse.move(left + STROKE_X[0] * side, top + row * side)
        page.mouse.down()
        page.mouse.move(left + STROKE_X[1] * side, top + row * side, steps=12)
        page.mouse.up()


def expected_stroke(size: int, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    near = np.zeros((size, size), bool)
    for row in STROKE_ROWS:
        x = np.clip(xx, STROKE_X[0] * size, STROKE_X[1] * size)
        near |= np.hypot(xx - x, yy - row * size) <= radius
    return near


def test_learn_generate_compose_in_the_browser(server, pair):
    from playwright.sync_api import expect, sync_playwright

    url, work = server
    folder, background, left, right = pair
    SHOTS.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with sync_playwright() as p:
        # software rendering only, and no animations: on 2 cores a browser animating spinners takes CPU from training
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1500})
        page.add_init_script(STILL)
        page.goto(url)
        page.set_input_files("#learn-image input[type=file]", str(folder / "image.png"))
        expect(page.locator("#learn-status")).to_contain_text("64x64 image", timeout=30_000)
        page.fill("#class-0 textarea, #class-0 input", left.creature.kind)
        page.fill("#class-1 textarea, #class-1 input", right.creature.kind)
        paint_stroke(page, "#paint-0")
        page.set_input_files("#mask-1 input[type=file]", str(folder / f"{right.concept}_mask.png"))
        page.fill("#steps input", str(STEPS))
        page.fill("#lr input", "1e-4")
        page.fill("#templates textarea, #templates input", f"a {{}} on a {background} background")
        page.fill("#more-settings textarea", MORE)

        # a second visitor: a bad upload gets the command line's one-line error; a second job waits in
        # the queue with its place shown, and Cancel while it waits means it never runs
        other = browser.new_page(viewport={"width": 1400, "height": 1200})
        other.add_init_script(STILL)
        other.goto(url)
        bad = folder.parent / "broken.png"
        bad.write_bytes(b"not a png")
        other.set_input_files("#learn-image input[type=file]", str(bad))
        expect(other.locator("#learn-status")).to_contain_text(
            re.compile(r"error: image \S*broken\.png is corrupt or not an image \(\w+\): re-export it as PNG or JPEG"),
            timeout=30_000)
        big = folder.parent / "big.png"
        big.write_bytes(os.urandom(1_200_000))
        other.set_input_files("#mask-0 input[type=file]", str(big))
        expect(other.get_by_text(re.compile("exceed the maximum allowed size of 1"))).to_be_visible(timeout=10_000)
        # the second visitor asks only once the first job has started, so it finds the queue busy however fast
        # the machine learns the first job's 12 steps
        page.click("#learn-button")
        expect(page.locator("#learn-status")).to_contain_text(re.compile("Loading|step"), timeout=30_000)
        other.click("#learn-button")
        expect(other.locator("#learn-status")).to_contain_text("queue", timeout=30_000)
        other.click("#cancel-button")

        expect(page.locator("#learn-status")).to_contain_text("step", timeout=60_000)
        expect(page.locator("#learn-status")).to_contain_text("Learned", timeout=max(120, 8 * STEPS) * 1000)
        expect(other.locator("#learn-status")).to_contain_text("Cancelled before it started", timeout=30_000)
        expect(page.locator("#learn-bundle a").first).to_have_attribute("href", re.compile(r"/concepts\.safetensors$"))
        print(f"learned: {time.monotonic() - t0:.1f} s")
        page.screenshot(path=str(SHOTS / "learn.png"), full_page=True)

        # the painted mask, as the workflow read it: the file the job handed to learn
        masks = sorted(work.glob("learn/*/inputs/mask_1.png"))
        assert len(masks) == 1, masks
        mask = np.asarray(Image.open(masks[0])) > 127
        assert mask.shape == (64, 64)
        brush = 512 // 32 * 64 / 512  # the brush's radius, in image pixels
        inside = expected_stroke(64, brush + 1.5)
        core = expected_stroke(64, max(brush - 1.5, 0.5))
        assert mask.sum() > 0, "the painted layer came back empty"
        assert mask[~inside].sum() <= 0.02 * mask.sum(), "paint outside the stroke"
        assert mask[core].mean() >= 0.9, "the stroke's core is missing from the mask"
        assert sorted(p.name for p in work.glob("learn/*/*")) == ["concepts.safetensors", "inputs"]

        page.get_by_role("tab", name="Generate").click()
        expect(page.locator("#gen-tokens")).to_contain_text("<s1>", timeout=30_000)
        expect(page.locator("#gen-prompt textarea")).to_have_value(re.compile("<s1>"))  # the tokens, offered
        page.fill("#gen-prompt textarea",
                  f"a <s1> {left.creature.kind} and a <s2> {right.creature.kind} on a {background} background")
        page.fill("#gen-n input[type=number]", "2")
        page.fill("#gen-steps input[type=number]", str(GEN_STEPS))
        page.click("#generate-button")
        expect(page.locator("#gen-status")).to_contain_text("2 images", timeout=max(120, 12 * GEN_STEPS) * 1000)
        expect(page.locator("#gen-grid img")).to_have_count(2)
        expect(page.locator("#gen-attention img").first).to_be_visible()
        expect(page.locator("#gen-metadata")).to_contain_text("seed")
        page.screenshot(path=str(SHOTS / "generate.png"), full_page=True)
        print(f"generated: {time.monotonic() - t0:.1f} s")
        assert len(list(work.glob("generate/*/*.png"))) == 2

        page.get_by_role("tab", name="Compose").click()
        expect(page.locator("#compose-note")).to_be_visible()
        page.screenshot(path=str(SHOTS / "compose.png"), full_page=True)
        browser.close()
    print(f"browser test: {time.monotonic() - t0:.1f} s after the server started")
