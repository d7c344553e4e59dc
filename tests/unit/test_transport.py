"""BentoML transport helpers: the seed input spec (one validation), status codes, logging setup and the SIGTERM
drain. Real ``bentoml.Context`` objects around real starlette requests."""

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
from _bentoml_impl.serde import JSONSerde
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from medgemma import transport
from medgemma.config import Settings
from medgemma.core import MedGemmaCore
from medgemma.middleware import RedactRequestData
from medgemma.schemas import GenerateRequest


@contextlib.contextmanager
def context(state: dict[str, Any] | None = None) -> Iterator[bentoml.Context]:
    scope = {"type": "http", "method": "POST", "path": "/x/v1/generate", "headers": [], "state": state or {}}
    ctx = bentoml.Context()
    with ctx.in_request(Request(scope)) as c:
        yield c


def test_the_seed_input_spec_is_the_seed_schema_so_bentoml_validates_once():
    # JSON bodies: strict types ("200" is no int), unknown fields and the seed's own rules, in BentoML's parse.
    req = transport.SeedInput.model_validate_json(b'{"text": "q", "max_new_tokens": 200, "temperature": 1}')
    assert isinstance(req, GenerateRequest) and req.max_new_tokens == 200 and req.temperature == 1
    for body, kind in [
        (b'{"text": "q", "max_new_tokens": "200"}', "int_type"),
        (b'{"text": "q", "max_tokens": 5}', "extra_forbidden"),
        (b'{"text": "q", "temperature": 0, "top_k": 3}', "value_error"),
        (b"{}", "value_error"),  # neither text nor messages
    ]:
        with pytest.raises(ValidationError) as err:
            transport.SeedInput.model_validate_json(body)
        assert err.value.errors()[0]["type"] == kind, body
    # The image fields are files to BentoML (multipart uploads), and nothing else is.
    assert sorted(transport.SeedInput.multipart_fields) == ["image", "images"]
    # Forms arrive JSON-decoded field by field (BentoML's MultipartSerde), then meet the same strict schema.
    form = transport.SeedInput.model_validate(
        {"text": "q", "max_new_tokens": 3, "window": {"center": 40, "width": 400}}
    )
    assert form.window is not None and form.window.width == 400


def test_the_request_bentoml_parsed_reaches_the_method_without_a_second_validation():
    body = b'{"text": "q", "stream": true, "top_k": 3}'
    scope = {"type": "http", "method": "POST", "path": "/x/v1/generate", "headers": [], "state": {}}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    parsed = asyncio.run(transport.SeedInput.from_http_request(Request(scope, receive), JSONSerde()))
    assert parsed.stream is True and parsed.top_k == 3
    ctx = bentoml.Context()
    with ctx.in_request(Request(scope)) as c:
        assert transport.seed_request(c, dict(parsed)) is parsed  # the same object: not rebuilt, not revalidated
    with context() as c:  # a direct call of the service method: its arguments, for MedGemmaCore to validate
        assert transport.seed_request(c, {"text": "q"}) == {"text": "q"}


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
