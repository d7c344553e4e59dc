"""MedGemma as a BentoML service: transport, lifecycle hooks and readiness only.

Everything the service *does* lives in ``medgemma/`` (``MedGemmaCore``); this file turns HTTP into calls on it.

Routes (``{app}`` = ``MEDGEMMA_APP_NAME``, derived from the model by default):
  POST /{app}/v1/generate         seed API, simple or chat format; ``"stream": true`` → server-sent events;
                                  ``"adapter"`` picks a LoRA adapter (MEDGEMMA_LORA_ADAPTERS)
  POST|GET /{app}/v1/schema       dynamic input discovery (GET via the mounted app)
  POST|GET /{app}/v1/health       replica health and model state; always answers
  GET  /{app}/v1/models           model listing (OpenAI list shape)
  POST /{app}/v1/chat/completions and /v1/chat/completions, GET /v1/models: OpenAI-compatible API
  POST /predict (and AIP_PREDICT_ROUTE)  Google's MedGemma request format, as a Vertex AI endpoint expects
  GET  /vertex/health (and AIP_HEALTH_ROUTE)  200 once the model is ready, 503 before

Readiness: ``/readyz`` means "this replica can answer", not "the model is loaded". Model state is reported by the
API itself (202 while loading, 503 after a failed load). ``bentoml.SyncHTTPClient`` polls ``/readyz`` before its
first call; with load-on-first-request a model-gated ``/readyz`` would deadlock the very request that starts the
load, and a replica that is loading must still answer 202 and ``/health``.
"""

from __future__ import annotations

from typing import Any

import bentoml
from starlette.responses import Response, StreamingResponse

from medgemma import malloc, transport
from medgemma.config import SERVICE_NAME, Settings, load_bentoml_config
from medgemma.core import ClientGone, MedGemmaCore
from medgemma.middleware import PREDICT_PATH, VERTEX_HEALTH_PATH, EdgeMiddleware
from medgemma.playground import playground_app
from medgemma.routes import error_response, google_app, json_response, openai_app, seed_app

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
if SETTINGS.aip_http_port:  # Vertex AI tells a custom container which port to serve on
    _SERVICE_CONFIG["http"] = {**_SERVICE_CONFIG.get("http", {}), "port": SETTINGS.aip_http_port}


@bentoml.asgi_app(google_app(core), path="/")  # only /predict and /vertex/health: other paths fall through
@bentoml.asgi_app(playground_app(APP), path=f"/{APP}/playground")
@bentoml.asgi_app(seed_app(core), path=f"/{APP}/v1")
@bentoml.asgi_app(openai_app(core), path="/v1")
@bentoml.service(name=SERVICE_NAME, **_SERVICE_CONFIG)
class MedGemma:
    """Serves one MedGemma (Gemma 3) checkpoint; see the module docstring for routes."""

    def __init__(self) -> None:
        global _core
        transport.setup_logging()
        malloc.tune()  # before the model loads: a request's large buffers are reused, not faulted in anew
        _core = self.core = MedGemmaCore(SETTINGS)
        self.core.startup()
        transport.drain_on_sigterm(self.core)

    def __is_ready__(self) -> bool:
        # See the module docstring: readiness never waits for the model. It turns false while draining, so load
        # balancers stop sending work to a replica that is shutting down.
        return not self.core.draining

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.core.shutdown(grace_s=SETTINGS.shutdown_grace_s)

    @bentoml.api(route=f"/{APP}/v1/generate", input_spec=transport.SeedInput)
    async def generate(self, ctx: bentoml.Context, **request: Any) -> dict[str, Any]:
        """Generate a response (seed API; fields: ``medgemma.schemas.GenerateRequest``). Images: data URIs in JSON,
        or PIL images / files via the BentoML client."""
        rid = transport.request_id(ctx)
        try:
            req = self.core.parse_seed(transport.seed_request(ctx, request))
            if req.stream:
                events = await self.core.generate_stream(req, request_id=rid)
                return transport.respond(ctx, StreamingResponse(events, media_type="text/event-stream"))
            body = await self.core.generate(req, request_id=rid, disconnected=ctx.request.is_disconnected)
            return transport.respond(ctx, json_response(body))
        except ClientGone:
            return transport.respond(ctx, Response(status_code=499))
        except Exception as exc:
            return transport.respond(ctx, error_response(exc))

    @bentoml.api(route=f"/{APP}/v1/schema")
    def schema(self, ctx: bentoml.Context) -> dict[str, Any]:
        """Inputs this model accepts, discovered from the loaded checkpoint."""
        try:
            return transport.respond(ctx, json_response(self.core.schema()))
        except Exception as exc:
            return transport.respond(ctx, error_response(exc))

    @bentoml.api(route=f"/{APP}/v1/health")
    def health(self, ctx: bentoml.Context) -> dict[str, Any]:
        """Replica health, model state, device and uptime; answers in every state."""
        try:
            return transport.respond(ctx, json_response(self.core.health(details=transport.authenticated(ctx))))
        except Exception as exc:
            return transport.respond(ctx, error_response(exc))


def _count_response(route: str, status: int) -> None:
    if _core is not None:
        _core.count_response(route, status)


MedGemma.add_asgi_middleware(
    EdgeMiddleware,
    api_token=SETTINGS.api_token,
    max_body_bytes=SETTINGS.max_body_bytes,
    on_response=_count_response,
    json_paths=frozenset(f"/{APP}/v1/{name}" for name in ("generate", "schema", "health")),
    open_prefixes=(f"/{APP}/playground", "/static_content/"),
    aliases={SETTINGS.aip_predict_route: PREDICT_PATH, SETTINGS.aip_health_route: VERTEX_HEALTH_PATH},
)
