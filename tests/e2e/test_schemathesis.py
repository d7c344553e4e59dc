"""Schemathesis against a real server's OpenAPI documents: whatever the generated request, never a 5xx.

Three documents, each fuzzed with a bounded, deterministic number of examples per operation:

* **BentoML's** ``/docs.json`` as served: the typed APIs (``generate`` as a multipart form, since it takes
  images) plus the routes of the mounted apps (schema, health, models, chat completions) and ``/livez``,
  ``/readyz``, ``/healthz``, ``/metrics``.
* **The OpenAI app's** ``/v1/openapi.json`` as served, with the request body it cannot declare itself (the handler
  reads the raw body to shape its own errors) filled in from ``ChatCompletionRequest``'s JSON schema, so that the
  generated bodies look like chat completion requests rather than empty posts.
* **The seed API as JSON**: BentoML declares ``generate`` only as multipart, so the JSON form of the same route is
  described from ``GenerateRequest``'s JSON schema.

Per operation: schemathesis' deterministic coverage cases (at most ``MAX_COVERAGE_CASES``), then ``MAX_EXAMPLES``
hypothesis-generated positive and as many negative cases (derandomized: the same requests on every run).
Checks on every response: ``not_a_server_error`` (no 5xx) and ``json_body_is_object`` (a JSON body is one object,
never a list, and holds no traceback). The server generates at most 8 tokens per request, so examples are cheap.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup

from tests.conftest import Server, bentoml_serve, wait_for_model

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 30  # per operation and generation mode (positive, negative)
MAX_COVERAGE_CASES = 150  # per operation; the seed generate form has about 110
REQUEST_TIMEOUT = 20  # seconds; a generated request answers in well under one
ENV = {
    "MEDGEMMA_MAX_NEW_TOKENS_CAP": "8",
    "MEDGEMMA_DEFAULT_MAX_NEW_TOKENS": "4",
    "MEDGEMMA_MAX_BODY_BYTES": "2000000",
    "MEDGEMMA_MAX_IMAGE_BYTES": "1000000",
    "MEDGEMMA_MAX_IMAGE_PIXELS": "4000000",
    "MEDGEMMA_MAX_IMAGES": "4",
    "MEDGEMMA_MAX_TEXT_CHARS": "5000",
}
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


@schemathesis.check
def json_body_is_object(ctx: Any, response: Any, case: Any) -> bool | None:
    """A JSON answer is one object (never a list, a string or a number) and never carries a traceback."""
    ctype = ";".join(response.headers.get("content-type", [])).lower()
    if "json" not in ctype:
        return None
    text = response.text or ""
    try:
        body = json.loads(text)
    except ValueError:
        raise AssertionError(f"{response.status_code}: declared JSON but not parseable: {text[:300]!r}") from None
    if not isinstance(body, dict):
        raise AssertionError(
            f"{response.status_code}: JSON body is a {type(body).__name__}, not an object: {text[:300]}"
        )
    if "Traceback" in text or 'File "' in text:
        raise AssertionError(f"{response.status_code}: the body holds a traceback: {text[:300]}")
    return None


CHECKS = [not_a_server_error, json_body_is_object]
# BentoML's liveness/readiness/metrics routes take no input: nothing to fuzz.
SKIPPED_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})


# --- the server and its documents ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_vlm, tmp_path_factory) -> Iterator[Server]:
    with bentoml_serve({"MEDGEMMA_MODEL": str(tiny_vlm), **ENV}, tmp_path_factory.mktemp("schemathesis")) as srv:
        assert wait_for_model(srv.url, tiny_vlm.name)["model_state"] == "ready"
        yield srv


def _get_json(url: str) -> dict[str, Any]:
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200, f"{url}: {r.status_code} {r.text[:300]}"
    return r.json()


def _json_body(model: Any) -> dict[str, Any]:
    """A pydantic model as an OpenAPI 3.1 request body, its $defs moved into components."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {"required": True, "content": {"application/json": {"schema": schema}}}, defs


@pytest.fixture(scope="module")
def bentoml_doc(server: Server) -> Any:
    return schemathesis.openapi.from_url(f"{server.url}/docs.json")


@pytest.fixture(scope="module")
def openai_doc(server: Server) -> Any:
    from medgemma.openai_api import ChatCompletionRequest

    doc = copy.deepcopy(_get_json(f"{server.url}/v1/openapi.json"))
    body, defs = _json_body(ChatCompletionRequest)
    doc["paths"]["/chat/completions"]["post"]["requestBody"] = body
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs)
    doc["servers"] = [{"url": "/v1"}]
    return schemathesis.openapi.from_dict(doc)


@pytest.fixture(scope="module")
def seed_json_doc(server: Server, tiny_vlm) -> Any:
    from medgemma.schemas import GenerateRequest

    body, defs = _json_body(GenerateRequest)
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "MedGemma seed API (JSON)", "version": "1"},
        "servers": [{"url": f"/{tiny_vlm.name}/v1"}],
        "paths": {
            "/generate": {
                "post": {
                    "operationId": "generate_json",
                    "requestBody": body,
                    "responses": {"200": {"description": "generated"}},
                }
            }
        },
        "components": {"schemas": defs},
    }
    return schemathesis.openapi.from_dict(doc)


DOCUMENTS = {"bentoml": "bentoml_doc", "openai": "openai_doc", "seed-json": "seed_json_doc"}


class Recorder:
    """Calls generated cases and records distinct failures; after a hang, skips the rest of the operation."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.ran = 0
        self.hung: set[str] = set()
        self.failures: dict[str, str] = {}  # one entry per distinct failure, with a curl command to reproduce it

    def __call__(self, case: Any, label: str) -> None:
        if label in self.hung:  # one hang per operation is enough to report; do not wait out every example
            return
        self.ran += 1
        try:
            case.call_and_validate(base_url=self.base_url, checks=CHECKS, timeout=REQUEST_TIMEOUT)
        except (AssertionError, FailureGroup) as exc:  # record and keep going
            inner = exc.exceptions if isinstance(exc, FailureGroup) else (exc,)
            kinds = "; ".join(f"{type(f).__name__} {getattr(f, 'status_code', '')}".strip() for f in inner)
            key = f"{label}: {kinds}"
            self.failures.setdefault(key, f"{key}\n{exc}\n  reproduce: {case.as_curl_command()}")
        except requests.Timeout:
            self.hung.add(label)
            key = f"{label}: no answer within {REQUEST_TIMEOUT} s (hang)"
            self.failures.setdefault(key, f"{key}\n  reproduce: {case.as_curl_command()}")


def fuzz(operation: Any, mode: GenerationMode, record: Recorder) -> int:
    """Hypothesis-generated cases of one operation in one mode (at most ``MAX_EXAMPLES``); returns how many ran."""
    before = record.ran
    label = f"{operation.label} [{mode.value}]"

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        record(case, label)

    try:
        run()
    except Unsatisfiable:  # e.g. no negative data exists for an operation without input
        pass
    except ValueError as exc:
        # schemathesis' own filter of negative multipart cases can choke on the binary (file) fields it generated
        # itself, before any request is sent; seen once in a full-suite run of the generate form. Only that
        # generator error is tolerated: what ran until then was checked, and the count shows how much ran.
        if "Unsupported type: 'Binary'" not in str(exc):
            raise
    return record.ran - before


def coverage(schema: Any, operation: Any, record: Recorder) -> int:
    """Schemathesis' deterministic coverage cases (boundaries, missing/wrong types, other methods and media types)."""
    before = record.ran
    config = schema.config.generation_for(operation=operation)
    cases = schema.iter_coverage_cases(operation, generation_modes=list(GenerationMode), generation_config=config)
    for case in itertools.islice(cases, MAX_COVERAGE_CASES):
        record(case, f"{operation.label} [coverage]")
    return record.ran - before


@pytest.mark.parametrize("document", list(DOCUMENTS))
def test_no_server_errors(document: str, request: pytest.FixtureRequest, server: Server) -> None:
    schema = request.getfixturevalue(DOCUMENTS[document])
    record = Recorder(server.url)
    counts: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in SKIPPED_PATHS:
            continue
        counts[f"{operation.label} coverage"] = coverage(schema, operation, record)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            counts[f"{operation.label} {mode.value}"] = fuzz(operation, mode, record)
    print(f"\n{document}: {record.ran} requests: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    assert record.ran > 0
    failures = "\n\n".join(record.failures.values())
    assert not record.failures, f"{failures}\n\nserver log, errors:\n{error_excerpt(server.log())}"


def error_excerpt(log: str, blocks: int = 4) -> str:
    """The ERROR records (with their tracebacks) of the last few requests the server answered with a 5xx."""
    lines = log.splitlines()
    failed = [m.group(1) for m in re.finditer(r"status=5\d\d,.*?trace=([0-9a-f]+)", log)]
    out = []
    for trace in dict.fromkeys(reversed(failed)):
        for i, line in enumerate(lines):
            if "[ERROR]" in line and f"trace={trace}" in line:
                end = next((j for j in range(i + 1, len(lines)) if lines[j][:4].isdigit()), len(lines))
                out.append("\n".join(lines[i : min(end, i + 40)]))
        if len(out) >= blocks:
            break
    return "\n...\n".join(out) or "(no ERROR record for a 5xx)"
