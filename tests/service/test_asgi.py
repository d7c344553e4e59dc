"""The BentoML service in-process: ``MedGemma.to_asgi()`` in a starlette TestClient (the lifespan runs ``__init__``).

``service.py`` reads its settings when it is imported, so the module fixture sets the environment first, imports a
fresh ``service`` module, and puts everything back afterwards. One model load serves the whole module.
"""

from __future__ import annotations

import asyncio
import importlib
import io
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image
from starlette.testclient import TestClient

from tests.helpers import DEMO_MARK, METRIC_KEYS, SIX_PARAMETERS, assert_error, png_bytes, png_data_uri

GPU_KEYS = [k for k in METRIC_KEYS if "gpu" in k]


PNG = png_bytes((180, 40, 40), (24, 20))
PNG_URI = png_data_uri(PNG)


@pytest.fixture(scope="module")
def svc(tiny_vlm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A freshly imported ``service`` module configured for the tiny image+text demo checkpoint."""
    tmp = tmp_path_factory.mktemp("asgi")
    env = {
        "MEDGEMMA_MODEL": str(tiny_vlm),
        "MEDGEMMA_DEMO_DIR": str(tiny_vlm.parent),
        "MEDGEMMA_LOAD_ON_STARTUP": "true",
        "MEDGEMMA_APP_NAME": "",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp / "prom"),
        "BENTOML_HOME": str(tmp / "bentoml-home"),
        "BENTOML_DO_NOT_TRACK": "true",
        "HF_HUB_OFFLINE": "1",
    }
    (tmp / "prom").mkdir()
    saved_env = {k: os.environ.get(k) for k in env}
    saved_module = sys.modules.pop("service", None)
    os.environ.update(env)
    try:
        yield importlib.import_module("service")
    finally:
        sys.modules.pop("service", None)
        if saved_module is not None:
            sys.modules["service"] = saved_module
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def client(svc: Any) -> Iterator[TestClient]:
    with TestClient(svc.MedGemma.to_asgi()) as c:
        deadline = time.monotonic() + 120
        while True:
            health = c.get(f"/{svc.APP}/v1/health").json()
            if health["model_state"] in ("ready", "failed"):
                break
            assert time.monotonic() < deadline, health
            time.sleep(0.05)
        assert health["model_state"] == "ready", health
        yield c


@pytest.fixture(scope="module")
def base(svc: Any) -> str:
    return f"/{svc.APP}/v1"


def generate(client: TestClient, base: str, body: dict, status: int = 200) -> dict:
    r = client.post(f"{base}/generate", json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    data = r.json()
    assert isinstance(data, dict), data
    return data


def assert_success(body: dict, max_new_tokens: int) -> None:
    assert body["status"] == "success"
    assert DEMO_MARK in body["model"]
    assert body["model"].startswith("medgemma-demo-tiny-it")
    assert isinstance(body["response"], str)
    assert set(SIX_PARAMETERS) <= set(body["parameters"])
    assert body["parameters"]["max_new_tokens"] == max_new_tokens
    metrics = body["compute_metrics"]
    assert set(METRIC_KEYS) <= set(metrics)
    assert metrics["query_duration_seconds"] >= 0
    assert metrics["replica_memory_mb"] > 0
    assert metrics["replica_cpu_percent"] is not None
    assert metrics["input_tokens"] > 0
    assert 1 <= metrics["output_tokens"] <= max_new_tokens
    try:
        import torch

        no_gpu = not torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        no_gpu = True
    if no_gpu:
        assert all(metrics[k] is None for k in GPU_KEYS if k != "replica_gpu_memory_total_mb"), metrics


# ------------------------------------------------------------------------------------------------ routes and app name


def test_app_name_is_the_checkpoint_dir(svc, tiny_vlm):
    assert svc.APP == tiny_vlm.name == "medgemma-demo-tiny-it"


def test_builtin_routes(client):
    assert client.get("/readyz").status_code == 200
    assert client.get("/livez").status_code == 200
    openapi = client.get("/docs.json").json()
    assert any(p.endswith("/v1/generate") for p in openapi["paths"])


# ------------------------------------------------------------------------------------------------ seed examples


def test_seed_simple_text(client, base):
    body = generate(
        client,
        base,
        {"text": "How do you differentiate bacterial from viral pneumonia?",
         "system": "You are a helpful medical assistant.", "max_new_tokens": 8},
    )  # fmt: skip
    assert_success(body, 8)
    assert body["parameters"] == {
        "max_new_tokens": 8,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "repetition_penalty": None,
    }
    assert "images" not in body


def test_seed_simple_image(client, base):
    text = {"text": "Describe this X-ray", "system": "You are an expert radiologist.", "max_new_tokens": 6}
    with_image = generate(client, base, {**text, "image": PNG_URI})
    without = generate(client, base, text)
    assert_success(with_image, 6)
    # the image's soft tokens are part of the prompt
    assert with_image["compute_metrics"]["input_tokens"] > without["compute_metrics"]["input_tokens"]
    assert with_image["images"][0]["source"] == "png"


def test_seed_chat(client, base):
    body = generate(
        client,
        base,
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "You are a helpful medical assistant."}]},
                {"role": "user", "content": [{"type": "text", "text": "What are the symptoms of diabetes?"}]},
            ],
            "max_new_tokens": 7,
        },
    )
    assert_success(body, 7)


def test_seed_chat_image(client, base):
    body = generate(
        client,
        base,
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Describe this X-ray"},
                        {"type": "image", "image": PNG_URI},
                    ],
                },
            ],
            "max_new_tokens": 5,
        },
    )
    assert_success(body, 5)
    assert len(body["images"]) == 1


def test_seed_simple_format_with_sampling_parameters(client, base):
    body = generate(
        client,
        base,
        {"text": "q", "system": "s", "max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 50,
         "repetition_penalty": 1.1, "seed": 1},
    )  # fmt: skip
    assert_success(body, 4)
    assert body["parameters"] == {
        "max_new_tokens": 4,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 50,
        "repetition_penalty": 1.1,
    }


def test_default_max_new_tokens_is_200(client, base):
    body = generate(client, base, {"text": "q", "top_k": 1, "seed": 0})
    assert body["parameters"]["max_new_tokens"] == 200


def test_greedy_is_deterministic(client, base):
    req = {"text": "Describe the heart.", "max_new_tokens": 6}
    assert generate(client, base, req)["response"] == generate(client, base, req)["response"]


def test_multipart_image_upload(client, base):
    # how bentoml.SyncHTTPClient sends a PIL image: a multipart file part, other fields JSON-encoded
    r = client.post(
        f"{base}/generate",
        files={"image": ("xray.png", PNG, "image/png")},
        data={"text": '"Describe this X-ray"', "max_new_tokens": "3"},
    )
    assert r.status_code == 200, r.text
    assert_success(r.json(), 3)


def test_request_id_is_echoed(client, base):
    r = client.post(f"{base}/generate", json={"text": "q", "max_new_tokens": 1}, headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert r.json()["request_id"] == "abc-123"


# -------------------------------------------------------------------------------------------- schema, health, models


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_schema(client, base, method):
    r = client.request(method, f"{base}/schema")
    assert r.status_code == 200, r.text
    schema = r.json()
    assert schema["model_class"] == "Gemma3ForConditionalGeneration"
    assert schema["processor_class"] == "Gemma3Processor"
    assert schema["capabilities"] == ["text-to-text", "image-text-to-text"]
    assert DEMO_MARK in schema["model_id"]
    assert set(SIX_PARAMETERS) <= set(schema["inputs"]["optional"])
    assert "image" in schema["inputs"]["optional"]
    assert schema["inputs"]["required"]
    assert schema["defaults"] == {"max_new_tokens": 200, "do_sample": False}


def test_get_and_post_schema_agree(client, base):
    assert client.get(f"{base}/schema").json() == client.post(f"{base}/schema").json()


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_health(client, base, method, tiny_vlm):
    r = client.request(method, f"{base}/health")
    assert r.status_code == 200, r.text
    health = r.json()
    assert health["status"] == "healthy"
    assert health["model_state"] == "ready"
    assert DEMO_MARK in health["model"]
    # No API token is set, so nobody is authenticated: no model path (or other details) in the open health answer.
    assert "details" not in health and "model_source" not in health
    assert str(tiny_vlm) not in r.text
    assert health["device"] == "cpu" or health["device"].startswith("cuda")
    assert health["uptime_seconds"] >= 0


def test_models(client, base, svc):
    r = client.get(f"{base}/models")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    [entry] = body["data"]
    assert entry["id"] == svc.APP
    assert entry["state"] == "ready"
    assert entry["demo"] is True
    assert entry["capabilities"] == ["text-to-text", "image-text-to-text"]


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"text": "q", "max_new_tokens": 0}, "max_new_tokens"),
        ({"text": "q", "max_new_tokens": 4097}, "max_new_tokens"),
        ({"text": "q", "max_new_tokens": "many"}, "max_new_tokens"),
        ({"text": "q", "temperature": 2.5}, "temperature"),
        ({"text": "q", "temperature": -0.1}, "temperature"),
        ({"text": "q", "top_p": 0}, "top_p"),
        ({"text": "q", "top_p": 1.5}, "top_p"),
        ({"text": "q", "top_k": 0}, "top_k"),
        ({"text": "q", "repetition_penalty": 0}, "repetition_penalty"),
        ({"text": 5}, "text"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
        ({"text": "q", "image": "data:image/png;base64,aGVsbG8gd29ybGQ="}, "image"),
        ({"text": "q", "image": 42}, "image"),
    ],
    ids=lambda x: str(x)[:40],
)
def test_bad_input_is_a_400_object_naming_the_field(client, base, body, param):
    err = assert_error(client.post(f"{base}/generate", json=body))
    assert err["param"] == param
    assert param.split("[")[0] in err["error"]


@pytest.mark.parametrize("field", ["foo", "max_tokens", "prompt"])
def test_unknown_field_is_a_400(client, base, field):
    err = assert_error(client.post(f"{base}/generate", json={"text": "q", "max_new_tokens": 1, field: 1}))
    assert field in err["error"]


def test_non_json_and_non_object_bodies(client, base):
    for content in (b"not json", b"[1, 2]", b'"text"', b"{"):
        r = client.post(f"{base}/generate", content=content, headers={"content-type": "application/json"})
        assert_error(r)


def test_roles_and_text_only_rules_surface_as_400(client, base):
    err = assert_error(
        client.post(
            f"{base}/generate",
            json={"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        )
    )
    assert "alternate" in err["error"]


def test_unknown_route_is_a_json_404(client):
    err = assert_error(client.get("/no-such-app/v1/generate"), status=404)
    assert err["error"]


def test_server_keeps_serving_after_errors(client, base):
    for body in ({"text": "q", "top_k": -1}, {"text": "q", "image": "data:,"}, {}):
        assert_error(client.post(f"{base}/generate", json=body))
    assert_success(generate(client, base, {"text": "still there?", "max_new_tokens": 2}), 2)


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_include_the_service_families(client, base):
    generate(client, base, {"text": "q", "max_new_tokens": 1})
    text = client.get("/metrics").text
    assert "medgemma_generation_tokens_total" in text
    assert "medgemma_prompt_tokens_total" in text


# ------------------------------------------------------------------------------------------------ direct calls


def test_core_directly(svc, client):
    core = svc.core()
    assert core.health()["model_state"] == "ready"
    assert core.schema()["model_class"] == "Gemma3ForConditionalGeneration"
    assert core.models()["data"][0]["id"] == svc.APP
    body = asyncio.run(core.generate({"text": "q", "max_new_tokens": 2}))
    assert_success(body, 2)


def _ctx() -> SimpleNamespace:
    async def disconnected() -> bool:
        return False

    return SimpleNamespace(
        response=SimpleNamespace(status_code=200, headers={}),
        request=SimpleNamespace(scope={"state": {"request_id": "direct-1"}}, is_disconnected=disconnected),
    )


def test_service_class_methods_directly(svc, client):
    import json

    obj = object.__new__(svc.MedGemma.inner)
    obj.core = svc.core()

    ctx = _ctx()
    r = obj.health(ctx)
    assert (r.status_code, ctx.response.status_code) == (200, 200)
    assert json.loads(r.body)["model_state"] == "ready"

    r = obj.schema(_ctx())
    assert json.loads(r.body)["processor_class"] == "Gemma3Processor"

    ctx = _ctx()
    r = asyncio.run(obj.generate(ctx, text="q", max_new_tokens=2))
    body = json.loads(r.body)
    assert_success(body, 2)
    assert body["request_id"] == "direct-1"

    ctx = _ctx()
    r = asyncio.run(obj.generate(ctx, text="q", top_p=2.0))
    assert r.status_code == ctx.response.status_code == 400
    assert json.loads(r.body)["param"] == "top_p"

    ctx = _ctx()
    r = asyncio.run(obj.generate(ctx, text="q", image=Image.open(io.BytesIO(PNG)), max_new_tokens=2))
    assert r.status_code == 200, r.body
