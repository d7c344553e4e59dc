"""BentoML transport helpers for ``service.py``: the seed input spec, status codes, logging and SIGTERM handling.

Kept apart so that ``service.py`` reads as the list of routes and lifecycle hooks it is.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Optional

import bentoml
from _bentoml_sdk.io_models import IOMixin
from PIL import Image as PILImage
from starlette.requests import Request
from starlette.responses import Response

from medgemma import bentoml_compat
from medgemma.core import MedGemmaCore
from medgemma.middleware import RedactRequestData, scope_authenticated, scope_request_id
from medgemma.schemas import GenerateRequest

# BentoML's PIL validator is adjusted (uploads kept undecoded, no URL downloads) before SeedInput is built below:
# pydantic binds the validator when the class is created.
bentoml_compat.apply()

_PARSED = "seed_request"  # scope["state"] key: the request as BentoML validated it


class SeedInput(IOMixin, GenerateRequest):
    """The seed route's BentoML input spec: ``GenerateRequest`` itself, so BentoML's parse is the one validation
    (strict types, unknown fields refused, the seed's rules), for JSON bodies and forms alike.

    Only the two image fields are retyped: as PIL images BentoML treats them as files (multipart uploads from
    ``bentoml.SyncHTTPClient``, ``curl -F``), which ``bentoml_compat`` hands over undecoded as ``UploadedImage``;
    in JSON they stay data-URI strings. Both are decoded by ``medgemma.inputs`` like every other image value.
    """

    # typing.Optional, not `X | None`: BentoML 1.4 only recognises typing.Union when it patches PIL fields.
    image: Optional[PILImage.Image] = None  # noqa: UP045
    images: Optional[list[PILImage.Image]] = None  # noqa: UP045

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # BentoML publishes OpenAPI 3.0, where exclusive bounds are booleans beside minimum/maximum; pydantic writes
        # JSON Schema 2020-12 numbers (`"exclusiveMinimum": 0`), which 3.0 validators refuse.
        return _openapi30_bounds(super().model_json_schema(*args, **kwargs))

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> Any:
        # BentoML hands the API method the model's fields, not the model: keep the validated instance where the
        # method finds it (the request's scope), so nothing has to validate or rebuild it a second time.
        parsed = await super().from_http_request(request, serde)
        request.scope.setdefault("state", {})[_PARSED] = parsed
        return parsed


def _openapi30_bounds(node: Any) -> Any:
    if isinstance(node, list):
        return [_openapi30_bounds(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi30_bounds(v) for k, v in node.items()}
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = out.get(bound)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[plain], out[bound] = value, True
    return out


def seed_request(ctx: bentoml.Context, fields: dict[str, Any]) -> GenerateRequest | dict[str, Any]:
    """The request BentoML parsed over HTTP; for a direct call of the service method (no HTTP), its arguments,
    which ``MedGemmaCore`` validates then."""
    parsed = ctx.request.scope.get("state", {}).get(_PARSED)
    return parsed if isinstance(parsed, GenerateRequest) else fields


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
