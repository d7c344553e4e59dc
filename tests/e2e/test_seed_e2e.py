"""The seed API against real `bentoml serve` processes, driven by httpx and `bentoml.SyncHTTPClient`.

Three servers, each shared by the tests that need it (every start costs seconds):

* ``vlm``: the tiny image+text demo with ``MEDGEMMA_LOAD_ON_STARTUP=false`` and ``MEDGEMMA_CONFIG`` pointing at a
  temporary configuration.yaml that sets ``traffic.timeout``. The fixture records the scale-from-zero sequence
  (health while unloaded, the first generate's 202, schema while loading) before it waits for the model, so the
  202 tests do not depend on test order; every other vlm test then uses the loaded server.
* ``text``: the tiny text-only demo.
* ``failed``: a model directory that does not exist, started WITHOUT ``-p``: its port comes from the temporary
  configuration.yaml that ``MEDGEMMA_CONFIG`` names (``services.MedGemma.http.port``), with no ``BENTOML_CONFIG``.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import bentoml_serve, free_port, wait_for_model
from tests.helpers import DEMO_MARK, METRIC_KEYS, SIX_PARAMETERS, assert_error, png_bytes, png_data_uri

pytestmark = pytest.mark.e2e

TIMEOUT = 60
# traffic.timeout of the vlm server, from its configuration.yaml: far above any test request (< 2 s on a busy CPU),
# far below a 30,000-token generation (half a minute or more on CPU).
VLM_TIMEOUT_S = 6


PNG = png_bytes((90, 160, 30), (40, 32))
PNG_URI = png_data_uri(PNG)


def post(url: str, body: Any = None, **kw: Any) -> httpx.Response:
    if body is not None:
        kw["json"] = body
    return httpx.post(url, timeout=TIMEOUT, **kw)


def get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=TIMEOUT)


def assert_success(r: httpx.Response, max_new_tokens: int, app: str) -> dict:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success"
    assert body["model"].startswith(app)
    assert DEMO_MARK in body["model"]
    assert isinstance(body["response"], str)
    assert list(body["parameters"]) == list(SIX_PARAMETERS)
    assert body["parameters"]["max_new_tokens"] == max_new_tokens
    metrics = body["compute_metrics"]
    assert set(METRIC_KEYS) <= set(metrics), sorted(metrics)
    assert metrics["query_duration_seconds"] > 0
    assert metrics["input_tokens"] > 0
    assert 1 <= metrics["output_tokens"] <= max_new_tokens
    return body


# ------------------------------------------------------------------------------------------------ servers


@pytest.fixture(scope="module")
def vlm(tiny_vlm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("seed-vlm")
    config = tmp / "configuration.yaml"
    config.write_text(f"services:\n  MedGemma:\n    traffic:\n      timeout: {VLM_TIMEOUT_S}\n    workers: 1\n")
    env = {
        "MEDGEMMA_MODEL": str(tiny_vlm),
        "MEDGEMMA_DEMO_DIR": str(tiny_vlm.parent),
        "MEDGEMMA_LOAD_ON_STARTUP": "false",
        "MEDGEMMA_LOADING_RETRY_AFTER_S": "3",
        "MEDGEMMA_CONFIG": str(config),
        # room for a generation far longer than the traffic timeout however fast the machine (see below)
        "MEDGEMMA_MAX_NEW_TOKENS_CAP": "30000",
    }
    with bentoml_serve(env, tmp) as srv:
        app = tiny_vlm.name
        base = f"{srv.url}/{app}/v1"
        seen: dict[str, Any] = {"health_before": get(f"{base}/health")}
        started = time.monotonic()
        seen["first_generate"] = post(f"{base}/generate", {"text": "hi", "max_new_tokens": 2})
        seen["first_generate_s"] = time.monotonic() - started
        seen["schema_get_while_loading"] = get(f"{base}/schema")
        seen["schema_post_while_loading"] = post(f"{base}/schema")
        seen["health_while_loading"] = get(f"{base}/health")
        polls = []
        deadline = time.monotonic() + 120
        while True:
            r = post(f"{base}/generate", {"text": "hi", "max_new_tokens": 2})
            polls.append(r)
            if r.status_code != 202 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        seen["polls"] = polls
        wait_for_model(srv.url, app)
        yield SimpleNamespace(url=srv.url, app=app, base=base, seen=seen, server=srv)


@pytest.fixture(scope="module")
def text(tiny_text: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    env = {"MEDGEMMA_MODEL": str(tiny_text), "MEDGEMMA_DEMO_DIR": str(tiny_text.parent)}
    with bentoml_serve(env, tmp_path_factory.mktemp("seed-text")) as srv:
        app = tiny_text.name
        assert wait_for_model(srv.url, app)["model_state"] == "ready"
        yield SimpleNamespace(url=srv.url, app=app, base=f"{srv.url}/{app}/v1", server=srv)


@pytest.fixture(scope="module")
def failed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("seed-failed")
    port = free_port()
    config = tmp / "configuration.yaml"
    config.write_text(f"services:\n  MedGemma:\n    http:\n      port: {port}\n    workers: 1\n")
    env = {"MEDGEMMA_MODEL": "/nonexistent/x", "MEDGEMMA_LOAD_RETRY_BACKOFF_S": "600", "MEDGEMMA_CONFIG": str(config)}
    with bentoml_serve(env, tmp, port=port, pass_port=False) as srv:
        health = wait_for_model(srv.url, "x")
        yield SimpleNamespace(url=srv.url, app="x", base=f"{srv.url}/x/v1", server=srv, health=health, port=port)


# ------------------------------------------------------------------------------------------------ scale from zero


def test_health_before_the_first_request_says_unloaded(vlm):
    r = vlm.seen["health_before"]
    assert r.status_code == 200
    assert r.json()["model_state"] == "unloaded"


def test_first_generate_answers_202_and_starts_the_load(vlm):
    r = vlm.seen["first_generate"]
    assert r.status_code == 202, r.text
    assert r.headers["retry-after"] == "3"
    body = r.json()
    assert body["status"] == "loading"
    assert body["error"] == "Model not loaded yet"
    assert isinstance(body["message"], str)
    assert body["message"]
    assert body["retry_after_seconds"] == 3
    assert vlm.seen["first_generate_s"] < 10  # answered at once, not after the load
    health = vlm.seen["health_while_loading"]
    assert health.status_code == 200
    assert health.json()["model_state"] in ("loading", "ready")


@pytest.mark.parametrize("key", ["schema_get_while_loading", "schema_post_while_loading"])
def test_schema_while_loading_is_202_with_the_seed_fields(vlm, key):
    r = vlm.seen[key]
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["error"] == "Model not loaded yet"
    assert body["status"] == "loading"
    assert "retry-after" in r.headers


def test_polling_reaches_200(vlm):
    polls = vlm.seen["polls"]
    assert all(r.status_code == 202 for r in polls[:-1])
    for r in polls[:-1]:
        assert r.json()["status"] == "loading"
        assert "retry-after" in r.headers
    assert_success(polls[-1], 2, vlm.app)


# ------------------------------------------------------------------------------------------------ seed examples

SEED_EXAMPLES = {
    "simple-text": {
        "text": "How do you differentiate bacterial from viral pneumonia?",
        "system": "You are a helpful medical assistant.",
        "max_new_tokens": 200,
    },
    "simple-image": {
        "text": "Describe this X-ray",
        "image": PNG_URI,
        "system": "You are an expert radiologist.",
        "max_new_tokens": 300,
    },
    "chat": {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "You are a helpful medical assistant."}]},
            {"role": "user", "content": [{"type": "text", "text": "What are the symptoms of diabetes?"}]},
        ],
        "max_new_tokens": 200,
    },
    "chat-image": {
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
        "max_new_tokens": 300,
    },
    "qa-use-case": {
        "text": "What are the treatment options for type 2 diabetes?",
        "system": "You are a helpful medical assistant.",
        "max_new_tokens": 300,
    },
    "pathology-use-case": {
        "text": "What do you observe in this histopathology slide?",
        "image": PNG_URI,
        "system": "You are a pathologist.",
        "max_new_tokens": 300,
    },
}
# The seed's token budgets (200-300) cost 10+ seconds each on a busy CPU; the examples run with a small budget (the
# request format is what they test); the default of 200 is checked via /schema and the unit tests.
FAST_TOKENS = 8


@pytest.mark.parametrize("name", list(SEED_EXAMPLES))
def test_seed_examples(vlm, name):
    body = {**SEED_EXAMPLES[name], "max_new_tokens": FAST_TOKENS}
    r = post(f"{vlm.base}/generate", body)
    result = assert_success(r, FAST_TOKENS, vlm.app)
    if name == "simple-text":
        assert result["parameters"] == {
            "max_new_tokens": FAST_TOKENS,
            "do_sample": False,
            "temperature": None,
            "top_p": None,
            "top_k": None,
            "repetition_penalty": None,
        }
    metrics = result["compute_metrics"]
    for key in ("replica_cpu_percent", "replica_memory_mb"):
        assert isinstance(metrics[key], int | float)
    if "image" in name or "pathology" in name:
        assert len(result["images"]) == 1


def test_seed_simple_format_with_every_optional_parameter(vlm):
    body = {"text": "Your question here", "system": "You are a helpful medical assistant.", "image": PNG_URI,
            "max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1}  # fmt: skip
    result = assert_success(post(f"{vlm.base}/generate", body), 5, vlm.app)
    assert result["parameters"] == {"max_new_tokens": 5, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                    "top_k": 50, "repetition_penalty": 1.1}  # fmt: skip


def test_image_changes_the_prompt(vlm):
    plain = assert_success(post(f"{vlm.base}/generate", {"text": "Describe", "max_new_tokens": 1}), 1, vlm.app)
    with_image = assert_success(
        post(f"{vlm.base}/generate", {"text": "Describe", "image": PNG_URI, "max_new_tokens": 1}), 1, vlm.app
    )
    assert with_image["compute_metrics"]["input_tokens"] > plain["compute_metrics"]["input_tokens"]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_schema(vlm, method):
    r = httpx.request(method, f"{vlm.base}/schema", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    schema = r.json()
    assert schema["model_class"] == "Gemma3ForConditionalGeneration"
    assert schema["processor_class"] == "Gemma3Processor"
    assert schema["capabilities"] == ["text-to-text", "image-text-to-text"]
    assert DEMO_MARK in schema["model_id"]
    assert set(SIX_PARAMETERS) <= set(schema["inputs"]["optional"])
    assert schema["defaults"] == {"max_new_tokens": 200, "do_sample": False}


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_health(vlm, method):
    r = httpx.request(method, f"{vlm.base}/health", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    health = r.json()
    assert health["status"] == "healthy"
    assert health["model_state"] == "ready"
    assert DEMO_MARK in health["model"]


def test_models(vlm):
    r = get(f"{vlm.base}/models")
    assert r.status_code == 200, r.text
    [entry] = r.json()["data"]
    assert entry["id"] == vlm.app
    assert entry["capabilities"] == ["text-to-text", "image-text-to-text"]


# ------------------------------------------------------------------------------------------------ bad input

BAD_JSON = {
    "max_new_tokens-string": {"text": "q", "max_new_tokens": "lots"},
    "max_new_tokens-zero": {"text": "q", "max_new_tokens": 0},
    "max_new_tokens-over-cap": {"text": "q", "max_new_tokens": 30001},  # the cap of this module's server: 30000
    "max_new_tokens-fraction": {"text": "q", "max_new_tokens": 2.5},
    "max_new_tokens-true": {"text": "q", "max_new_tokens": True},
    "temperature-negative": {"text": "q", "temperature": -0.5},
    "temperature-over-2": {"text": "q", "temperature": 2.5},
    "temperature-list": {"text": "q", "temperature": [0.7]},
    "top_p-zero": {"text": "q", "top_p": 0},
    "top_p-over-1": {"text": "q", "top_p": 1.01},
    "top_k-zero": {"text": "q", "top_k": 0},
    "repetition_penalty-zero": {"text": "q", "repetition_penalty": 0},
    "do_sample-object": {"text": "q", "do_sample": {"yes": True}},
    "text-number": {"text": 12},
    "unknown-field": {"text": "q", "max_tokens": 5, "max_new_tokens": 1},
    "unknown-field-in-message": {"messages": [{"role": "user", "content": "q", "name": "x"}]},
    "empty-messages": {"messages": []},
    "unknown-role": {"messages": [{"role": "doctor", "content": "q"}]},
    "non-alternating-roles": {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    "last-turn-assistant": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    "both-formats": {"text": "q", "messages": [{"role": "user", "content": "a"}]},
    "no-text-no-messages": {"system": "s"},
    "undecodable-image": {"text": "q", "image": "data:image/png;base64," + base64.b64encode(b"not a png").decode()},
    "invalid-base64-image": {"text": "q", "image": "data:image/png;base64,###"},
    "url-image": {"text": "q", "image": "https://example.org/xray.png"},
    "number-image": {"text": "q", "image": 7},
    "undecodable-chat-image": {
        "messages": [{"role": "user", "content": [{"type": "image", "image": "data:image/png;base64,AAAA"}]}]
    },
}
# The field each error must name (where the mistake is one field).
NAMED = {
    "max_new_tokens-string": "max_new_tokens",
    "max_new_tokens-zero": "max_new_tokens",
    "max_new_tokens-over-cap": "max_new_tokens",
    "max_new_tokens-fraction": "max_new_tokens",
    "max_new_tokens-true": "max_new_tokens",
    "temperature-negative": "temperature",
    "temperature-over-2": "temperature",
    "temperature-list": "temperature",
    "top_p-zero": "top_p",
    "top_p-over-1": "top_p",
    "top_k-zero": "top_k",
    "repetition_penalty-zero": "repetition_penalty",
    "do_sample-object": "do_sample",
    "text-number": "text",
    "unknown-field": "max_tokens",
    "unknown-field-in-message": "name",
    "unknown-role": "role",
    "undecodable-image": "image",
    "invalid-base64-image": "image",
    "url-image": "image",
    "number-image": "image",
}


@pytest.mark.parametrize("name", list(BAD_JSON))
def test_bad_json_input_is_a_400_object(vlm, name):
    body = assert_error(post(f"{vlm.base}/generate", BAD_JSON[name]))
    if name in NAMED:
        assert NAMED[name] in body["error"], body


@pytest.mark.parametrize(
    ("content", "ctype"),
    [
        (b"this is not json", "application/json"),
        (b"{", "application/json"),
        (b'[{"text": "q"}]', "application/json"),
        (b'"just a string"', "application/json"),
        (b"42", "application/json"),
    ],
    ids=["not-json", "truncated", "list", "string", "number"],
)
def test_non_object_bodies_are_a_400_object(vlm, content, ctype):
    assert_error(post(f"{vlm.base}/generate", content=content, headers={"content-type": ctype}))


def test_undecodable_uploaded_file_is_a_400(vlm):
    r = post(f"{vlm.base}/generate", files={"image": ("x.png", b"\x89PNG broken", "image/png")},
             data={"text": '"q"'})  # fmt: skip
    assert assert_error(r)["param"] == "image"


def test_server_keeps_serving_after_a_batch_of_bad_inputs(vlm):
    # each case's own status is checked above; here: no 5xx, never a list or a traceback, then a good request
    answers = [post(f"{vlm.base}/generate", body) for body in BAD_JSON.values()]
    answers.append(post(f"{vlm.base}/generate", content=b"]]", headers={"content-type": "application/json"}))
    for r in answers:
        assert r.status_code < 500, r.text
        assert isinstance(r.json(), dict), r.text
        assert "Traceback" not in r.text
    assert_success(post(f"{vlm.base}/generate", {"text": "still there?", "max_new_tokens": 3}), 3, vlm.app)
    assert get(f"{vlm.url}/readyz").status_code == 200
    assert vlm.server.proc.poll() is None


def test_logs_hold_no_prompt_text(vlm):
    secret = "ZZPATIENTSECRET"
    post(f"{vlm.base}/generate", {"text": f"{secret} has a cough", "max_new_tokens": 1})
    post(f"{vlm.base}/generate", {"text": f"{secret} again", "max_new_tokens": -1})
    time.sleep(0.2)
    assert secret not in vlm.server.log()


@pytest.mark.parametrize(
    "content",
    [b'[{"text": "ZZLISTSECRET has a cough"}]', b'{"text": "ZZJSONSECRET has a cough",'],
    ids=["list-body", "broken-json"],
)
def test_logs_hold_no_prompt_text_of_malformed_bodies(vlm, content):
    # prompts are patient data: a malformed body must not be written to the log either
    secret = re.search(rb"ZZ[A-Z]+SECRET", content).group().decode()
    assert_error(post(f"{vlm.base}/generate", content=content, headers={"content-type": "application/json"}))
    time.sleep(0.2)
    assert secret not in vlm.server.log()


# ------------------------------------------------------------------------------------------------ bentoml client


def test_sync_http_client(vlm, tmp_path):
    import bentoml

    from medgemma.client import uploadable

    path = tmp_path / "xray.png"
    path.write_bytes(PNG)
    with bentoml.SyncHTTPClient(vlm.url, timeout=TIMEOUT, server_ready_timeout=30) as client:
        body = client.generate(text="What is pneumonia?", max_new_tokens=4)
        assert isinstance(body, dict)
        assert body["status"] == "success"
        assert DEMO_MARK in body["model"]
        assert body["parameters"]["max_new_tokens"] == 4

        with Image.open(path) as image:
            body = client.generate(text="Describe this X-ray", image=image, max_new_tokens=4)
        assert body["status"] == "success"
        assert body["images"][0]["size"] == [40, 32]

        made_in_memory = uploadable(Image.new("RGB", (24, 18), (9, 99, 199)))
        body = client.generate(text="Describe this", image=made_in_memory, max_new_tokens=2)
        assert body["images"][0]["size"] == [24, 18]

        schema = client.schema()
        assert schema["model_class"] == "Gemma3ForConditionalGeneration"
        assert schema["capabilities"] == ["text-to-text", "image-text-to-text"]

        health = client.health()
        assert health["status"] == "healthy"
        assert health["model_state"] == "ready"


# ------------------------------------------------------------------------------------------------ text-only model


def test_text_only_model_generates(text):
    r = post(f"{text.base}/generate", {"text": "What is sepsis?", "system": "Be brief.", "max_new_tokens": 6})
    assert_success(r, 6, text.app)
    r = post(f"{text.base}/generate", {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                       "max_new_tokens": 4})  # fmt: skip
    assert_success(r, 4, text.app)


@pytest.mark.parametrize(
    "body",
    [
        {"text": "Describe this X-ray", "image": PNG_URI},
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "image", "image": PNG_URI}]}
            ]
        },
    ],
    ids=["simple", "chat"],
)
def test_text_only_model_refuses_images(text, body):
    err = assert_error(post(f"{text.base}/generate", body))
    assert "text-only" in err["error"]
    assert_success(post(f"{text.base}/generate", {"text": "ok?", "max_new_tokens": 1}), 1, text.app)


def test_text_only_schema(text):
    schema = get(f"{text.base}/schema").json()
    assert schema["model_class"] == "Gemma3ForCausalLM"
    assert re.fullmatch(r"\w*Tokenizer\w*", schema["processor_class"]), schema["processor_class"]
    assert schema["capabilities"] == ["text-to-text"]
    assert "image" not in schema["inputs"]["optional"]
    assert DEMO_MARK in schema["model_id"]
    assert get(f"{text.base}/models").json()["data"][0]["capabilities"] == ["text-to-text"]


# ------------------------------------------------------------------------------------------------ failed load


def test_failed_load_health_answers(failed):
    assert failed.health["model_state"] == "failed"
    r = get(f"{failed.base}/health")
    assert r.status_code == 200
    health = r.json()
    assert health["model_state"] == "failed"
    # Open to anyone (no token is set): a short summary without the path; the full error is on the model routes.
    assert health["loading_error"] == "FileNotFoundError: model directory <path> does not exist"
    assert "/nonexistent" not in r.text
    assert "details" not in health


@pytest.mark.parametrize(("method", "route"), [("POST", "generate"), ("GET", "schema"), ("POST", "schema")])
def test_failed_load_is_a_503_with_the_loading_error(failed, method, route):
    kw: dict[str, Any] = {"json": {"text": "q"}} if route == "generate" else {}
    r = httpx.request(method, f"{failed.base}/{route}", timeout=TIMEOUT, **kw)
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["status"] == "failed"
    assert body["error"].startswith("Model loading failed: ")
    assert isinstance(body["loading_error"], str)
    assert "/nonexistent/x" in body["loading_error"]
    assert "does not exist" in body["loading_error"]
    assert "Traceback" not in r.text


def test_failed_load_server_stays_up(failed):
    for _ in range(3):
        assert post(f"{failed.base}/generate", {"text": "q"}).status_code == 503
        assert assert_error(post(f"{failed.base}/generate", {"text": "q", "top_k": 0}), 400)["param"] == "top_k"
    assert get(f"{failed.url}/readyz").status_code == 200
    assert get(f"{failed.base}/health").json()["model_state"] == "failed"
    models = get(f"{failed.base}/models")
    assert models.status_code == 200
    assert models.json()["data"][0]["state"] == "failed"
    assert failed.server.proc.poll() is None


# ------------------------------------------------------------------------------------------------ configuration.yaml


def test_configuration_port_is_applied_without_p(failed):
    # `failed` was started without -p: it answers on the port its configuration.yaml names
    assert failed.url.endswith(f":{failed.port}")
    assert get(f"{failed.url}/readyz").status_code == 200
    log = failed.server.log()
    listening = re.findall(r"listening on https?://[^:\s]+:(\d+)", log)
    assert listening
    assert {int(p) for p in listening} == {failed.port}, listening


def test_configuration_traffic_timeout_is_applied(vlm):
    # traffic.timeout from MEDGEMMA_CONFIG's file: a generation that takes far longer (greedy decoding of this prompt
    # never reaches EOS on the demo model; 30,000 tokens take half a minute or more on CPU, where 4,096 could finish
    # within the timeout on a fast machine) is cut off with BentoML's 504.
    started = time.monotonic()
    r = post(f"{vlm.base}/generate", {"text": "hi", "max_new_tokens": 30000})
    elapsed = time.monotonic() - started
    assert r.status_code == 504, r.text[:500]
    assert VLM_TIMEOUT_S - 0.5 <= elapsed < VLM_TIMEOUT_S + 20
    body = r.json()
    assert isinstance(body, dict), body
    # BentoML's own timeout answer (its TimeoutMiddleware sits outside the service's middleware)
    assert f"in {VLM_TIMEOUT_S} seconds" in body["error"], body
    # the cut-off request leaves the batch, and the server keeps serving
    deadline = time.monotonic() + 30
    while get(f"{vlm.base}/health").json()["engine"]["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert get(f"{vlm.base}/health").json()["engine"]["running"] == 0
    assert_success(post(f"{vlm.base}/generate", {"text": "hi", "max_new_tokens": 2}), 2, vlm.app)
