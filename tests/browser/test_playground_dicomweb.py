"""The playground with a PACS: a DICOMweb URL in, and the images the model was given shown back.

A real `bentoml serve` allow-lists the session's real Orthanc (``tests/pacs.py``); headless Chromium types a series
URL into the page and must then show the 85 windowed CT slices as a strip labelled SLICE 1..85, in the order the
image report gives, and a DICOM slide as a grid of its tissue patches.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Server, bentoml_serve, require_pacs, wait_for_model

from tests.browser import test_playground
from tests.browser.test_playground import (
    ARTIFACTS,
    by_id,
    console_errors,
    final_event,
    open_page,
    require_browser,
    text_of,
    wait,
)
from tests.pacs import SLIDE_TISSUE_PATCHES

pytestmark = pytest.mark.browser
browser = test_playground.browser  # the same headless Chromium fixture


@pytest.fixture(scope="module")
def server(tiny_vlm: Path, tmp_path_factory: pytest.TempPathFactory, pacs) -> Iterator[Server]:
    require_browser()
    require_pacs()
    orthanc, _ = pacs
    env = {"MEDGEMMA_MODEL": str(tiny_vlm), "MEDGEMMA_DICOMWEB_URLS": orthanc.dicomweb}
    with bentoml_serve(env, tmp_path_factory.mktemp("playground-dicomweb")) as srv:
        assert wait_for_model(srv.url, tiny_vlm.name)["model_state"] == "ready"
        yield srv


def ask(driver, url: str, question: str) -> dict:
    field = by_id(driver, "dicom-url")
    field.clear()
    field.send_keys(url)
    by_id(driver, "question").clear()
    by_id(driver, "question").send_keys(question)
    tokens = by_id(driver, "max-tokens")
    tokens.clear()
    tokens.send_keys("4")
    by_id(driver, "submit").click()
    return final_event(driver)


def figures(driver) -> list:
    return driver.find_elements("css selector", "#given figure")


def test_ct_series_url_shows_the_labelled_slice_strip(browser, server: Server, tiny_vlm: Path, pacs) -> None:
    driver = browser
    _, data = pacs
    open_page(driver, server, tiny_vlm.name)
    final = ask(driver, data.ct_url, "Summarise this CT.")
    assert final["status"] == "success"
    (report,) = final["image_sources"]
    assert report["slices_sampled"] == 85
    wait(driver, lambda d: len(figures(d)) == 85, 30, "the strip does not show 85 slices")
    shown = figures(driver)
    assert [f.get_attribute("data-label") for f in shown] == [f"SLICE {n}" for n in range(1, 86)]
    assert "strip" in by_id(driver, "given").get_attribute("class")
    # every preview decoded in the browser, and each is the slice at the report's position
    loaded = driver.execute_script(
        "return [...document.querySelectorAll('#given img')].map(i => i.complete && i.naturalWidth > 0)"
    )
    assert all(loaded)
    summary = text_of(driver, "given-summary")
    assert "85 images from 109 of 120 instances" in summary and "slice normal" in summary
    assert "CT windows" in summary and "left out: 1 derived" in summary
    assert by_id(driver, "given-box").is_displayed()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.execute_script("document.getElementById('given-box').scrollIntoView()")
    driver.save_screenshot(str(ARTIFACTS / "playground-ct-strip.png"))
    assert console_errors(driver) == []


def test_slide_url_shows_the_patch_grid(browser, server: Server, tiny_vlm: Path, pacs) -> None:
    driver = browser
    _, data = pacs
    open_page(driver, server, tiny_vlm.name)
    final = ask(driver, data.wsi_url, "Describe the tissue.")
    (report,) = final["image_sources"]
    assert report["patch_count"] == SLIDE_TISSUE_PATCHES
    wait(driver, lambda d: len(figures(d)) == SLIDE_TISSUE_PATCHES, 30, "the grid does not show the patches")
    assert "grid" in by_id(driver, "given").get_attribute("class")
    assert [f.get_attribute("data-label") for f in figures(driver)] == ["x 0, y 0", "x 896, y 0", "x 0, y 896"]
    assert "3 of 3 tissue patches" in text_of(driver, "given-summary")
    driver.execute_script("document.getElementById('given-box').scrollIntoView()")
    driver.save_screenshot(str(ARTIFACTS / "playground-slide-grid.png"))
    assert console_errors(driver) == []


def test_refused_source_shows_the_error(browser, server: Server, tiny_vlm: Path, pacs) -> None:
    driver = browser
    _, data = pacs
    open_page(driver, server, tiny_vlm.name)
    field = by_id(driver, "dicom-url")
    field.send_keys(data.ct_url.replace("/dicom-web/", "/elsewhere/"))
    by_id(driver, "question").send_keys("q")
    by_id(driver, "submit").click()
    wait(driver, lambda d: by_id(d, "error").is_displayed(), 30, "no error shown")
    assert "MEDGEMMA_DICOMWEB_URLS" in text_of(driver, "error") and "(400)" in text_of(driver, "error")
    assert figures(driver) == []
