"""The edge: one pure-ASGI middleware in front of everything BentoML serves.

It does the cross-cutting work once, for the BentoML APIs and the mounted routes alike:

* request ids: ``X-Request-ID`` is taken (if sane) or generated, put in ``scope["state"]`` and echoed;
* auth: with an API token set, every route but liveness/readiness/metrics/health needs ``Authorization: Bearer``
  (compared in constant time); whether the caller presented it is put in ``scope["state"]`` for the open routes
  that show more to authenticated callers (``/health``'s details);
* body size: ``Content-Length`` over the limit → 413 before the app reads anything; bodies without a length are
  counted as they stream and cut off at the limit;
* one error shape: error responses that did not come from this project (BentoML's validation errors, its 4xx
  lists, starlette's plain-text 404/405) are rewritten into ``{"status": "error", "error": ...}`` — or OpenAI's
  ``{"error": {...}}`` on OpenAI routes — so a client never has to parse a second shape;
* one access-log line per request: id, method, path, status, duration, and what the handler noted with
  ``note_access`` (the LoRA adapter that answered). Never bodies.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from medgemma.errors import BadRequest, PayloadTooLarge, ServiceError, Unauthorized, error_body
from medgemma.schemas import readable_error
from medgemma.telemetry import ACCESS_NOTES

log = logging.getLogger("medgemma.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OWN_ERROR_HEADER = b"x-medgemma-error"  # set on every error body this project writes; stripped before sending
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
PREDICT_PATH = "/predict"  # Google's request format; Vertex AI's AIP_PREDICT_ROUTE is rewritten onto it
VERTEX_HEALTH_PATH = "/vertex/health"  # ready-gated health; Vertex AI's AIP_HEALTH_ROUTE is rewritten onto it
OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics", VERTEX_HEALTH_PATH)
_DOC_PATHS = frozenset({"/", "/docs", "/docs.json", "/schema.json"})


# Fields the request's handler adds to its access-log line. The middleware puts a fresh dict in the context of each
# request; the handler (same task, or a thread or task started from it) fills it.
def is_openai_path(path: str) -> bool:
    """Routes whose errors take OpenAI's shape (Google's /predict answers errors the same way)."""
    return (
        "/chat/completions" in path
        or path == PREDICT_PATH
        or (path.rstrip("/").endswith("/v1/models") and path.startswith("/v1"))
    )


class EdgeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_token: str = "",
        max_body_bytes: int = 128 * 1024 * 1024,
        open_paths: tuple[str, ...] = OPEN_PATHS,
        openai_path: Callable[[str], bool] = is_openai_path,
        on_response: Callable[[str, int], None] | None = None,
        json_paths: frozenset[str] = frozenset(),
        open_prefixes: tuple[str, ...] = ("/static_content/",),
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.app = app
        self.api_token = api_token.encode()
        self.max_body_bytes = max_body_bytes
        self.open_paths = open_paths
        self.openai_path = openai_path
        self.on_response = on_response
        self.json_paths = json_paths
        self.open_prefixes = open_prefixes
        # exact path -> served path: Vertex AI's configurable routes onto /predict and /vertex/health
        self.aliases = {k: v for k, v in (aliases or {}).items() if k and k != v}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        if not _REQUEST_ID.fullmatch(rid):
            rid = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["authenticated"] = self._token_ok(headers)
        path: str = scope.get("path", "")
        if path in self.aliases:
            path = scope["path"] = self.aliases[path]
            scope["raw_path"] = path.encode()
        openai = self.openai_path(path)
        status_holder = {"status": 0}
        notes: dict[str, str] = {}
        notes_token = ACCESS_NOTES.set(notes)

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message["headers"] = [
                    *[(k, v) for k, v in message.get("headers", []) if k.lower() not in (b"x-request-id",)],
                    (b"x-request-id", rid.encode()),
                ]
            await send(message)

        try:
            problem = self._check(scope, headers, path)
            if problem is not None:
                await _send_error(send_logged, problem, openai=openai)
                return
            receive = self._limited(receive, scope)
            if scope.get("method") == "POST" and path in self.json_paths and _is_json(headers):
                # Check JSON bodies here, before BentoML parses them: its parse errors are logged with the body
                # (prompt text) and answered in its own shapes.
                body, problem = await _read_json_object(receive, scope)
                if problem is not None:
                    await _send_error(send_logged, problem, openai=openai)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, _Rewriter(send_logged, openai=openai, scope=scope))
        finally:
            if self.on_response is not None and status_holder["status"]:
                try:
                    self.on_response(route_label(path), status_holder["status"])
                except Exception:  # metrics must never break a response
                    log.debug("on_response hook failed", exc_info=True)
            log.info(
                "request_id=%s method=%s path=%s status=%s duration_ms=%.1f%s",
                rid,
                scope.get("method"),
                path,
                status_holder["status"],
                (time.perf_counter() - started) * 1000,
                "".join(f" {k}={v}" for k, v in notes.items()),
            )
            ACCESS_NOTES.reset(notes_token)

    def _check(self, scope: Scope, headers: dict[bytes, bytes], path: str) -> ServiceError | None:
        needs_token = self.api_token and not self._is_open(path) and scope.get("method") != "OPTIONS"
        if needs_token and not scope["state"]["authenticated"]:
            return Unauthorized()
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n > self.max_body_bytes:
                return _too_large(n, self.max_body_bytes)
        return None

    def _token_ok(self, headers: dict[bytes, bytes]) -> bool:
        """An API token is set and the request carries it. Without a token nobody is authenticated."""
        if not self.api_token:
            return False
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_token)

    def _is_open(self, path: str) -> bool:
        """Probes, the API description and the playground page: exact paths and prefixes only, so no app name
        (say `docs-bot` or `playground-x`) can open a model route by accident."""
        if path in self.open_paths or path in _DOC_PATHS or path.startswith(self.open_prefixes):
            return True
        parts = path.split("/")
        return len(parts) == 4 and parts[2] == "v1" and parts[3] == "health"  # /{app}/v1/health

    def _limited(self, receive: Receive, scope: Scope) -> Receive:
        seen = 0
        limit = self.max_body_bytes

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    scope["state"]["body_too_large"] = (seen, limit)
                    return {"type": "http.disconnect"}
            return message

        return wrapped


def scope_request_id(scope: Scope) -> str | None:
    """The request id this middleware put into the ASGI scope (for routes and BentoML APIs alike)."""
    return scope.get("state", {}).get("request_id")


def scope_authenticated(scope: Scope) -> bool:
    """True when an API token is set and this request presented it (see ``EdgeMiddleware``)."""
    return scope.get("state", {}).get("authenticated") is True


def _is_json(headers: dict[bytes, bytes]) -> bool:
    media_type = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
    return media_type in (b"application/json", b"")


async def _read_json_object(receive: Receive, scope: Scope) -> tuple[bytes, ServiceError | None]:
    chunks = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            too_large = scope["state"].get("body_too_large")
            if too_large:
                return b"", _too_large(*too_large, at_least=True)
            break
        chunks.extend(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = bytes(chunks)
    if not body.strip():
        return body, None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return body, BadRequest("request body is not valid JSON")
    if not isinstance(data, dict):
        return body, BadRequest("request body must be a JSON object")
    return body, None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def route_label(path: str) -> str:
    """A low-cardinality route label for metrics: the app prefix folded, unknown paths grouped."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 3 and parts[1] == "v1":
        return "/{app}/v1/" + "/".join(parts[2:4])
    if len(parts) >= 2 and parts[1] == "playground":
        return "/{app}/playground"
    if parts and parts[0] == "v1":
        return "/" + "/".join(parts[:3])
    if len(parts) == 1 and parts[0] in ("livez", "readyz", "healthz", "metrics"):
        return "/" + parts[0]
    return "other"


def _too_large(n: int, limit: int, *, at_least: bool = False) -> PayloadTooLarge:
    size = f"at least {n}" if at_least else str(n)
    return PayloadTooLarge(f"request body of {size} bytes is above the limit of {limit} bytes")


class _Rewriter:
    """Send wrapper that rewrites foreign error bodies into this project's shape."""

    def __init__(self, send: Send, *, openai: bool, scope: Scope) -> None:
        self.send = send
        self.openai = openai
        self.scope = scope
        self.start: Message | None = None
        self.buffer = bytearray()
        self.passthrough = True

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            too_large = self.scope["state"].get("body_too_large")
            headers = message.get("headers", [])
            own = any(k.lower() == OWN_ERROR_HEADER for k, _ in headers)
            if too_large:
                self.passthrough = False
                self.start = {"type": "http.response.start", "status": 413, "headers": []}
                self.replacement: ServiceError | None = _too_large(*too_large, at_least=True)
                return
            if message["status"] >= 400 and not own:
                self.passthrough = False
                self.start = message
                self.replacement = None
                return
            if own:
                message["headers"] = [(k, v) for k, v in headers if k.lower() != OWN_ERROR_HEADER]
            await self.send(message)
            return
        if message["type"] == "http.response.body" and not self.passthrough:
            self.buffer.extend(message.get("body", b""))
            if message.get("more_body", False):
                return
            assert self.start is not None
            exc = self.replacement or _foreign_error(self.start["status"], bytes(self.buffer))
            await _send_error(self.send, exc, openai=self.openai, extra_headers=self.start.get("headers", []))
            return
        await self.send(message)


def _foreign_error(status: int, raw: bytes) -> ServiceError:
    """BentoML/starlette error body → ServiceError with a readable message (no internals)."""
    message = "request failed"
    param = None
    try:
        data: Any = json.loads(raw) if raw else None
    except ValueError:
        data = raw.decode("utf-8", "replace").strip() or None
    if isinstance(data, list) and data:
        data = data[0]
    if isinstance(data, dict):
        detail = data.get("detail")
        if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
            message, param = readable_error(detail)  # BentoML's ValidationError answer: the schema's own words
        elif isinstance(data.get("error"), str):
            message = data["error"]
        elif isinstance(detail, str):
            message = detail
    elif isinstance(data, str):
        message = data
    if status >= 500:
        message = "Internal error while serving the request"  # never leak internals
    exc = ServiceError(message[:500], param=param)
    exc.status_code = status
    return exc


async def _send_error(
    send: Send, exc: ServiceError, *, openai: bool, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(error_body(exc, openai=openai)).encode()
    keep = [
        (k, v) for k, v in (extra_headers or []) if k.lower() in (b"retry-after", b"www-authenticate", b"x-request-id")
    ]
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *[(k.lower().encode(), v.encode()) for k, v in exc.headers.items()],
        *keep,
    ]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RedactRequestData(logging.Filter):
    """Drop request data from other libraries' error logs.

    BentoML logs request-parsing failures with their traceback, and pydantic's ValidationError text quotes the input
    (``input_value='<prompt text>'``). Such records keep their message and the error's type and field locations, but
    lose the traceback and the values: prompts are patient data.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            chain = []
            while exc is not None and len(chain) < 10:
                chain.append(exc)
                exc = exc.__cause__ or exc.__context__
            validation = next(
                (e for e in chain if type(e).__name__ == "ValidationError" and hasattr(e, "errors")), None
            )
            client_error = validation is not None or any(
                400 <= _error_code(e) < 500 or type(e).__name__ == "ClientDisconnect" for e in chain
            )
            if client_error and record.levelno > logging.WARNING:
                # The client sent something invalid (or left) and got a 4xx: a warning, not an error to page on.
                record.levelno, record.levelname = logging.WARNING, "WARNING"
                if hasattr(record, "levelname_bracketed"):  # BentoML's TraceRecordFilter ran first and formats this
                    record.levelname_bracketed = "[WARNING]"
            if validation is not None:
                locs = [".".join(str(p) for p in err.get("loc", ())) for err in validation.errors()][:5]
                record.msg = f"{record.getMessage()} (request validation failed at: {', '.join(locs)}; values redacted)"
                record.args = None
                record.exc_info = None
                record.exc_text = None
        return True


def _error_code(exc: BaseException) -> int:
    code = getattr(exc, "error_code", None)
    try:
        return int(code) if code is not None else 0
    except (TypeError, ValueError):
        return 0
