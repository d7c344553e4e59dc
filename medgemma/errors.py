"""Errors that carry their HTTP status and render as the one error body of this service.

Every error a client can cause is a ``ServiceError``; the transport turns it into
``{"status": "error", "error": "<a sentence a person understands>", ...extra}`` with ``status_code``.
Lifecycle answers (model loading → 202, load failed → 503) are ServiceErrors too, so that every API,
the seed one and the OpenAI one, refuses work the same way.

Messages must never contain prompt text, generated text, image bytes or DICOM tags: they are echoed to
clients and may be logged.
"""

from __future__ import annotations

import re
from typing import Any


class ServiceError(Exception):
    """Base class: an error with an HTTP status, a public message and optional extra body fields."""

    status_code: int = 500
    status: str = "error"

    def __init__(
        self,
        message: str,
        /,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status, "error": self.message}
        if self.param is not None:
            body["param"] = self.param
        body.update(self.extra)
        return body


class BadRequest(ServiceError):
    """The request is malformed or out of range (400)."""

    status_code = 400


class Unauthorized(ServiceError):
    """Missing or wrong API token (401)."""

    status_code = 401

    def __init__(self, message: str = "Missing or invalid API token", **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kw)


class Forbidden(ServiceError):
    """A DICOMweb server refused the request's access credential (403)."""

    status_code = 403


class NotFound(ServiceError):
    status_code = 404


class PayloadTooLarge(ServiceError):
    """The body, an image or a prompt exceeds a configured limit (413)."""

    status_code = 413


class UnsupportedMediaType(ServiceError):
    """An image format or DICOM transfer syntax this service cannot decode (415)."""

    status_code = 415


class Overloaded(ServiceError):
    """The engine's queue is full: retry later (429 with Retry-After)."""

    status_code = 429

    def __init__(self, message: str, *, retry_after: int = 1, **kw: Any) -> None:
        kw.setdefault("headers", {"Retry-After": str(retry_after)})
        super().__init__(message, retry_after_seconds=retry_after, **kw)


class ModelLoading(ServiceError):
    """The model is not loaded yet; the load runs in the background (202 with Retry-After)."""

    status_code = 202
    status = "loading"

    def __init__(self, message: str, *, retry_after: int, **extra: Any) -> None:
        # `error` keeps the seed's exact wording; `message` says what to do.
        super().__init__(
            "Model not loaded yet",
            headers={"Retry-After": str(retry_after)},
            message=message,
            retry_after_seconds=retry_after,
            **extra,
        )


class ModelFailed(ServiceError):
    """The last load failed; its error is kept and returned until the retry backoff passes (503)."""

    status_code = 503
    status = "failed"

    def __init__(self, loading_error: str, *, retry_after: int, **extra: Any) -> None:
        super().__init__(
            f"Model loading failed: {loading_error}",
            headers={"Retry-After": str(retry_after)},
            loading_error=loading_error,
            retry_after_seconds=retry_after,
            **extra,
        )


class AdapterLoading(ServiceError):
    """The named LoRA adapter is still loading in the background (202 with Retry-After, like the model)."""

    status_code = 202
    status = "loading"

    def __init__(self, adapter: str, *, retry_after: int = 5) -> None:
        super().__init__(
            f"adapter '{adapter}' is still loading; retry in {retry_after} seconds",
            param="adapter",
            headers={"Retry-After": str(retry_after)},
            adapter=adapter,
            retry_after_seconds=retry_after,
        )


class AdapterFailed(ServiceError):
    """The named LoRA adapter could not be loaded; its stored error says why (503, like a failed model)."""

    status_code = 503
    status = "failed"

    def __init__(self, adapter: str, loading_error: str) -> None:
        super().__init__(
            f"adapter '{adapter}' failed to load: {loading_error}",
            param="adapter",
            adapter=adapter,
            loading_error=loading_error,
        )


class EngineUnavailable(ServiceError):
    """The engine cannot take work right now (shutting down, out of memory for this request) (503)."""

    status_code = 503

    def __init__(self, message: str, *, retry_after: int = 5, **kw: Any) -> None:
        kw.setdefault("headers", {"Retry-After": str(retry_after)})
        super().__init__(message, **kw)


class BadGateway(ServiceError):
    """An upstream server (a DICOMweb PACS) could not be reached or answered with an error (502)."""

    status_code = 502


class GatewayTimeout(ServiceError):
    """An upstream server (a DICOMweb PACS) did not answer within the configured timeout (504)."""

    status_code = 504


class InternalError(ServiceError):
    """Anything unexpected. The message is generic on purpose: internals never reach the client."""

    status_code = 500

    def __init__(self, message: str = "Internal error while serving the request", **kw: Any) -> None:
        super().__init__(message, **kw)


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    202: "model_loading",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}


def error_body(exc: ServiceError, *, openai: bool) -> dict[str, Any]:
    """The body for ``exc``: this service's shape, or OpenAI's ``{"error": {...}}`` on OpenAI routes."""
    if not openai:
        return exc.body()
    body: dict[str, Any] = {
        "error": {
            "message": exc.message,
            "type": _OPENAI_TYPES.get(exc.status_code, "server_error"),
            "param": exc.param,
            "code": exc.status,
        }
    }
    if exc.status_code in (202, 503):
        # Lifecycle answers carry the seed's fields too, so OpenAI clients can read state and progress.
        body.update({k: v for k, v in exc.body().items() if k != "error"})
    return body


# Absolute and home-relative POSIX paths, relative ./ ../ paths and Windows drive paths. A slash right after a word
# character or a colon is not a path start, so hub ids (google/medgemma-4b-it) and URLs keep their shape.
_PATH = re.compile(r"""(?<![\w:/.~])(?:~|\.{1,2})?/[^\s'"`,;:()\[\]{}<>]*|\b[A-Za-z]:\\[^\s'"`,;()\[\]{}<>]*""")
PUBLIC_ERROR_CHARS = 160


def public_error(exc: BaseException, limit: int = PUBLIC_ERROR_CHARS) -> str:
    """A short summary of ``exc`` that anyone may see: its class, the first line of its message with every
    filesystem path replaced by ``<path>``, at most ``limit`` characters. The full text is for logs and for
    callers who authenticated."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = f"{type(exc).__name__}: {_PATH.sub('<path>', first)}" if first else type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
