"""Faults, auth and logs against a real `bentoml serve`: SIGTERM drain, mass disconnects, bearer tokens, no patient
data in logs."""

from __future__ import annotations

import asyncio
import base64
import io
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import bentoml_serve, wait_for_model

pytestmark = pytest.mark.e2e

MARKER = "ZZPATIENTMARKER93"


def health(url: str, app: str) -> dict:
    return httpx.get(f"{url}/{app}/v1/health", timeout=10).json()


def test_sigterm_drains(tiny_vlm, tmp_path):
    """SIGTERM: new work gets 503 + Retry-After, readiness goes false, the running request finishes, then exit."""
    app = tiny_vlm.name
    with bentoml_serve({"MEDGEMMA_MODEL": str(tiny_vlm), "MEDGEMMA_SHUTDOWN_GRACE_S": "60"}, tmp_path) as srv:
        wait_for_model(srv.url, app)
        result: dict = {}

        def long_request() -> None:
            body = {"text": "long", "max_new_tokens": 1500}  # seconds of work, so SIGTERM lands mid-request
            r = httpx.post(f"{srv.url}/{app}/v1/generate", json=body, timeout=120)
            result["status"] = r.status_code
            result["tokens"] = r.json().get("compute_metrics", {}).get("output_tokens")

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.monotonic() + 60
        while health(srv.url, app).get("engine", {}).get("running", 0) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        refused = httpx.post(f"{srv.url}/{app}/v1/generate", json={"text": "new", "max_new_tokens": 2}, timeout=20)
        assert refused.status_code == 503
        assert refused.headers["retry-after"]
        assert refused.json()["status"] == "error"
        assert httpx.get(f"{srv.url}/readyz", timeout=10).status_code == 503
        assert health(srv.url, app)["status"] == "draining"
        t.join(120)
        assert result == {"status": 200, "tokens": 1500}
        srv.proc.wait(timeout=60)


def test_mass_disconnect_mid_stream_leaves_no_stuck_slots(tiny_vlm, tmp_path):
    app = tiny_vlm.name
    env = {"MEDGEMMA_MODEL": str(tiny_vlm), "MEDGEMMA_MAX_BATCH_SIZE": "128", "MEDGEMMA_MAX_QUEUE": "256"}
    with bentoml_serve(env, tmp_path) as srv:
        wait_for_model(srv.url, app)

        async def one(client: httpx.AsyncClient, started: asyncio.Event, counter: list[int]) -> None:
            body = {"text": "stream forever", "max_new_tokens": 3000, "stream": True}
            async with client.stream("POST", f"{srv.url}/{app}/v1/generate", json=body) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        counter[0] += 1
                        break  # leave mid-stream: the context manager closes the connection
            started.set()

        async def storm() -> int:
            counter = [0]
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                await asyncio.gather(*(one(client, asyncio.Event(), counter) for _ in range(100)))
            return counter[0]

        assert asyncio.run(storm()) == 100
        deadline = time.monotonic() + 30
        while True:
            engine = health(srv.url, app)["engine"]
            if engine["running"] == 0 and engine["waiting"] == 0:
                break
            assert time.monotonic() < deadline, f"slots still held: {engine}"
            time.sleep(0.1)
        ok = httpx.post(f"{srv.url}/{app}/v1/generate", json={"text": "after", "max_new_tokens": 3}, timeout=60)
        assert ok.status_code == 200


@pytest.fixture(scope="module")
def secured(tiny_vlm, tmp_path_factory):
    env = {"MEDGEMMA_MODEL": str(tiny_vlm), "MEDGEMMA_API_TOKEN": "s3cret-token"}
    with bentoml_serve(env, tmp_path_factory.mktemp("auth")) as srv:
        wait_for_model(srv.url, tiny_vlm.name)
        yield srv


def model_routes(app: str) -> list[tuple[str, str, dict | None]]:
    chat = {"model": app, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return [
        ("POST", f"/{app}/v1/generate", {"text": "hi", "max_new_tokens": 2}),
        ("POST", f"/{app}/v1/schema", {}),
        ("GET", f"/{app}/v1/schema", None),
        ("GET", f"/{app}/v1/models", None),
        ("POST", "/v1/chat/completions", chat),
        ("POST", f"/{app}/v1/chat/completions", chat),
        ("GET", "/v1/models", None),
    ]


@pytest.mark.parametrize(
    "header", [None, "Bearer wrong-token", "Basic czNjcmV0LXRva2Vu", "Bearer s3cret-tokenX", "s3cret-token"]
)
def test_auth_rejects_missing_or_wrong_tokens(secured, tiny_vlm, header):
    headers = {"Authorization": header} if header else {}
    for method, path, body in model_routes(tiny_vlm.name):
        r = httpx.request(method, secured.url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.headers["www-authenticate"] == "Bearer"
        data = r.json()
        if "chat/completions" in path or path == "/v1/models":
            assert data["error"]["type"] == "authentication_error"
        else:
            assert data == {"status": "error", "error": "Missing or invalid API token"}


def test_auth_accepts_the_token_and_leaves_probes_open(secured, tiny_vlm):
    headers = {"Authorization": "Bearer s3cret-token"}
    for method, path, body in model_routes(tiny_vlm.name):
        r = httpx.request(method, secured.url + path, json=body, headers=headers, timeout=60)
        assert r.status_code == 200, (method, path, r.status_code, r.text[:200])
    for path in ("/livez", "/readyz", "/metrics", f"/{tiny_vlm.name}/v1/health"):
        assert httpx.get(secured.url + path, timeout=10).status_code == 200, path


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_health_details_only_with_the_token(secured, tiny_vlm, method):
    url = f"{secured.url}/{tiny_vlm.name}/v1/health"
    for header in (None, "Bearer wrong-token"):
        anyone = httpx.request(method, url, headers={"Authorization": header} if header else {}, timeout=10)
        assert anyone.status_code == 200
        body = anyone.json()
        assert body["model_state"] == "ready"
        assert "details" not in body and "model_source" not in body
        assert str(tiny_vlm) not in anyone.text  # the checkpoint's filesystem path
    authed = httpx.request(method, url, headers={"Authorization": "Bearer s3cret-token"}, timeout=10).json()
    assert authed["model_state"] == "ready"
    assert authed["details"] == {"model_source": str(tiny_vlm), "loading_error": None}


def _dicom_with_marker() -> str:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.PatientName = f"{MARKER}^Jane"
    ds.PatientID = MARKER
    ds.InstitutionName = MARKER
    ds.StudyDate = "20260101"
    ds.Modality = "DX"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = 16, 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = (np.arange(256, dtype=np.uint16) * 16).reshape(16, 16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return "data:application/dicom;base64," + base64.b64encode(buf.getvalue()).decode()


def test_no_patient_data_in_logs_or_responses(tiny_vlm, tmp_path):
    app = tiny_vlm.name
    with bentoml_serve({"MEDGEMMA_MODEL": str(tiny_vlm)}, tmp_path) as srv:
        wait_for_model(srv.url, app)
        png = io.BytesIO()
        Image.new("RGB", (20, 20), "white").save(png, format="PNG")
        png_uri = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        gen = f"{srv.url}/{app}/v1/generate"
        bodies = []
        requests = [
            {"text": f"Patient {MARKER} has a cough", "system": f"sys {MARKER}", "max_new_tokens": 3},
            {"text": f"{MARKER} image", "image": png_uri, "max_new_tokens": 3},
            {"messages": [{"role": "user", "content": f"chat {MARKER}"}], "max_new_tokens": 3},
            {"text": f"{MARKER} stream", "max_new_tokens": 3, "stream": True},
            {"text": "dicom please", "image": _dicom_with_marker(), "max_new_tokens": 3},
            {"text": f"{MARKER} bad", "temperature": 9},
            {"text": f"{MARKER}", "image": f"data:image/png;base64,{MARKER}"},
        ]
        for i, body in enumerate(requests):
            r = httpx.post(gen, json=body, headers={"X-Request-ID": f"marker-test-{i}"}, timeout=60)
            bodies.append(r.text)
        chat = {"model": app, "messages": [{"role": "user", "content": f"openai {MARKER}"}], "max_tokens": 3}
        bodies.append(httpx.post(f"{srv.url}/v1/chat/completions", json=chat, timeout=60).text)
        dicom = httpx.post(gen, json=requests[4], timeout=60).json()
        assert dicom["status"] == "success"
        assert dicom["images"][0]["source"] == "dicom" and dicom["images"][0]["inverted"] is True
        time.sleep(1.0)  # let the last log lines reach the file
        log = srv.log()
    assert "request_id=marker-test-0" in log  # requests are logged ...
    assert "output_tokens=3" in log
    assert MARKER not in log  # ... but never their content
    # responses carry no DICOM tag either (text the user typed may come back only as generated text)
    assert MARKER not in bodies[4]
    assert "Jane" not in bodies[4]


def test_full_queue_answers_429_with_retry_after_and_every_accepted_request_completes(tiny_vlm, tmp_path):
    app = tiny_vlm.name
    env = {"MEDGEMMA_MODEL": str(tiny_vlm), "MEDGEMMA_MAX_BATCH_SIZE": "1", "MEDGEMMA_MAX_QUEUE": "1"}
    with bentoml_serve(env, tmp_path) as srv:
        wait_for_model(srv.url, app)

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                # long enough (seconds each on the tiny model) that the burst always finds the one slot and the
                # one queue place taken, however fast the engine is
                body = {"text": "busy", "max_new_tokens": 1000}
                first = asyncio.ensure_future(client.post(f"{srv.url}/{app}/v1/generate", json=body))
                # The burst comes once the first request runs: sent together, all eight could reach the queue
                # before the engine thread takes one from it, and then only one place would exist for them.
                for _ in range(600):
                    health = (await client.get(f"{srv.url}/{app}/v1/health")).json()
                    if health.get("engine", {}).get("running") == 1:
                        break
                    await asyncio.sleep(0.05)
                rest = [client.post(f"{srv.url}/{app}/v1/generate", json=body) for _ in range(7)]
                return [await first, *await asyncio.gather(*rest)]

        responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}
    assert statuses.count(429) >= 1 and statuses.count(200) >= 2
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["status"] == "error" and "queue is full" in r.json()["error"]
        else:
            assert r.json()["compute_metrics"]["output_tokens"] == 1000
