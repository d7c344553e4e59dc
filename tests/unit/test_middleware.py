"""Edge pieces that need no server: error bodies, route labels, the log redaction filter."""

from __future__ import annotations

import logging
import sys

import pytest
from bentoml._internal.log import TraceRecordFilter
from pydantic import BaseModel

from medgemma.errors import BadRequest, ModelFailed, ModelLoading, Overloaded, error_body
from medgemma.middleware import RedactRequestData, route_label


def test_error_body_shapes():
    exc = BadRequest("temperature: too hot", param="temperature")
    assert error_body(exc, openai=False) == {"status": "error", "error": "temperature: too hot", "param": "temperature"}
    oai = error_body(exc, openai=True)
    assert oai == {
        "error": {
            "message": "temperature: too hot",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": "error",
        }
    }
    loading = error_body(ModelLoading("wait", retry_after=7), openai=True)
    assert loading["error"]["type"] == "model_loading" and loading["status"] == "loading"
    assert loading["retry_after_seconds"] == 7
    failed = ModelFailed("OSError: no weights", retry_after=30)
    assert failed.body()["loading_error"] == "OSError: no weights"
    assert failed.body()["error"] == "Model loading failed: OSError: no weights"
    assert Overloaded("full", retry_after=2).headers == {"Retry-After": "2"}


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/medgemma-27b-it/v1/generate", "/{app}/v1/generate"),
        ("/any-app/v1/chat/completions", "/{app}/v1/chat/completions"),
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/any-app/playground/playground.js", "/{app}/playground"),
        ("/metrics", "/metrics"),
        ("/wp-admin/../etc/passwd", "other"),
    ],
)
def test_route_labels_are_low_cardinality(path, label):
    assert route_label(path) == label


def _record_for(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        return logging.LogRecord(
            "bentoml", logging.ERROR, __file__, 1, "Exception on %s [%s]", ("/g", "POST"), sys.exc_info()
        )


def test_redaction_drops_values_and_downgrades_client_errors():
    class Model(BaseModel):
        text: int

    try:
        Model.model_validate({"text": "PATIENT-SECRET"})
    except Exception as exc:
        record = _record_for(exc)
    TraceRecordFilter().filter(record)  # BentoML's own filter runs first on its handlers: "[ERROR]" is set
    assert RedactRequestData().filter(record)
    rendered = logging.Formatter("%(levelname_bracketed)s %(message)s").format(record)
    assert "PATIENT-SECRET" not in rendered
    assert "request validation failed at: text" in rendered
    assert record.levelname == "WARNING" and rendered.startswith("[WARNING] ")


def test_redaction_leaves_real_server_errors_alone():
    record = _record_for(RuntimeError("engine broke"))
    assert RedactRequestData().filter(record)
    assert record.levelname == "ERROR"
    assert record.exc_info is not None


@pytest.mark.parametrize(
    ("path", "open_"),
    [
        ("/livez", True),
        ("/metrics", True),
        ("/docs.json", True),
        ("/myapp/v1/health", True),
        ("/myapp/playground/", True),
        ("/myapp/v1/generate", False),
        ("/docs-bot/v1/generate", False),  # an app name must not open its own routes
        ("/playground-x/v1/generate", False),
        ("/x/v1/health/../generate", False),
        ("/v1/chat/completions", False),
    ],
)
def test_only_probes_docs_health_and_the_page_are_open(path, open_):
    from medgemma.middleware import EdgeMiddleware

    edge = EdgeMiddleware(None, api_token="t", open_prefixes=("/myapp/playground", "/static_content/"))
    assert edge._is_open(path) is open_


def test_deeply_nested_json_is_a_400_not_a_crash():
    import asyncio

    from medgemma.middleware import _read_json_object

    body = b"[" * 200_000 + b"]" * 200_000

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    _, problem = asyncio.run(_read_json_object(receive, {"state": {}}))
    assert problem is not None and problem.status_code == 400


def _call_edge(edge_kwargs: dict, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[dict, int]:
    """Run one GET through a real EdgeMiddleware in front of an app that records what the middleware told it."""
    import asyncio

    from medgemma.middleware import EdgeMiddleware, scope_authenticated

    seen: dict = {}

    async def app(scope, receive, send):
        seen["authenticated"] = scope_authenticated(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": headers}
    asyncio.run(EdgeMiddleware(app, **edge_kwargs)(scope, receive, send))
    return seen, sent[0]["status"]


@pytest.mark.parametrize(
    ("token", "header", "authenticated"),
    [
        ("", None, False),  # no token configured: nobody is authenticated, whatever they send
        ("", b"Bearer anything", False),
        ("t0k", None, False),
        ("t0k", b"Bearer wrong", False),
        ("t0k", b"Basic t0k", False),
        ("t0k", b"Bearer t0k", True),
        ("t0k", b"bearer t0k ", True),
    ],
)
def test_open_health_learns_whether_the_caller_authenticated(token, header, authenticated):
    headers = [(b"authorization", header)] if header else []
    seen, status = _call_edge({"api_token": token}, "/app/v1/health", headers)
    assert status == 200  # health stays open either way
    assert seen == {"authenticated": authenticated}


def test_model_routes_still_need_the_token():
    seen, status = _call_edge({"api_token": "t0k"}, "/app/v1/models", [(b"authorization", b"Bearer wrong")])
    assert status == 401 and seen == {}
    seen, status = _call_edge({"api_token": "t0k"}, "/app/v1/models", [(b"authorization", b"Bearer t0k")])
    assert status == 200 and seen == {"authenticated": True}


@pytest.mark.parametrize(
    ("exc", "summary"),
    [
        (
            FileNotFoundError("model directory /srv/models/ward-7/ckpt does not exist"),
            "FileNotFoundError: model directory <path> does not exist",
        ),
        (
            RuntimeError("could not load the weights from /m/x: OSError: no file '/m/x/model.safetensors'"),
            "RuntimeError: could not load the weights from <path>: OSError: no file '<path>'",
        ),
        (ValueError("see ~/ckpt, ./rel/dir and C:\\models\\m"), "ValueError: see <path>, <path> and <path>"),
        # hub ids and URLs are not paths
        (OSError("google/medgemma-4b-it is gated: https://hf.co/google"), None),
        (KeyError(), "KeyError"),
        (RuntimeError('first line\n  File "/usr/lib/x.py", line 3'), "RuntimeError: first line"),
    ],
)
def test_public_error_is_short_and_has_no_paths(exc, summary):
    from medgemma.errors import public_error

    text = public_error(exc)
    assert text == (summary or f"OSError: {exc}")


def test_public_error_is_capped():
    from medgemma.errors import PUBLIC_ERROR_CHARS, public_error

    text = public_error(RuntimeError("x" * 5000))
    assert len(text) == PUBLIC_ERROR_CHARS and text.endswith("…")
