"""BentoML transport helpers: the exact JSON body for strict validation, strict API specs, status codes, logging
setup and the SIGTERM drain. Real ``bentoml.Context`` objects around real starlette requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import bentoml
import pytest
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from medgemma import transport
from medgemma.config import Settings
from medgemma.core import MedGemmaCore
from medgemma.errors import BadRequest
from medgemma.middleware import RedactRequestData


@contextlib.contextmanager
def context(state: dict[str, Any] | None = None) -> Iterator[bentoml.Context]:
    scope = {"type": "http", "method": "POST", "path": "/x/v1/generate", "headers": [], "state": state or {}}
    ctx = bentoml.Context()
    with ctx.in_request(Request(scope)) as c:
        yield c


def test_json_bodies_are_validated_as_sent_not_as_bentoml_coerced_them():
    decoded = {"text": "q", "max_new_tokens": 200}  # what BentoML made of "200"
    with context({"json_body": b'{"text": "q", "max_new_tokens": "200"}'}) as ctx:
        assert asyncio.run(transport.seed_payload(ctx, decoded)) == {"text": "q", "max_new_tokens": "200"}
    with context({"json_body": b"   "}) as ctx:  # an empty body: validation then says what is missing
        assert asyncio.run(transport.seed_payload(ctx, decoded)) == {}
    with context({"json_body": b"[1]"}) as ctx, pytest.raises(BadRequest, match="JSON object"):
        asyncio.run(transport.seed_payload(ctx, decoded))


def test_forms_use_bentoml_decoding_without_the_default_stream_flag():
    with context() as ctx:  # no json_body: a multipart form
        payload = asyncio.run(transport.seed_payload(ctx, {"text": "q", "stream": False, "top_k": 3}))
    assert payload == {"text": "q", "top_k": 3}
    with context() as ctx:
        assert asyncio.run(transport.seed_payload(ctx, {"text": "q", "stream": True}))["stream"] is True


def test_strict_api_refuses_unknown_fields():
    class Svc:
        @transport.strict_api("/x/v1/echo")
        def echo(self, ctx: bentoml.Context, text: str, max_new_tokens: int | None = None) -> dict:
            return {}

    spec = Svc.echo.input_spec
    assert spec.model_validate({"text": "a", "max_new_tokens": 3}).max_new_tokens == 3
    with pytest.raises(ValidationError) as err:
        spec.model_validate({"text": "a", "max_tokens": 3})
    assert err.value.errors()[0]["type"] == "extra_forbidden"
    assert Svc.echo.route == "/x/v1/echo"
    assert "ctx" not in spec.model_fields


def test_respond_keeps_bentoml_status_equal_to_the_response():
    with context() as ctx:
        response = JSONResponse({"status": "error"}, status_code=413)
        assert transport.respond(ctx, response) is response
        assert ctx.response.status_code == 413


def test_request_id_and_authentication_come_from_the_edge():
    with context({"request_id": "abc", "authenticated": True}) as ctx:
        assert transport.request_id(ctx) == "abc" and transport.authenticated(ctx) is True
    with context() as ctx:
        assert transport.request_id(ctx) is None and transport.authenticated(ctx) is False


@pytest.fixture
def clean_logging() -> Iterator[logging.Handler]:
    """A BentoML handler to route through; every logger and handler touched is put back afterwards."""
    ours, theirs, root = logging.getLogger("medgemma"), logging.getLogger("bentoml"), logging.getLogger()
    saved = (list(ours.handlers), ours.propagate, ours.level, list(theirs.handlers))
    saved_filters = {h: list(h.filters) for h in root.handlers}
    handler = logging.StreamHandler()
    theirs.handlers = [handler]
    ours.handlers = []
    try:
        yield handler
    finally:
        ours.handlers, ours.propagate, ours.level, theirs.handlers = saved[0], saved[1], saved[2], saved[3]
        for h, filters in saved_filters.items():
            h.filters = filters


def test_setup_logging_routes_through_bentoml_and_redacts(clean_logging: logging.Handler):
    transport.setup_logging()
    transport.setup_logging()  # idempotent
    ours = logging.getLogger("medgemma")
    assert ours.handlers == [clean_logging] and ours.propagate is False and ours.level == logging.INFO
    assert sum(isinstance(f, RedactRequestData) for f in clean_logging.filters) == 1


def test_sigterm_drains_before_the_previous_handler_runs():
    core = MedGemmaCore(Settings(model="unused", load_on_startup=False, shutdown_grace_s=1.0))
    called = threading.Event()
    seen: list[tuple[int, bool]] = []

    def previous(signum: int, frame: Any) -> None:
        seen.append((signum, core.draining))
        called.set()

    original = signal.signal(signal.SIGTERM, previous)
    try:
        transport.drain_on_sigterm(core)
        started = time.monotonic()
        signal.raise_signal(signal.SIGTERM)
        assert core.draining is True  # new work is refused at once ...
        assert not called.is_set()  # ... and the server's own handler waits for the drain
        assert called.wait(10)
        assert seen == [(signal.SIGTERM, True)]
        assert time.monotonic() - started >= 0.2  # requests already past the gate got their moment
    finally:
        signal.signal(signal.SIGTERM, original)


def test_drain_is_only_installed_from_the_main_thread():
    core = MedGemmaCore(Settings(model="unused", load_on_startup=False))
    before = signal.getsignal(signal.SIGTERM)
    worker = threading.Thread(target=transport.drain_on_sigterm, args=(core,))
    worker.start()
    worker.join()
    assert signal.getsignal(signal.SIGTERM) is before
