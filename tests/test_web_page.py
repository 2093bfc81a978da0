"""The web page at / in a real headless Chromium: draw a digit, or choose a file, and read the answer.

Chromium is Debian's (the README's test command installs it), driven by Playwright. Screenshots of
each step are written to reports/web-page/ for a person to look at.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.app import MnistServer
from tests.support import Harness, free_port, test_config

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "reports" / "web-page"
SAMPLES = ROOT / "server" / "samples"
# A 7 as a person draws it on the 280x280 pad: the bar, then the stem down and to the left.
SEVEN = [(60, 60), (150, 58), (225, 62), (190, 130), (150, 200), (125, 250)]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("chromium is not installed: run the README's test command, which installs Debian's chromium")
    return found


@pytest.fixture(scope="module")
def page() -> Iterator:
    from playwright.sync_api import sync_playwright

    server = MnistServer(test_config(http_port=free_port())).start()
    harness = Harness(server)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 900, "height": 620})
        page.goto(f"http://127.0.0.1:{server.http_port}/")
        page.wait_for_function("document.getElementById('model').textContent.includes('version')", timeout=15_000)
        yield page
        browser.close()
    harness.close()


def draw(page, stroke: list[tuple[int, int]]) -> None:
    box = page.locator("#pad").bounding_box()
    page.mouse.move(box["x"] + stroke[0][0], box["y"] + stroke[0][1])
    page.mouse.down()
    for x, y in stroke[1:]:
        page.mouse.move(box["x"] + x, box["y"] + y, steps=8)
    page.mouse.up()


def prediction(page) -> str:
    page.wait_for_function("document.body.dataset.prediction !== undefined", timeout=15_000)
    return page.evaluate("document.body.dataset.prediction")


def test_the_page_names_the_model_and_its_version(page) -> None:
    assert page.locator("#model").inner_text().startswith("model: googlenet-fast, version ")
    page.screenshot(path=str(SCREENSHOTS / "1-loaded.png"))


def test_a_drawn_seven_comes_back_seven_with_ten_bars_and_the_latency(page) -> None:
    page.click("#clear")
    page.evaluate("delete document.body.dataset.prediction")
    draw(page, SEVEN)
    assert prediction(page) == "7"
    assert page.locator("#digit").inner_text() == "7"
    assert page.locator(".bar").count() == 10
    widths = page.eval_on_selector_all(".bar > div", "bars => bars.map(b => parseFloat(b.style.width))")
    assert max(widths) == widths[7] and abs(sum(widths) - 100) < 1
    assert "round trip" in page.locator("#latency").inner_text()
    page.screenshot(path=str(SCREENSHOTS / "2-drawn-seven.png"))


def test_a_chosen_image_file_is_read_too(page) -> None:
    page.click("#clear")
    page.evaluate("delete document.body.dataset.prediction")
    page.set_input_files("#file", str(SAMPLES / "two.jpg"))
    assert prediction(page) == "2"
    page.screenshot(path=str(SCREENSHOTS / "3-file-two.png"))


def test_a_server_error_is_shown_not_swallowed(page) -> None:
    page.click("#clear")
    page.evaluate("delete document.body.dataset.prediction")
    page.set_input_files("#file", {"name": "notes.txt", "mimeType": "image/png", "buffer": b"not an image at all"})
    assert prediction(page) == "error"
    assert page.locator("#error").inner_text()
    page.screenshot(path=str(SCREENSHOTS / "4-error.png"))


ONE = [(300, 55), (296, 150), (292, 250)]  # a 1 just right of the 7, on the wider pad of number mode


def test_in_number_mode_a_drawn_71_is_read_with_a_box_around_each_digit(page) -> None:
    page.check("input[name=mode][value=number]")
    page.evaluate("delete document.body.dataset.prediction")
    draw(page, SEVEN)
    page.wait_for_function("document.body.dataset.prediction !== undefined", timeout=15_000)
    page.evaluate("delete document.body.dataset.prediction")
    draw(page, ONE)
    assert prediction(page) == "71"
    assert page.evaluate("document.body.dataset.boxes") == "2"
    assert page.locator("#digit").inner_text() == "71"
    assert "all 2 digits right" in page.locator("#confidence").inner_text()
    page.screenshot(path=str(SCREENSHOTS / "5-number-71.png"))
    page.check("input[name=mode][value=digit]")


def test_in_table_mode_a_chosen_photo_of_a_table_shows_the_grid_it_read(
    page, mnist_test_digits, tmp_path: Path
) -> None:
    import numpy as np

    from loadtest.layouts import compose_table

    rng = np.random.default_rng(2)
    composed = next(c for c in (compose_table(rng, *mnist_test_digits, True, False) for _ in range(30))
                    if c.text.count("\n") <= 4)  # fmt: skip
    image = tmp_path / "table.png"
    image.write_bytes(composed.image)
    page.check("input[name=mode][value=table]")
    page.evaluate("delete document.body.dataset.prediction")
    page.set_input_files("#file", str(image))
    read = prediction(page)
    rows = composed.text.split("\n")
    assert read.count("\n") == len(rows) - 1 and read.split("\n")[0].count("\t") == rows[0].count("\t")
    assert page.locator("#grid tr").count() == len(rows)
    assert page.locator("#grid td").count() == len(rows) * (rows[0].count("\t") + 1)
    assert " × " in page.locator("#digit").inner_text()
    page.screenshot(path=str(SCREENSHOTS / "6-table.png"), full_page=True)
    page.check("input[name=mode][value=digit]")


# A sum on the pad of sum mode (560 x 200): a 7, a plus (two strokes), a 1.
SUM_STROKES = [
    [(30, 40), (100, 38), (150, 42), (125, 95), (100, 140), (85, 175)],
    [(200, 105), (290, 105)],
    [(245, 60), (245, 150)],
    [(360, 30), (356, 100), (352, 175)],
]


def test_in_sum_mode_a_drawn_sum_is_read_and_worked_out(page) -> None:
    page.check("input[name=mode][value=expression]")
    for stroke in SUM_STROKES[:-1]:
        page.evaluate("delete document.body.dataset.prediction")
        draw(page, stroke)
        page.wait_for_function("document.body.dataset.prediction !== undefined", timeout=15_000)
    page.evaluate("delete document.body.dataset.prediction")
    draw(page, SUM_STROKES[-1])
    assert prediction(page) == "7+1"
    assert page.evaluate("document.body.dataset.value") == "8"
    assert page.locator("#digit").inner_text() == "7+1 = 8"
    assert page.evaluate("document.body.dataset.boxes") == "3"
    page.screenshot(path=str(SCREENSHOTS / "7-sum.png"), full_page=True)
    page.check("input[name=mode][value=digit]")
