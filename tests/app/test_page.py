"""The web demo in a real browser: headless Chromium uploads an image, types a vocabulary, moves the
slider and presses Detect; the table and the annotated image read back from the page equal Predictor's
detections and tools/demo.py's drawing; bad inputs give a message and the server keeps serving; nothing
is fetched from outside 127.0.0.1, by the page or by the server.

``OVD_WEB_SCREENSHOT=docs/web_demo.png pytest tests/app/test_page.py -k detects`` also writes the
README's screenshot.
"""

import json
import os
import shutil
import urllib.request

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the web demo needs gradio: pip install -e '.[test]'")
pytest.importorskip("selenium", reason="the browser tests need selenium: pip install -e '.[test]'")

from ovd.app import browser  # noqa: E402
from ovd.app.handlers import table_rows  # noqa: E402
from ovd.app.models import ModelZoo, model_sources  # noqa: E402
from ovd.app.page import launch  # noqa: E402
from ovd.data.loader import read_image_rgb  # noqa: E402
from ovd.visualize import draw_detections  # noqa: E402

NAMES = ["star", "moon", "tree"]
SCREENSHOT_ENV = "OVD_WEB_SCREENSHOT"

CHROMIUM, CHROMEDRIVER, MISSING = browser.find_browser()
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason=MISSING),
    # Gradio's own use of pandas 3 (its queue), not ovd's
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:Warning", "ignore:The copy keyword:Warning"),
]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, clip_file, tmp_path_factory):
    """The page on a free local port, serving the tiny checkpoint under two names; yields
    ``(url, the server's non-loopback connection attempts)``."""
    checkpoint, images = tiny_checkpoint
    zoo = ModelZoo(model_sources([checkpoint, checkpoint]), clip_pretrained=clip_file)
    port = browser.free_port()
    with browser.loopback_only() as attempts, pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))  # uploads land in the test's folder
        page = launch(zoo, port=port, examples=images[1:3], workdir=tmp_path_factory.mktemp("web"), block=False)
        try:
            yield f"http://127.0.0.1:{port}/", attempts
        finally:
            page.close()


@pytest.fixture(scope="module")
def driver(server):
    chromium = browser.start_chromium(CHROMIUM, CHROMEDRIVER)
    try:
        browser.open_page(chromium, server[0])
        chromium.requests = 0  # Detect presses so far (the status line numbers them)
        yield chromium
    finally:
        chromium.quit()


def press(driver) -> str:
    driver.requests += 1
    return browser.press_run(driver, driver.requests)


def page_rows(driver, element_id: str = "table") -> list[list[object]]:
    """The table read from the page: class name, then numbers."""
    return [[name, *map(float, numbers)] for name, *numbers in browser.read_table(driver, element_id)]


def test_page_detects_like_predictor_offline(server, driver, tiny_checkpoint, reference, tmp_path):
    url, server_attempts = server
    image = tiny_checkpoint[1][0]
    browser.upload(driver, image)
    browser.type_vocabulary(driver, ", ".join(NAMES))
    confidence = browser.move_slider(driver, 5)
    assert confidence == 0.05
    text = press(driver)
    want = reference(image, NAMES, confidence)
    assert f"{len(want)} detections" in text, text
    # the table: every row, as Predictor's detections (rounded as detections.json)
    assert page_rows(driver) == table_rows(want)
    # the annotated image: tools/demo.py's drawing of Predictor's detections, pixel for pixel
    np.testing.assert_array_equal(browser.read_image(driver), draw_detections(read_image_rgb(str(image)), want))
    # the COCO-results download
    with urllib.request.urlopen(browser.link(driver, "json"), timeout=30) as response:
        data = json.loads(response.read())
    assert [c["name"] for c in data["categories"]] == NAMES and len(data["annotations"]) == len(want)
    # offline: neither the page nor the server asked for anything outside 127.0.0.1
    assert browser.external(browser.requested_urls(driver), url.rstrip("/")) == []
    assert server_attempts == []
    shot = tmp_path / "web_demo.png"
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])


def test_compare_and_presets_in_the_page(server, driver, tiny_checkpoint, reference):
    image = tiny_checkpoint[1][0]
    browser.upload(driver, image)
    browser.choose(driver, "preset", "coco_ovd_val")
    from ovd.data.catalog import get_dataset

    names = list(get_dataset("coco_ovd_val", prepare=False).class_names)
    box = browser.css(driver, "#vocabulary textarea")
    browser.wait_for(lambda: box.get_attribute("value") == ", ".join(names), "the preset's names")
    browser.choose(driver, "compare", browser.css(driver, "#model input").get_attribute("value") + " #2")
    confidence = browser.move_slider(driver, 50)
    text = press(driver)
    want = table_rows(reference(image, names, confidence))
    assert text.count(f"{len(want)} detections") == 2, text
    assert page_rows(driver, "table") == want == page_rows(driver, "table_b")
    browser.choose(driver, "compare", "(none)")


def test_example_and_webcam_snapshot(server, driver, tiny_checkpoint, reference, tmp_path, assert_same_detections):
    example = tiny_checkpoint[1][1]  # the first example of the server fixture
    browser.css(driver, "#examples button").click()
    browser.type_vocabulary(driver, ", ".join(NAMES))
    confidence = browser.move_slider(driver, 10)
    press(driver)
    assert page_rows(driver) == table_rows(reference(example, NAMES, confidence))
    with urllib.request.urlopen(browser.link(driver, "json"), timeout=30) as response:
        assert json.loads(response.read())["images"][0]["file_name"] == example.name
    # a snapshot of Chromium's synthetic webcam: detected as Predictor detects the very file uploaded
    browser.css(driver, '#image button[aria-label="Remove Image"]').click()
    browser.webcam_snapshot(driver)
    snapshot = tmp_path / "snapshot.png"
    snapshot.write_bytes(browser.image_bytes(driver, "image"))
    press(driver)
    assert page_rows(driver) == table_rows(reference(snapshot, NAMES, confidence))
    browser.css(driver, '#image button[aria-label="Upload file"]').click()


@pytest.mark.parametrize(
    ("upload_file", "vocabulary", "message"),
    [
        ("corrupt.png", "star", "corrupt.png: not an image file"),
        ("huge.png", "star", "huge.png: the image is 12000x12000 (144 Mpx): larger than 40 Mpx"),
        (None, " , ", "the vocabulary is empty"),
        (None, "star, moon, Star", "repeated class names: star"),
        (None, ", ".join(f"class {i}" for i in range(2000)), "2,000 class names is too many"),
    ],
)
def test_bad_input_is_a_message_and_the_server_keeps_serving(
    server, driver, tiny_checkpoint, tmp_path, huge_png, upload_file, vocabulary, message
):
    image = tiny_checkpoint[1][0]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x00 not a png " * 50)
    path = {"corrupt.png": corrupt, "huge.png": huge_png, None: image}[upload_file]
    browser.css(driver, "#image input[type=file]").send_keys(str(path))
    browser.type_vocabulary(driver, vocabulary)
    text = press(driver)
    assert "Error:" in text and message in text, text
    browser.type_vocabulary(driver, "star")
    browser.upload(driver, image)
    assert "detections" in press(driver)  # still serving


def test_a_non_image_file_is_refused_by_the_page(server, driver, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    browser.css(driver, "#image input[type=file]").send_keys(str(notes))
    browser.wait_for(lambda: "Invalid file type" in browser.css(driver, "body").text, "the page's message")
    assert "Error:" not in browser.status(driver)


def test_the_table_sorts(server, driver, tiny_checkpoint):
    """Last in this module: the sort order it leaves would apply to later results."""
    browser.upload(driver, tiny_checkpoint[1][0])
    browser.type_vocabulary(driver, ", ".join(NAMES))
    press(driver)
    scores = [row[1] for row in page_rows(driver)]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
    browser.sort_table(driver, "score", ascending=True)
    browser.wait_for(lambda: [row[1] for row in page_rows(driver)] == sorted(scores), "the ascending order")
