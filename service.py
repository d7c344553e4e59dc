"""MedGemma as a BentoML service: transport, lifecycle hooks and readiness only.

Everything the service *does* lives in ``medgemma/`` (``MedGemmaCore``); this file turns HTTP into calls on it.

Routes (``{app}`` = ``MEDGEMMA_APP_NAME``, derived from the model by default):
  POST /{app}/v1/generate         seed API, simple or chat format; ``"stream": true`` → server-sent events
  POST|GET /{app}/v1/schema       dynamic input discovery (GET via the mounted app)
  POST|GET /{app}/v1/health       replica health and model state; always answers
  GET  /{app}/v1/models           model listing (OpenAI list shape)
  POST /{app}/v1/chat/completions and /v1/chat/completions, GET /v1/models: OpenAI-compatible API

Readiness: ``/readyz`` means "this replica can answer", not "the model is loaded". Model state is reported by the
API itself (202 while loading, 503 after a failed load). ``bentoml.SyncHTTPClient`` polls ``/readyz`` before its
first call; with load-on-first-request a model-gated ``/readyz`` would deadlock the very request that starts the
load, and a replica that is loading must still answer 202 and ``/health``.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any, Optional

import bentoml
from _bentoml_sdk import IODescriptor
from PIL import Image as PILImage
from starlette.responses import Response, StreamingResponse

from medgemma import bentoml_compat
from medgemma.config import SERVICE_NAME, Settings, load_bentoml_config
from medgemma.core import ClientGone, MedGemmaCore
from medgemma.errors import BadRequest
from medgemma.middleware import EdgeMiddleware, RedactRequestData
from medgemma.playground import playground_app
from medgemma.routes import error_response, json_response, openai_app, seed_app

bentoml_compat.apply()
log = logging.getLogger("medgemma.service")

SETTINGS = Settings.from_env()
APP = SETTINGS.route_prefix
_core: MedGemmaCore | None = None


def core() -> MedGemmaCore:
    if _core is None:  # a mounted route called before the service instance exists
        raise RuntimeError("service not initialised")
    return _core


# configuration.yaml (port, traffic, metrics, logging) is applied here, so a plain `bentoml serve` honours it.
_SERVICE_CONFIG: dict[str, Any] = {
    "resources": {"gpu": 1},
    "traffic": {"timeout": 600, "max_concurrency": 512},
    **load_bentoml_config(),
}


async def _seed_payload(ctx: bentoml.Context, decoded: dict[str, Any]) -> dict[str, Any]:
    """The request as the client sent it, for the seed schema to validate (strict types, unknown fields refused).

    BentoML validates against the method signature first, which coerces JSON types ("200" → 200). For JSON bodies
    the edge middleware keeps the exact body, and the seed schema validates that. Forms are text by nature, so
    BentoML's decoding of them (JSON-decoded fields, uploaded files) is the right input; unknown form fields are
    refused by the API's input spec (see ``_strict_api``).
    """
    raw = ctx.request.scope.get("state", {}).get("json_body")
    if raw is None:
        return {k: v for k, v in decoded.items() if not (k == "stream" and v is False)}
    data = json.loads(raw) if raw.strip() else {}
    if not isinstance(data, dict):  # the middleware already refused these; kept for in-process callers
        raise BadRequest("request body must be a JSON object")
    return data


def _strict_api(route: str) -> Any:
    """``@bentoml.api`` whose input model refuses unknown fields (BentoML's own ignores them silently)."""

    def decorate(func: Any) -> Any:
        spec = IODescriptor.from_input(func, skip_self=True, skip_names=("ctx",))
        spec.model_config["extra"] = "forbid"
        spec.model_rebuild(force=True)
        return bentoml.api(route=route, input_spec=spec)(func)

    return decorate


@bentoml.asgi_app(playground_app(APP), path=f"/{APP}/playground")
@bentoml.asgi_app(seed_app(core), path=f"/{APP}/v1")
@bentoml.asgi_app(openai_app(core), path="/v1")
@bentoml.service(name=SERVICE_NAME, **_SERVICE_CONFIG)
class MedGemma:
    """Serves one MedGemma (Gemma 3) checkpoint; see the module docstring for routes."""

    def __init__(self) -> None:
        global _core
        _setup_logging()
        _core = self.core = MedGemmaCore(SETTINGS)
        self.core.startup()
        _drain_on_sigterm(self.core)

    def __is_ready__(self) -> bool:
        # See the module docstring: readiness never waits for the model. It turns false while draining, so load
        # balancers stop sending work to a replica that is shutting down.
        return not self.core.draining

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.core.shutdown(grace_s=10.0)

    @_strict_api(f"/{APP}/v1/generate")
    async def generate(  # noqa: PLR0917 - BentoML maps each parameter to a request field
        self,
        ctx: bentoml.Context,
        text: str | None = None,
        system: str | None = None,
        # typing.Optional, not `X | None`: BentoML 1.4 only recognises typing.Union when it patches PIL fields.
        image: Optional[PILImage.Image] = None,  # noqa: UP045
        images: Optional[list[PILImage.Image]] = None,  # noqa: UP045
        messages: list[dict[str, Any]] | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        window: dict[str, float] | None = None,
        dicom_frames: str | None = None,
        stream: bool = False,
    ) -> dict[str, Any]:
        """Generate a response (seed API). Images: data URIs in JSON, or PIL images / files via the BentoML client."""
        decoded = {k: v for k, v in locals().items() if k not in ("self", "ctx") and v is not None}
        rid = _request_id(ctx)
        try:
            payload = await _seed_payload(ctx, decoded)
            if payload.get("stream") is True:
                events = await self.core.generate_stream(payload, request_id=rid)
                return _respond(ctx, StreamingResponse(events, media_type="text/event-stream"))
            body = await self.core.generate(payload, request_id=rid, disconnected=ctx.request.is_disconnected)
            return _respond(ctx, json_response(body))
        except ClientGone:
            return _respond(ctx, Response(status_code=499))
        except Exception as exc:
            return _respond(ctx, error_response(exc))

    @bentoml.api(route=f"/{APP}/v1/schema")
    def schema(self, ctx: bentoml.Context) -> dict[str, Any]:
        """Inputs this model accepts, discovered from the loaded checkpoint."""
        try:
            return _respond(ctx, json_response(self.core.schema()))
        except Exception as exc:
            return _respond(ctx, error_response(exc))

    @bentoml.api(route=f"/{APP}/v1/health")
    def health(self, ctx: bentoml.Context) -> dict[str, Any]:
        """Replica health, model state, device and uptime; answers in every state."""
        return _respond(ctx, json_response(self.core.health()))


def _setup_logging() -> None:
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


def _drain_on_sigterm(core_: MedGemmaCore) -> None:
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
        core_.drain(then)

    signal.signal(signal.SIGTERM, on_sigterm)


def _request_id(ctx: bentoml.Context) -> str | None:
    return ctx.request.scope.get("state", {}).get("request_id")


def _respond(ctx: bentoml.Context, response: Response) -> Any:
    # With a ctx parameter BentoML overwrites the returned status with ctx.response.status_code: keep them equal.
    ctx.response.status_code = response.status_code
    return response


def _count_response(route: str, status: int) -> None:
    if _core is not None:
        _core.count_response(route, status)


MedGemma.add_asgi_middleware(
    EdgeMiddleware,
    api_token=SETTINGS.api_token,
    max_body_bytes=SETTINGS.max_body_bytes,
    on_response=_count_response,
    json_paths=frozenset(f"/{APP}/v1/{name}" for name in ("generate", "schema", "health")),
)
