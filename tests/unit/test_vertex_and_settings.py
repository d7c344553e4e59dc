"""Vertex AI's variables (AIP_*) and the DICOMweb/volume/slide settings: parsing, validation, route aliases."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from medgemma.config import Settings
from medgemma.middleware import PREDICT_PATH, VERTEX_HEALTH_PATH, EdgeMiddleware


def test_new_settings_defaults_and_environment_names():
    s = Settings.from_env({})
    assert (s.max_images, s.max_slices, s.wsi_max_patches, s.wsi_magnification) == (128, 85, 125, 10.0)
    assert s.dicomweb_urls == () and s.dicomweb_concurrency == 4
    assert Settings.env_name("dicomweb_urls") == "MEDGEMMA_DICOMWEB_URLS"
    assert Settings.env_name("aip_predict_route") == "AIP_PREDICT_ROUTE"
    assert Settings.env_name("aip_http_port") == "AIP_HTTP_PORT"
    env = {
        "MEDGEMMA_DICOMWEB_URLS": " https://pacs.example.org/dicom-web , http://10.0.0.5:8042/dicom-web/,",
        "AIP_PREDICT_ROUTE": "/v1/endpoints/123/deployedModels/456:predict",
        "AIP_HEALTH_ROUTE": "/v1/endpoints/123/deployedModels/456",
        "AIP_HTTP_PORT": "8080",
    }
    s = Settings.from_env(env)
    assert s.dicomweb_urls == ("https://pacs.example.org/dicom-web", "http://10.0.0.5:8042/dicom-web/")
    assert s.aip_http_port == 8080 and s.aip_predict_route.endswith(":predict")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"MEDGEMMA_DICOMWEB_URLS": "ftp://pacs/dicom-web"}, "MEDGEMMA_DICOMWEB_URLS"),
        ({"MEDGEMMA_DICOMWEB_URLS": "https://user:pw@pacs/dicom-web"}, "MEDGEMMA_DICOMWEB_URLS"),
        ({"MEDGEMMA_MAX_SLICES": "0"}, "MEDGEMMA_MAX_SLICES"),
        ({"MEDGEMMA_DICOMWEB_READ_TIMEOUT_S": "0"}, "MEDGEMMA_DICOMWEB_READ_TIMEOUT_S"),
        ({"AIP_PREDICT_ROUTE": "predict"}, "AIP_PREDICT_ROUTE"),
        ({"AIP_HTTP_PORT": "70000"}, "AIP_HTTP_PORT"),
    ],
)
def test_bad_values_fail_at_startup_naming_the_variable(env, named):
    with pytest.raises(ValueError, match=named):
        Settings.from_env(env)


def _app() -> Starlette:
    async def echo(request) -> JSONResponse:
        return JSONResponse({"path": request.url.path})

    return Starlette(routes=[Route(PREDICT_PATH, echo, methods=["POST"]), Route(VERTEX_HEALTH_PATH, echo)])


def test_vertex_routes_are_rewritten_onto_predict_and_health_and_health_stays_open():
    predict_route = "/v1/endpoints/1/deployedModels/2:predict"
    health_route = "/v1/endpoints/1/deployedModels/2"
    app = EdgeMiddleware(
        _app(), api_token="t0ken", aliases={predict_route: PREDICT_PATH, health_route: VERTEX_HEALTH_PATH, "": "/x"}
    )
    client = TestClient(app)
    assert client.get(health_route).json() == {"path": VERTEX_HEALTH_PATH}  # open: Vertex probes without a token
    assert client.post(predict_route, json={}).status_code == 401  # the model route keeps its token
    r = client.post(predict_route, json={}, headers={"Authorization": "Bearer t0ken"})
    assert r.json() == {"path": PREDICT_PATH}
    unauthorised = client.post(PREDICT_PATH, json={})
    assert unauthorised.status_code == 401 and "message" in unauthorised.json()["error"]  # OpenAI/Google error shape
