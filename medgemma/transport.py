"""BentoML transport helpers for ``service.py``: strict API inputs, status codes, logging and SIGTERM handling.

Kept apart so that ``service.py`` reads as the list of routes and lifecycle hooks it is.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any

import bentoml
from _bentoml_sdk import IODescriptor
from starlette.responses import Response

from medgemma.core import MedGemmaCore
from medgemma.errors import BadRequest
from medgemma.middleware import RedactRequestData, scope_authenticated, scope_request_id


async def seed_payload(ctx: bentoml.Context, decoded: dict[str, Any]) -> dict[str, Any]:
    """The request as the client sent it, for the seed schema to validate (strict types, unknown fields refused).

    BentoML validates against the method signature first, which coerces JSON types ("200" → 200). For JSON bodies
    the edge middleware keeps the exact body, and the seed schema validates that. Forms are text by nature, so
    BentoML's decoding of them (JSON-decoded fields, uploaded files) is the right input; unknown form fields are
    refused by the API's input spec (see ``strict_api``).
    """
    raw = ctx.request.scope.get("state", {}).get("json_body")
    if raw is None:
        return {k: v for k, v in decoded.items() if not (k == "stream" and v is False)}
    data = json.loads(raw) if raw.strip() else {}
    if not isinstance(data, dict):  # the middleware already refused these; kept for in-process callers
        raise BadRequest("request body must be a JSON object")
    return data


def strict_api(route: str) -> Any:
    """``@bentoml.api`` whose input model refuses unknown fields (BentoML's own ignores them silently)."""

    def decorate(func: Any) -> Any:
        spec = IODescriptor.from_input(func, skip_self=True, skip_names=("ctx",))
        spec.model_config["extra"] = "forbid"
        spec.model_rebuild(force=True)
        return bentoml.api(route=route, input_spec=spec)(func)

    return decorate


def setup_logging() -> None:
    """Route `medgemma.*` loggers through BentoML's handlers (same format, same destination), at INFO."""
    ours = logging.getLogger("medgemma")
    ours.setLevel(logging.INFO)
    handlers = logging.getLogger("bentoml").handlers
    if handlers and not ours.handlers:
        for h in handlers:
            ours.addHandler(h)
        ours.propagate = False
    for h in {*handlers, *logging.getLogger().handlers}:
        if not any(isinstance(f, RedactRequestData) for f in h.filters):
            h.addFilter(RedactRequestData())


def drain_on_sigterm(core: MedGemmaCore) -> None:
    """Put a drain in front of the server's own SIGTERM handler (uvicorn's): new requests get 503 + Retry-After and
    running ones finish (up to MEDGEMMA_SHUTDOWN_GRACE_S) before the server starts shutting down. Without it, uvicorn
    stops accepting at once and connections already queued on the shared socket hang until the process is gone."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        def then() -> None:
            if callable(previous):
                previous(signum, frame)
            else:
                signal.raise_signal(signum)

        if not callable(previous):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        core.drain(then)

    signal.signal(signal.SIGTERM, on_sigterm)


def request_id(ctx: bentoml.Context) -> str | None:
    return scope_request_id(ctx.request.scope)


def authenticated(ctx: bentoml.Context) -> bool:
    return scope_authenticated(ctx.request.scope)


def respond(ctx: bentoml.Context, response: Response) -> Any:
    # With a ctx parameter BentoML overwrites the returned status with ctx.response.status_code: keep them equal.
    ctx.response.status_code = response.status_code
    return response
