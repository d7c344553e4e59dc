"""The mounted FastAPI routes (seed GETs, OpenAI API) on a real core, through starlette's TestClient."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.requests import ClientDisconnect
from starlette.testclient import TestClient

from medgemma.config import Settings
from medgemma.core import MedGemmaCore
from medgemma.errors import ModelLoading, Overloaded
from medgemma.lifecycle import ModelState
from medgemma.middleware import OWN_ERROR_HEADER, EdgeMiddleware
from medgemma.routes import error_response, openai_app, seed_app
from tests.helpers import assert_error


@pytest.fixture(scope="module")
def core(tiny_vlm: Path) -> Iterator[MedGemmaCore]:
    c = MedGemmaCore(Settings(model=str(tiny_vlm)))
    c.startup()
    deadline = time.monotonic() + 120
    while c.manager.state is not ModelState.READY:
        assert c.manager.state is not ModelState.FAILED, c.manager.error
        assert time.monotonic() < deadline
        time.sleep(0.02)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def seed(core: MedGemmaCore) -> TestClient:
    return TestClient(seed_app(lambda: core))


@pytest.fixture(scope="module")
def oai(core: MedGemmaCore) -> TestClient:
    return TestClient(openai_app(lambda: core))


def chat(core: MedGemmaCore, **extra: object) -> dict:
    return {
        "model": core.settings.route_prefix,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
    } | extra


def test_seed_gets(seed: TestClient, core: MedGemmaCore):
    health = seed.get("/health")
    assert health.status_code == 200 and health.json()["model_state"] == "ready"
    assert "details" not in health.json()  # no middleware, so nobody authenticated
    schema = seed.get("/schema")
    assert schema.status_code == 200 and schema.json() == core.schema()
    models = seed.get("/models")
    assert models.status_code == 200 and models.json()["data"][0]["id"] == core.settings.route_prefix
    assert seed.post("/health").status_code == 405  # the POSTs are BentoML's APIs, not this app's


def test_health_details_follow_the_edge_authentication(core: MedGemmaCore, tiny_vlm: Path):
    client = TestClient(EdgeMiddleware(seed_app(lambda: core), api_token="t0k"))
    assert "details" not in client.get("/health").json()
    assert "details" not in client.get("/health", headers={"Authorization": "Bearer nope"}).json()
    authed = client.get("/health", headers={"Authorization": "Bearer t0k"}).json()
    assert authed["details"]["model_source"] == str(tiny_vlm)


@pytest.mark.parametrize("client_name", ["seed", "oai"])
def test_chat_completions_on_both_mounts(request: pytest.FixtureRequest, core: MedGemmaCore, client_name: str):
    client: TestClient = request.getfixturevalue(client_name)
    r = client.post("/chat/completions", json=chat(core))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] <= 2


def test_chat_completion_stream_is_sse(oai: TestClient, core: MedGemmaCore):
    with oai.stream("POST", "/chat/completions", json=chat(core, stream=True)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    ("content", "status", "error_type"),
    [
        (b"{not json", 400, "invalid_request_error"),
        (b"[1, 2]", 400, "invalid_request_error"),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "q"}]}', 404, "not_found_error"),
    ],
)
def test_openai_errors_in_openai_shape(oai: TestClient, content: bytes, status: int, error_type: str):
    r = oai.post("/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert error["type"] == error_type and error["message"]
    assert r.headers[OWN_ERROR_HEADER.decode()] == "1"  # the edge strips it and leaves the body alone


def test_openai_models(oai: TestClient, core: MedGemmaCore):
    r = oai.get("/models")
    assert r.status_code == 200 and r.json() == core.models()


def test_unexpected_errors_are_a_generic_500_and_logged(caplog: pytest.LogCaptureFixture):
    def broken() -> MedGemmaCore:
        raise RuntimeError("secret internals /srv/x")

    client = TestClient(seed_app(broken))
    with caplog.at_level(logging.ERROR, logger="medgemma.routes"):
        r = client.get("/health")
    body = assert_error(r, 500)
    assert body["error"] == "Internal error while serving the request"
    assert "secret" not in r.text
    assert any("RuntimeError" in rec.getMessage() for rec in caplog.records)
    oai = TestClient(openai_app(broken)).get("/models")
    assert oai.status_code == 500 and oai.json()["error"]["type"] == "server_error"


def test_loading_and_failed_states_on_get_routes(tmp_path: Path):
    core = MedGemmaCore(Settings(model=str(tmp_path / "missing"), load_on_startup=False, load_retry_backoff_s=600))
    client = TestClient(seed_app(lambda: core))
    first = client.get("/schema")  # unloaded: this request starts the load
    assert first.status_code == 202 and first.json()["status"] == "loading"
    assert first.headers["retry-after"] == str(core.settings.loading_retry_after_s)
    deadline = time.monotonic() + 30
    while core.manager.state is not ModelState.FAILED:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    failed = client.get("/schema")
    assert failed.status_code == 503 and failed.json()["status"] == "failed"
    assert int(failed.headers["retry-after"]) > 500
    assert client.get("/health").status_code == 200  # health answers in every state


def test_error_response_shapes():
    r = error_response(Overloaded("queue full", retry_after=3))
    assert r.status_code == 429
    assert json.loads(r.body) == {"status": "error", "error": "queue full", "retry_after_seconds": 3}
    assert r.headers["retry-after"] == "3" and r.headers[OWN_ERROR_HEADER.decode()] == "1"
    loading = error_response(ModelLoading("wait", retry_after=5), openai=True)
    assert loading.status_code == 202 and json.loads(loading.body)["error"]["type"] == "model_loading"
    gone = error_response(ClientDisconnect())
    assert gone.status_code == 499
