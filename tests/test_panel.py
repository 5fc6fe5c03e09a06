"""The similar-cases panel in a real browser (Debian's Chromium, driven by Playwright, headless)
against a real ``cbmir serve --http-port 0`` with indexed instances.

The page is used as a radiologist would: the token typed in, a UID pasted or a file chosen, the
search run, the grid read. A screenshot goes into the test's folder, and into docs/panel.png with
CBMIR_UPDATE_SCREENSHOT=1. Nothing the page does may trip its Content-Security-Policy.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.test_gateway import Served, _png, serve_with_gateway

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip("no Chromium installed (Debian: apt-get install chromium); the panel test needs one")
    with sync_api.sync_playwright() as playwright:
        # the system's Chromium: Playwright never downloads a browser here
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served(browser, tmp_path_factory: pytest.TempPathFactory):
    served = serve_with_gateway(tmp_path_factory.mktemp("panel"))
    yield served
    served.proc.stop()


def _console_problems(page) -> list[str]:
    problems: list[str] = []

    def seen(message) -> None:
        # a refused request (401 before the token is typed) is the page's to explain, not a fault
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            problems.append(message.text)

    page.on("console", seen)
    page.on("pageerror", lambda error: problems.append(str(error)))
    return problems


def _search(page) -> None:
    page.click("#search")
    page.wait_for_function("() => !document.getElementById('search').disabled")


def _thumbnails_loaded(page) -> None:
    page.wait_for_function(
        "() => { const images = [...document.querySelectorAll('.card img')];"
        " return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0); }",
        timeout=30_000,
    )


def test_panel_finds_similar_cases(served: Served, browser, tmp_path: Path) -> None:
    query = served.cases["PAT-A-0-0.dcm"]
    sibling = served.cases["PAT-A-0-1.dcm"]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = _console_problems(page)
    response = page.goto(served.base + "/")
    assert response is not None and response.ok
    assert "default-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_selector("#modalities input[value='mri']")  # the vocabulary, from the API's document

    # no token yet: the API's answer, explained
    page.fill("#uid", query["sop"])
    _search(page)
    assert page.is_visible("#error")
    assert "API token" in page.inner_text("#error") and "UNAUTHENTICATED" in page.inner_text("#error")

    # with the token: the grid of similar cases, nearest first, with their thumbnails
    page.fill("#token", served.search_token)
    _search(page)
    page.wait_for_selector(".card")
    assert not page.is_visible("#error")
    # the status line says which modalities the query was compared with (its encoder's)
    assert "compared with mri" in page.inner_text("#status")
    cards = page.locator(".card")
    # every indexed image but the query itself and the CT, which another encoder than MRI's embeds
    assert cards.count() == len(served.cases) - 2
    first = cards.nth(0)
    assert first.get_attribute("data-sop-instance-uid") == sibling["sop"]
    assert first.locator(".modality").inner_text() == "mri · MR"
    assert first.locator(".finding").inner_text() == "no finding"
    assert re.fullmatch(r"\d+\.\d{4}", first.locator(".distance").inner_text())
    assert first.locator(".study-date").inner_text() == "2023-01-10"
    distances = [float(text) for text in page.locator(".card .distance").all_inner_texts()]
    assert distances == sorted(distances)
    assert "other · CT" not in page.locator(".card .modality").all_inner_texts()
    _thumbnails_loaded(page)
    assert page.evaluate("() => document.querySelector('.card img').src").startswith("blob:")
    assert page.evaluate("() => sessionStorage.getItem('cbmir.token')") == served.search_token
    page.screenshot(path=str(tmp_path / "panel.png"), full_page=True)
    if os.environ.get("CBMIR_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(tmp_path / "panel.png", REPO / "docs" / "panel.png")

    # one hit per study, the same patient left out: PAT-B's two studies
    page.check("#group-study")
    page.check("#exclude-patient")
    _search(page)
    page.wait_for_selector(".card .matching:not([hidden])")
    assert cards.count() == 2
    assert "2 matching images" in page.locator(".card .matching").all_inner_texts()
    assert {c["patient"] for c in served.cases.values() if c["sop"] in _shown(page)} == {"PAT-B"}
    page.uncheck("#group-study")
    page.uncheck("#exclude-patient")

    # a DICOM file chosen instead: the same instance is left out, its study sibling comes first
    page.click("#clear")
    page.set_input_files("#file", str(served.files["PAT-B-1-0.dcm"]))
    assert page.is_hidden("#picture-modality")  # DICOM carries its modality
    _search(page)
    page.wait_for_selector(".card")
    assert _shown(page)[0] == served.cases["PAT-B-1-1.dcm"]["sop"]
    assert served.cases["PAT-B-1-0.dcm"]["sop"] not in _shown(page)

    # a picture needs its modality: asked for, then searched with it
    picture = tmp_path / "query.png"
    picture.write_bytes(_png(served.files["PAT-A-1-0.dcm"]))
    page.set_input_files("#file", str(picture))
    assert page.is_visible("#picture-modality")
    _search(page)
    assert "Choose the modality" in page.inner_text("#error")
    page.select_option("#image-modality", "mri")
    _search(page)
    page.wait_for_selector(".card")
    assert not page.is_visible("#error")
    # a picture is not indexed, so nothing is left out but the CT (another encoder's)
    assert page.locator(".card").count() == len(served.cases) - 1
    _thumbnails_loaded(page)

    # an unknown UID: the API's message
    page.click("#clear")
    page.fill("#uid", "1.2.826.0.1.3680043.99.2")
    _search(page)
    assert "NOT_FOUND" in page.inner_text("#error")
    assert problems == []
    page.close()


def _shown(page) -> list[str]:
    return page.eval_on_selector_all(".card", "cards => cards.map(c => c.dataset.sopInstanceUid)")
