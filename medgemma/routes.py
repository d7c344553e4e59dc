"""Routes BentoML's ``@bentoml.api`` cannot serve, mounted beside the APIs as a FastAPI app.

BentoML APIs are POST-only, but the seed's `schema`, `health` and `models` are GETs (its curl examples), and the
OpenAI API lives at `.../v1/chat/completions`. A GET on a POST-only BentoML route falls through to this mount.
The handlers are thin: they call ``MedGemmaCore`` and turn ``ServiceError`` into the one error body.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from medgemma.core import ClientGone, MedGemmaCore
from medgemma.errors import BadRequest, InternalError, ServiceError, error_body
from medgemma.middleware import (
    OWN_ERROR_HEADER,
    PREDICT_PATH,
    VERTEX_HEALTH_PATH,
    scope_authenticated,
    scope_request_id,
)

log = logging.getLogger(__name__)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(exc: BaseException, *, openai: bool = False) -> JSONResponse:
    """The catch-all at the edge: a ServiceError as its body; anything else as a generic 500 (logged, not leaked)."""
    if isinstance(exc, ClientDisconnect):
        # The client went away (or the edge cut an oversized body): nobody reads this answer.
        return JSONResponse({"status": "error", "error": "client disconnected"}, status_code=499)
    if not isinstance(exc, ServiceError):
        log.error("unhandled %s while serving a request", type(exc).__name__, exc_info=exc)
        _free_accelerator_memory()
        exc = InternalError()
    headers = {**exc.headers, OWN_ERROR_HEADER.decode(): "1"}
    return JSONResponse(error_body(exc, openai=openai), status_code=exc.status_code, headers=headers)


def _free_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass


def seed_app(core: Callable[[], MedGemmaCore]) -> FastAPI:
    """GET `/{app}/v1/schema|health|models`, mounted at `/{app}/v1`."""
    app = FastAPI(title="MedGemma seed API (GET routes)", docs_url=None, redoc_url=None)

    @app.get("/schema")
    async def schema() -> Response:
        try:
            return json_response(core().schema())
        except Exception as exc:
            return error_response(exc)

    @app.get("/health")
    async def health(request: Request) -> Response:
        try:
            return json_response(core().health(details=scope_authenticated(request.scope)))
        except Exception as exc:
            return error_response(exc)

    @app.get("/models")
    async def models() -> Response:
        try:
            return json_response(core().models())
        except Exception as exc:
            return error_response(exc)

    app.include_router(openai_router(core, models=False))
    return app


def openai_app(core: Callable[[], MedGemmaCore]) -> FastAPI:
    """The OpenAI-compatible routes alone, mounted at `/v1` so `base_url="http://host:3000/v1"` works."""
    app = FastAPI(title="MedGemma OpenAI-compatible API", docs_url=None, redoc_url=None)
    app.include_router(openai_router(core, models=True))
    return app


def google_app(core: Callable[[], MedGemmaCore]) -> FastAPI:
    """Google's MedGemma request format (``POST /predict``) and Vertex AI's readiness check, mounted at the root.

    Vertex AI's own paths (``AIP_PREDICT_ROUTE``, ``AIP_HEALTH_ROUTE``) are rewritten onto these two by the edge
    middleware, so they work whatever Vertex names them (its defaults live under ``/v1/``, beside the OpenAI routes).
    """
    app = FastAPI(title="MedGemma: Google's request format", docs_url=None, redoc_url=None)

    @app.post(PREDICT_PATH)
    async def predict(request: Request) -> Response:
        try:
            payload = await read_json(request)
            rid = scope_request_id(request.scope)
            body = await core().predict(payload, request_id=rid, disconnected=request.is_disconnected)
            return json_response(body)
        except ClientGone:
            return Response(status_code=499)
        except Exception as exc:
            return error_response(exc, openai=True)

    @app.get(VERTEX_HEALTH_PATH)
    async def vertex_health() -> Response:
        try:
            body, status = core().ready_health()
            # the 503 is this project's own body (state, progress), not one for the edge to reshape
            return json_response(body, status, headers={OWN_ERROR_HEADER.decode(): "1"} if status >= 400 else None)
        except Exception as exc:
            return error_response(exc)

    return app


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def openai_router(core: Callable[[], MedGemmaCore], *, models: bool) -> APIRouter:
    router = APIRouter()

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            payload = await read_json(request)
            rid = scope_request_id(request.scope)
            if isinstance(payload, dict) and payload.get("stream") is True:
                events = await core().chat_completion_stream(payload, request_id=rid)
                return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
            body = await core().chat_completion(payload, request_id=rid, disconnected=request.is_disconnected)
            return json_response(body)
        except ClientGone:
            return Response(status_code=499)
        except Exception as exc:
            return error_response(exc, openai=True)

    if models:

        @router.get("/models")
        async def list_models() -> Response:
            try:
                return json_response(core().models())
            except Exception as exc:
                return error_response(exc, openai=True)

    return router


async def read_json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise BadRequest("request body is not valid JSON") from None
