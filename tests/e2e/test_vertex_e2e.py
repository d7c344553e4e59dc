"""The service as a Vertex AI custom container: port, predict route and health route from the AIP_* variables."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import bentoml_serve, free_port

pytestmark = pytest.mark.e2e
PREDICT = "/v1/endpoints/42/deployedModels/7:predict"
HEALTH = "/v1/endpoints/42/deployedModels/7"


def test_aip_variables_set_the_port_and_the_routes(tiny_vlm, tmp_path):
    port = free_port()
    env = {
        "MEDGEMMA_MODEL": str(tiny_vlm),
        "MEDGEMMA_LOAD_ON_STARTUP": "false",
        "AIP_HTTP_PORT": str(port),
        "AIP_PREDICT_ROUTE": PREDICT,
        "AIP_HEALTH_ROUTE": HEALTH,
    }
    # no -p: the port must come from AIP_HTTP_PORT
    with bentoml_serve(env, tmp_path, port=port, pass_port=False) as srv:
        health = httpx.get(f"{srv.url}{HEALTH}", timeout=10)
        assert health.status_code == 503 and health.json()["model_state"] == "unloaded"  # not ready: no traffic yet
        assert "not ready" in health.json()["error"]
        message = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
        body = {"instances": [{"@requestFormat": "chatCompletions", "max_tokens": 3, "messages": [message]}]}
        first = httpx.post(f"{srv.url}{PREDICT}", json=body, timeout=60)
        assert first.status_code == 202  # the request starts the load, as on every model route
        deadline = time.monotonic() + 120
        while httpx.get(f"{srv.url}{HEALTH}", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "model never became ready"
            time.sleep(0.3)
        r = httpx.post(f"{srv.url}{PREDICT}", json=body, timeout=120)
        assert r.status_code == 200, r.text
        prediction = r.json()["predictions"]
        assert prediction["object"] == "chat.completion" and prediction["usage"]["completion_tokens"] >= 1
        assert httpx.post(f"{srv.url}/predict", json=body, timeout=120).status_code == 200  # the plain path too
