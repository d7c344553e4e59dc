"""Images where hospitals keep them, end to end: a real `bentoml serve` fetching from a real Orthanc PACS.

The PACS (Debian's Orthanc with its DICOMweb plugin, see ``tests/pacs.py``) holds a CT series of 120 instances
uploaded shuffled (two acquisitions, a DERIVED reformat, a repeated instance number), a sagittal MR series, a
radiograph, a structured report and a DICOM whole-slide image; a second Orthanc admits one bearer token only.
Every expectation (which slices, in which order, how many patches) is computed here from how the data was made.
"""

from __future__ import annotations

import base64
import io
import time

import httpx
import pydicom
import pytest

from tests.conftest import bentoml_serve, free_port, require_pacs, wait_for_model
from tests.helpers import assert_error
from tests.pacs import PATIENT_ID, PATIENT_NAME, SLIDE_TISSUE_PATCHES, orthanc, radiograph

pytestmark = pytest.mark.e2e
GOOD_TOKEN = "pacs-token-3f9a"
MARKER = "MARKER-CREDENTIAL-7d41c2"  # a wrong credential: must never reach a log or a response
READ_TIMEOUT_S = 5.0
BYTE_CAP = 4_000_000  # above every positive test's fetches (< 2.5 MB), below the 512 x 512 CT's 6 MB


def notebook_indices(n: int, k: int = 85) -> list[int]:
    """Google's CT notebook sampling, written independently of medgemma.volume."""
    return list(range(n)) if n <= k else [int(i * (n - 1) / k + 0.5) for i in range(1, k + 1)]


@pytest.fixture(scope="module")
def protected(tmp_path_factory):
    """A second PACS that admits only ``Bearer GOOD_TOKEN``, holding one radiograph."""
    require_pacs()
    with orthanc(tmp_path_factory.mktemp("orthanc-protected"), token=GOOD_TOKEN) as server:
        study, series, instance, data = radiograph()
        server.upload(data)
        yield server, f"{server.dicomweb}/studies/{study}/series/{series}/instances/{instance}"


@pytest.fixture(scope="module")
def dead_root():
    return f"http://127.0.0.1:{free_port()}/dicom-web"  # allow-listed, nothing listens there


@pytest.fixture(scope="module")
def server(tiny_vlm, tmp_path_factory, pacs, protected, dead_root):
    orthanc_server, _ = pacs
    env = {
        "MEDGEMMA_MODEL": str(tiny_vlm),
        "MEDGEMMA_DICOMWEB_URLS": ",".join([orthanc_server.dicomweb, protected[0].dicomweb, dead_root]),
        "MEDGEMMA_DICOMWEB_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
        "MEDGEMMA_DICOMWEB_MAX_BYTES": str(BYTE_CAP),
    }
    with bentoml_serve(env, tmp_path_factory.mktemp("dicomweb-serve")) as srv:
        wait_for_model(srv.url, tiny_vlm.name)
        yield srv


@pytest.fixture(scope="module")
def data(pacs):
    return pacs[1]


@pytest.fixture(scope="module")
def seed(server, tiny_vlm):
    def post(body: dict, timeout: float = 300) -> httpx.Response:
        return httpx.post(f"{server.url}/{tiny_vlm.name}/v1/generate", json=body, timeout=timeout)

    return post


def source(url, credential: str | None = None) -> dict:
    spec = {"dicom_source": url}
    if credential is not None:
        spec["access_credential"] = credential
    return spec


def still_serving(seed) -> None:
    r = seed({"text": "still there?", "max_new_tokens": 2})
    assert r.status_code == 200, r.text


def check_ct_report(report: dict, data) -> None:
    ct = data.ct
    assert report["type"] == "volume" and report["modality"] == "CT" and report["kind"] == "dicomweb_series"
    assert report["instances_found"] == ct.found == 120
    assert report["instances_used"] == ct.used == 109
    assert report["slices_sampled"] == 85
    assert report["dropped"] == ct.dropped
    assert report["order_key"] == "slice_normal"
    picked = notebook_indices(ct.used)
    # anatomical order, head first like the instance numbers: z falls along the series
    assert report["slice_positions"] == [ct.main_z[i] for i in picked]
    assert report["instance_numbers"] == [ct.instance_numbers[i] for i in picked]
    assert report["windows"] == {"kind": "ct_rgb", "hu": [[-1024, 1024], [-135, 215], [0, 80]]}


# -- what reaches the model ----------------------------------------------------------------------------------------


def test_ct_series_by_series_uri_seed_api(seed, data):
    r = seed({"text": "Summarise this CT.", "image_dicom": source(data.ct_url), "max_new_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    (report,) = body["image_sources"]
    check_ct_report(report, data)
    images = body["images"]
    assert [im["label"] for im in images] == [f"SLICE {n}" for n in range(1, 86)]
    assert [im["slice_location"] for im in images] == report["slice_positions"]
    assert all(im["source_index"] == 0 and im["window"]["source"] == "ct_rgb" for im in images)
    # 85 images (boi + 4 soft tokens + eoi in the tiny model) each followed by its "SLICE n" text
    assert body["compute_metrics"]["input_tokens"] > 85 * 8
    assert PATIENT_NAME.split("^")[0] not in r.text and PATIENT_ID not in r.text


def test_same_ct_through_chat_format_openai_and_google(server, seed, data, tiny_vlm):
    part = {"type": "image_dicom", "image_dicom": source(data.ct_url)}
    text = {"type": "text", "text": "Summarise this CT."}
    chat = seed({"messages": [{"role": "user", "content": [text, part]}], "max_new_tokens": 3})
    assert chat.status_code == 200, chat.text
    check_ct_report(chat.json()["image_sources"][0], data)

    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300)
    completion = client.chat.completions.create(
        model=tiny_vlm.name, messages=[{"role": "user", "content": [text, part]}], max_tokens=3
    )
    extra = completion.model_extra or {}
    check_ct_report(extra["image_sources"][0], data)
    assert completion.usage.prompt_tokens == chat.json()["compute_metrics"]["input_tokens"]

    body = {"instances": [{"@requestFormat": "chatCompletions", "messages": [{"role": "user", "content": [text, part]}],
                           "max_tokens": 3}]}  # fmt: skip
    google = httpx.post(f"{server.url}/predict", json=body, timeout=300)
    assert google.status_code == 200, google.text
    prediction = google.json()["predictions"]
    assert isinstance(prediction["choices"][0]["message"]["content"], str)
    check_ct_report(prediction["image_sources"][0], data)
    assert prediction["usage"]["prompt_tokens"] == completion.usage.prompt_tokens


def test_mr_series_one_minmax_over_the_volume(seed, data):
    r = seed({"text": "Describe.", "image_dicom": source(data.mr_url), "max_new_tokens": 2})
    assert r.status_code == 200, r.text
    (report,) = r.json()["image_sources"]
    assert report["modality"] == "MR" and report["slices_sampled"] == report["instances_used"] == 24
    assert report["order_key"] == "slice_normal"
    assert report["instance_numbers"] == list(range(1, 25))
    # sagittal: the normal is -x, and the instance numbers run with +x
    assert report["slice_positions"] == [-x for x in data.mr.x]
    yy_xx_max = (47 + 47) * 10
    assert report["windows"] == {"kind": "minmax_volume", "lo": 40.0, "hi": float(yy_xx_max + 40 * 24)}


def test_single_instance_and_list_in_callers_order(seed, data):
    r = seed({"text": "Read this X-ray.", "image_dicom": source(data.radiograph_url), "max_new_tokens": 2})
    assert r.status_code == 200, r.text
    (report,) = r.json()["image_sources"]
    assert report["kind"] == "dicomweb_instance" and report["type"] == "images"
    assert report["instances_found"] == report["instances_used"] == report["slices_sampled"] == 1
    (image,) = r.json()["images"]
    assert image["modality"] == "DX" and image["window"]["source"] == "dicom"

    # three CT instances named in a deliberately non-anatomical order stay in that order
    headers = [pydicom.dcmread(io.BytesIO(f), stop_before_pixels=True) for f in data.ct.files]
    by_number = {int(h.InstanceNumber): h.SOPInstanceUID for h in headers if h.AcquisitionNumber == 1}
    wanted = [30, 5, 77]
    urls = [f"{data.ct_url}/instances/{by_number[n]}" for n in wanted]
    r = seed({"text": "Compare.", "image_dicom": source(urls), "max_new_tokens": 2})
    assert r.status_code == 200, r.text
    (report,) = r.json()["image_sources"]
    assert report["kind"] == "dicomweb_instances" and report["order_key"] == "request"
    assert report["instance_numbers"] == wanted
    assert [im["label"] for im in r.json()["images"]] == ["SLICE 1", "SLICE 2", "SLICE 3"]


def test_dicom_wsi_and_svs_slide_give_the_tissue_patches(seed, data):
    r = seed({"text": "Describe the tissue.", "image_dicom": source(data.wsi_url), "max_new_tokens": 2})
    assert r.status_code == 200, r.text
    (report,) = r.json()["image_sources"]
    assert report["type"] == "slide" and report["format"] == "dicom"
    assert report["wsi_level"] == 1 and report["level_size"] == [1792, 1792] and report["magnification"] == 10.0
    assert report["patch_count"] == report["tissue_patches"] == SLIDE_TISSUE_PATCHES
    patches = [im["patch"] for im in r.json()["images"]]
    assert [(p["x"], p["y"]) for p in patches] == [(0, 0), (896, 0), (0, 896)]  # all but the glass quadrant

    svs = "data:image/tiff;base64," + base64.b64encode(data.svs.read_bytes()).decode()
    r = seed({"text": "Describe the tissue.", "image": svs, "max_new_tokens": 2})
    assert r.status_code == 200, r.text
    (report,) = r.json()["image_sources"]
    assert report["kind"] == "uploaded_slide" and report["format"] == "svs"
    assert report["patch_count"] == SLIDE_TISSUE_PATCHES and report["mpp"] == 1.0


# -- bad sources: a clear error each, and the server keeps serving ---------------------------------------------------


def test_root_not_allow_listed_is_400(seed, data):
    url = data.ct_url.replace("/dicom-web/", "/other-root/")
    body = assert_error(seed({"text": "q", "image_dicom": source(url)}), 400)
    assert "MEDGEMMA_DICOMWEB_URLS" in body["error"] and body["param"] == "image_dicom.dicom_source"
    assert data.ct.series not in body["error"]  # never echoes the URL
    still_serving(seed)


def test_pacs_down_is_502_and_a_frozen_pacs_504_within_the_timeout(seed, data, dead_root, protected):
    started = time.monotonic()
    body = assert_error(seed({"text": "q", "image_dicom": source(dead_root + data.ct_url[len(data.root) :])}), 502)
    assert "could not be reached" in body["error"]
    assert time.monotonic() - started < 10

    server, url = protected
    server.pause()
    try:
        started = time.monotonic()
        body = assert_error(seed({"text": "q", "image_dicom": source(url, GOOD_TOKEN)}), 504)
        elapsed = time.monotonic() - started
    finally:
        server.resume()
    assert f"within {READ_TIMEOUT_S:g} s" in body["error"]
    assert READ_TIMEOUT_S - 0.5 < elapsed < READ_TIMEOUT_S + 10
    still_serving(seed)


def test_credentials_are_sent_and_a_wrong_one_is_refused_without_leaking(server, seed, protected):
    _, url = protected
    ok = seed({"text": "Read this X-ray.", "image_dicom": source(url, GOOD_TOKEN), "max_new_tokens": 2})
    assert ok.status_code == 200, ok.text
    r = seed({"text": "q", "image_dicom": source(url, MARKER)})
    body = assert_error(r, 403)
    assert body["upstream_status"] == 403 and "access_credential" in body["error"]
    assert MARKER not in r.text
    part = {"type": "image_dicom", "image_dicom": source(url, MARKER)}
    openai_r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "x", "messages": [{"role": "user", "content": [part]}]},
        timeout=60,
    )
    assert MARKER not in openai_r.text
    still_serving(seed)
    log = server.log()
    assert MARKER not in log and GOOD_TOKEN not in log
    assert "1.2.826.0.1.3680043" not in log  # no UID (pydicom's UID root) in the server log


def test_empty_series_non_image_and_byte_cap(seed, data):
    missing = f"{data.root}/studies/{data.ct.study}/series/1.2.3.4.5.6.7"
    body = assert_error(seed({"text": "q", "image_dicom": source(missing)}), 404)
    assert "no instances" in body["error"]
    body = assert_error(seed({"text": "q", "image_dicom": source(data.report_url)}), 415)
    assert "no image" in body["error"]
    body = assert_error(seed({"text": "q", "image_dicom": source(data.big_ct_url)}), 413)
    assert "MEDGEMMA_DICOMWEB_MAX_BYTES" in body["error"]
    still_serving(seed)


def test_google_format_refuses_what_it_does_not_support(server, data):
    def predict(body: dict) -> httpx.Response:
        return httpx.post(f"{server.url}/predict", json=body, timeout=60)

    gcs = {"type": "image_gcs", "image_gcs": {"gcs_source": "gs://bucket/x.dcm"}}
    r = predict({"instances": [{"messages": [{"role": "user", "content": [gcs]}]}]})
    assert r.status_code == 400 and "image_gcs" in r.json()["error"]["message"]
    r = predict({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logit_bias": {}})
    assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"]
    bare = predict({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 2})
    assert bare.status_code == 200, bare.text
    assert bare.json()["object"] == "chat.completion"  # bare request, bare completion
    health = httpx.get(f"{server.url}/vertex/health", timeout=10)
    assert health.status_code == 200 and health.json()["model_state"] == "ready"


def test_bentoml_client_takes_a_dicomweb_source(server, data):
    import bentoml

    with bentoml.SyncHTTPClient(server.url, timeout=300) as client:
        body = client.generate(
            text="Read this X-ray.", image_dicom={"dicom_source": data.radiograph_url}, max_new_tokens=2
        )
    assert body["status"] == "success"
    assert body["image_sources"][0]["kind"] == "dicomweb_instance"
    assert body["images"][0]["modality"] == "DX"
