"""The playground page, driven in headless Chromium (Debian's `chromium` + `chromium-driver`, through selenium).

One real `bentoml serve` (tiny random-weight VLM, API token set) serves every test of this module. Needs:
`apt-get install -y chromium chromium-driver` and `pip install selenium`. Without them the browser tests fail
when `CI` is set and skip otherwise. The page's HTTP contract (headers, no external resources) is checked without
a browser too.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import Server, bentoml_serve, wait_for_model
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
TOKEN = "secret-token"


def find_binary(env: str, *names: str) -> str | None:
    """`$env` when set (it must exist), else the first of `names` on PATH."""
    explicit = os.environ.get(env)
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return next((p for p in map(shutil.which, names) if p), None)


CHROMIUM = find_binary("CHROMIUM_BIN", "chromium", "chromium-browser")
CHROMEDRIVER = find_binary("CHROMEDRIVER_BIN", "chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1300",
)


def require_browser() -> None:
    """Fail (CI) or skip (elsewhere) with the install commands when the browser or the driver is missing."""
    missing = []
    if not CHROMIUM:
        missing.append("the chromium binary (apt-get install -y chromium)")
    if not CHROMEDRIVER:
        missing.append("chromedriver (apt-get install -y chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install selenium)")
    if missing:
        message = "headless browser test needs " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


# -- fixtures --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_vlm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_browser()
    env = {"MEDGEMMA_MODEL": str(tiny_vlm), "MEDGEMMA_API_TOKEN": TOKEN}
    with bentoml_serve(env, tmp_path_factory.mktemp("playground-serve")) as srv:
        health = wait_for_model(srv.url, tiny_vlm.name)
        assert health["model_state"] == "ready", health
        yield srv


@pytest.fixture
def app_name(tiny_vlm: Path) -> str:
    return tiny_vlm.name


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


# -- helpers ---------------------------------------------------------------------------------------------------------


def wait(driver, condition, timeout: float = 60.0, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, message)


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def text_of(driver, element_id: str) -> str:
    """Exact textContent (selenium's `.text` normalises whitespace and drops hidden text)."""
    return by_id(driver, element_id).get_property("textContent")


def open_page(driver, server: Server, app: str, *, slash: bool = True, state: str = "ready") -> None:
    driver.get(f"{server.url}/{app}/playground" + ("/" if slash else ""))
    wait(driver, lambda d: text_of(d, "model-state") == state, 30, f"model state never showed {state!r}")


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def fill_and_submit(driver, *, question: str, image: Path | None, token: str | None, max_tokens: int = 24) -> None:
    if token is not None:
        by_id(driver, "token").send_keys(token)
    if image is not None:
        by_id(driver, "image").send_keys(str(image))
    by_id(driver, "question").send_keys(question)
    field = by_id(driver, "max-tokens")
    field.clear()
    field.send_keys(str(max_tokens))
    by_id(driver, "submit").click()


def final_event(driver) -> dict:
    wait(driver, lambda d: by_id(d, "answer").get_attribute("data-final") == "true", 60, "no final event shown")
    return json.loads(text_of(driver, "raw"))


def make_png(path: Path) -> Path:
    yy, xx = np.mgrid[0:96, 0:128]
    rgb = np.stack([xx * 2, yy * 2, np.full_like(xx, 120)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(path, format="PNG")
    return path


def make_dicom(path: Path) -> Path:
    """A tiny 12-bit MONOCHROME2 secondary-capture file."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = 48, 64
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    yy, xx = np.mgrid[0:48, 0:64]
    ds.PixelData = ((xx * 40 + yy * 20) % 4096).astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue())
    return path


# -- the page without a browser --------------------------------------------------------------------------------------


def test_page_contract_without_browser() -> None:
    """Both addresses serve the page (no slash: starlette's redirect), with the app name injected and no CDN."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    from medgemma.playground import playground_app

    app = Starlette(routes=[Mount("/my-app/playground", playground_app("my-app"))])
    client = TestClient(app)
    page = client.get("/my-app/playground")  # follows the 307 to .../playground/
    assert page.status_code == 200
    assert str(page.url).endswith("/my-app/playground/")
    assert 'data-app="my-app"' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for asset in ("playground.css", "playground.js"):
        assert f'"/my-app/playground/{asset}"' in page.text
        assert client.get(f"/my-app/playground/{asset}").status_code == 200
    script = client.get("/my-app/playground/playground.js").text
    for body in (page.text, script, client.get("/my-app/playground/playground.css").text):
        assert "http://" not in body and "https://" not in body and "@import" not in body  # nothing external
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script  # output is set as text only


# -- the page in Chromium --------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_png_question_streams_answer_and_metrics(browser, server: Server, app_name: str, tmp_path: Path) -> None:
    driver = browser
    open_page(driver, server, app_name, slash=False)  # the bare address redirects to .../playground/
    assert driver.current_url.endswith(f"/{app_name}/playground/")
    assert "random-weight demo" in text_of(driver, "model-name")
    assert by_id(driver, "demo-warning").is_displayed()

    fill_and_submit(driver, question="What does this image show?", image=make_png(tmp_path / "scan.png"), token=TOKEN)
    started = time.monotonic()
    wait(driver, lambda d: text_of(d, "answer").strip() != "", 60, "no streamed text appeared")
    wait(
        driver,
        lambda d: d.find_elements("css selector", '#metrics dd[data-key="output_tokens"]'),
        60,
        "metrics never appeared",
    )
    final = final_event(driver)
    elapsed = time.monotonic() - started

    assert final["status"] == "success" and final["done"] is True
    assert int(by_id(driver, "answer").get_attribute("data-deltas")) >= 1, "no streaming event was received"
    assert text_of(driver, "answer") == final["response"]
    output_tokens = driver.find_element("css selector", '#metrics dd[data-key="output_tokens"]')
    assert output_tokens.get_property("textContent") == str(final["compute_metrics"]["output_tokens"])
    assert final["images"][0]["source"] == "png"
    assert "png" in text_of(driver, "images")
    assert "random-weight demo" in text_of(driver, "answer-model")
    assert by_id(driver, "error").get_attribute("hidden") is not None
    assert not by_id(driver, "submit").get_property("disabled")
    assert console_errors(driver) == []

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(tmp_path / "playground.png"))
    driver.save_screenshot(str(ARTIFACTS / "playground.png"))
    assert elapsed < 60


@pytest.mark.browser
def test_missing_token_shows_401(browser, server: Server, app_name: str) -> None:
    driver = browser
    open_page(driver, server, app_name)
    fill_and_submit(driver, question="Hello?", image=None, token=None)
    wait(driver, lambda d: by_id(d, "error").is_displayed(), 30, "no error shown")
    error = text_of(driver, "error")
    assert "Missing or invalid API token" in error and "401" in error
    assert text_of(driver, "status") == "Failed."
    assert text_of(driver, "answer") == ""
    assert not by_id(driver, "submit").get_property("disabled")
    # The only console error is the browser's own note about the 401 response.
    assert all("401" in e["message"] for e in console_errors(driver))


@pytest.mark.browser
def test_dicom_through_the_page_with_keyboard(browser, server: Server, app_name: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.keys import Keys

    driver = browser
    open_page(driver, server, app_name)
    by_id(driver, "token").send_keys(TOKEN)
    by_id(driver, "image").send_keys(str(make_dicom(tmp_path / "slice.dcm")))
    assert "application/dicom" in text_of(driver, "file-info")
    field = by_id(driver, "max-tokens")
    field.clear()
    field.send_keys("24")
    question = by_id(driver, "question")
    question.send_keys("Describe this DICOM image.")
    question.send_keys(Keys.CONTROL, Keys.ENTER)  # keyboard submit
    final = final_event(driver)
    assert final["status"] == "success"
    assert text_of(driver, "answer") == final["response"]
    image = final["images"][0]
    assert image["source"] == "dicom" and image["photometric"] == "MONOCHROME2"
    shown = text_of(driver, "images")
    assert "dicom" in shown and "MONOCHROME2" in shown and "centre" in shown
    assert console_errors(driver) == []


@pytest.mark.browser
def test_stop_aborts_a_running_stream(browser, server: Server, app_name: str) -> None:
    driver = browser
    open_page(driver, server, app_name)
    fill_and_submit(driver, question="Tell me a long story.", image=None, token=TOKEN, max_tokens=4096)
    wait(driver, lambda d: int(by_id(d, "answer").get_attribute("data-deltas") or 0) >= 1, 60, "no stream")
    assert by_id(driver, "submit").get_property("disabled"), "submit must be disabled while a request runs"
    by_id(driver, "stop").click()
    wait(driver, lambda d: text_of(d, "status") == "Stopped.", 10, "stop did not end the stream")
    assert by_id(driver, "answer").get_attribute("data-final") is None
    assert not by_id(driver, "submit").get_property("disabled")
    assert by_id(driver, "stop").get_property("disabled")
    assert console_errors(driver) == []


@pytest.mark.browser
def test_loading_model_202_then_answer(browser, tiny_vlm: Path, tmp_path: Path) -> None:
    """Load on first request: the page gets 202, shows the loading state, polls health and sends again."""
    driver = browser
    env = {"MEDGEMMA_MODEL": str(tiny_vlm), "MEDGEMMA_API_TOKEN": TOKEN, "MEDGEMMA_LOAD_ON_STARTUP": "false"}
    with bentoml_serve(env, tmp_path) as lazy:
        open_page(driver, lazy, tiny_vlm.name, state="unloaded")
        fill_and_submit(driver, question="Hello?", image=None, token=TOKEN, max_tokens=8)
        wait(driver, lambda d: "model is loading" in text_of(d, "status"), 30, "202 not shown as loading")
        assert text_of(driver, "model-state") in ("loading", "ready")
        driver.save_screenshot(str(tmp_path / "playground-loading.png"))
        final = final_event(driver)
        assert final["status"] == "success"
        assert text_of(driver, "answer") == final["response"]
        assert text_of(driver, "model-state") == "ready"
        assert console_errors(driver) == []


@pytest.mark.browser
def test_failed_load_shows_stored_error(browser, tmp_path: Path) -> None:
    driver = browser
    missing = tmp_path / "no-such-checkpoint"
    missing.mkdir()
    env = {"MEDGEMMA_MODEL": str(missing), "MEDGEMMA_API_TOKEN": TOKEN}
    with bentoml_serve(env, tmp_path) as broken:
        assert wait_for_model(broken.url, missing.name)["model_state"] == "failed"
        open_page(driver, broken, missing.name, state="failed")
        assert by_id(driver, "load-error").is_displayed()
        assert "Model loading failed" in text_of(driver, "load-error")
        fill_and_submit(driver, question="Hello?", image=None, token=TOKEN)
        wait(driver, lambda d: by_id(d, "error").is_displayed(), 30, "no error shown")
        assert "503" in text_of(driver, "error")
        driver.save_screenshot(str(tmp_path / "playground-failed.png"))


# -- answers software can use: thinking folded apart, structured table, boxes drawn on the image -----------------------

BOX_GRAMMAR = (
    'start: <unused94> "thought\\n" /[a-z ]{4,24}/ <unused95> '
    '"[{\\"box_2d\\": [250, 100, 500, 600], \\"label\\": \\"" /[a-z]{3,8}/ "\\"}]"'
)


def choose_shape(driver, kind: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(by_id(driver, "format")).select_by_value(kind)
    area = by_id(driver, "constraint")
    assert area.is_displayed()
    area.send_keys(value)


@pytest.mark.browser
def test_thinking_folded_and_boxes_drawn_where_the_arithmetic_says(
    browser, server: Server, app_name: str, tmp_path: Path
) -> None:
    driver = browser
    open_page(driver, server, app_name)
    png = tmp_path / "wide.png"
    Image.new("RGB", (160, 80), (90, 160, 220)).save(png, format="PNG")  # padded to 160x160: 40 rows on top
    choose_shape(driver, "grammar", BOX_GRAMMAR)
    by_id(driver, "pad-square").click()
    fill_and_submit(driver, question="Where is the nodule?", image=png, token=TOKEN, max_tokens=120)
    final = final_event(driver)
    assert final["finish_reason"] == "stop"

    # The thought: apart from the answer, folded, no tags anywhere.
    box = by_id(driver, "thinking-box")
    assert box.is_displayed() and box.get_attribute("open") is None
    assert text_of(driver, "thinking") == final["thinking"] and 4 <= len(final["thinking"]) <= 24
    assert "<unused" not in text_of(driver, "answer") and text_of(driver, "answer") == final["response"]

    # Arithmetic: box_2d [y0, x0, y1, x1] = [250, 100, 500, 600] of the 160x160 padded square, top offset 40.
    (b,) = final["boxes"]
    assert (b["x"], b["y"], b["width"], b["height"]) == (16.0, 0.0, 80.0, 40.0)
    assert final["images"][0]["padded_to_square"] == {"size": 160, "left": 0, "top": 40}

    # Drawn on the image sent, where those pixels are at the size it is displayed.
    wait(driver, lambda d: d.execute_script("return document.getElementById('boxes-image').complete"), 10)
    img = driver.execute_script("return document.getElementById('boxes-image').getBoundingClientRect().toJSON()")
    drawn = driver.execute_script(
        "return document.querySelector('#boxes-figure .box').getBoundingClientRect().toJSON()"
    )
    scale_x, scale_y = img["width"] / 160, img["height"] / 80
    assert img["width"] > 100  # really displayed
    assert abs(drawn["left"] - (img["left"] + 16 * scale_x)) < 1.5
    assert abs(drawn["top"] - (img["top"] + 0 * scale_y)) < 1.5
    assert abs(drawn["width"] - 80 * scale_x) < 1.5
    assert abs(drawn["height"] - 40 * scale_y) < 1.5
    label = driver.find_element("css selector", "#boxes-figure .box .box-label")
    assert label.get_property("textContent") == b["label"]
    driver.save_screenshot(str(tmp_path / "playground-boxes.png"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "playground-boxes.png"))
    assert console_errors(driver) == []


@pytest.mark.browser
def test_structured_answer_as_a_table_beside_its_json(browser, server: Server, app_name: str) -> None:
    driver = browser
    open_page(driver, server, app_name)
    schema = {
        "type": "object",
        "properties": {
            "severity": {"enum": ["mild", "severe"]},
            "location": {
                "type": "object",
                "properties": {"side": {"enum": ["left", "right"]}},
                "required": ["side"],
                "additionalProperties": False,
            },
            "sizes_mm": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2,
                         "maxItems": 2},
        },
        "required": ["severity", "location", "sizes_mm"],
        "additionalProperties": False,
    }  # fmt: skip
    choose_shape(driver, "json_schema", json.dumps(schema))
    by_id(driver, "thinking-on").click()  # the drop option: no thought in the response
    fill_and_submit(driver, question="Report as JSON.", image=None, token=TOKEN, max_tokens=200)
    final = final_event(driver)
    value = json.loads(final["response"])
    assert set(value) == {"severity", "location", "sizes_mm"} and "thinking" not in final
    assert by_id(driver, "structured-box").is_displayed() and by_id(driver, "answer").is_displayed()
    rows = driver.find_elements("css selector", "#structured-rows tr")
    shown = {r.find_element("css selector", "th").text: r.find_element("css selector", "td").text for r in rows}
    assert shown == {
        "severity": value["severity"],
        "location.side": value["location"]["side"],
        "sizes_mm[0]": str(value["sizes_mm"][0]),
        "sizes_mm[1]": str(value["sizes_mm"][1]),
    }
    assert by_id(driver, "thinking-box").get_attribute("hidden") is not None
    assert console_errors(driver) == []


@pytest.mark.browser
def test_bad_schema_is_refused_before_and_by_the_server(browser, server: Server, app_name: str) -> None:
    driver = browser
    open_page(driver, server, app_name)
    choose_shape(driver, "json_schema", '{"type": "object", "not": {}}')
    fill_and_submit(driver, question="Report.", image=None, token=TOKEN, max_tokens=20)
    wait(driver, lambda d: by_id(d, "error").is_displayed(), 30, "no error shown")
    assert "Unimplemented keys" in text_of(driver, "error") and "400" in text_of(driver, "error")
    assert all("400" in e["message"] for e in console_errors(driver))
