"""Narrow adjustments to BentoML 1.4's request parsing and middlewares, applied once by ``medgemma.transport`` on
import.

Why each one (all verified against bentoml 1.4.40's ``_bentoml_impl/serde.py``, ``_bentoml_sdk/validators.py``,
``bentoml/_internal/server/http/traffic.py`` and opentelemetry-instrumentation-asgi 0.66):

1. **Uploaded images are not opened by BentoML.** Its PIL validator calls ``PIL.Image.open`` on every uploaded file:
   a DICOM file or a broken PNG then fails *before our code runs*, as a generic 500. We keep the upload's bytes
   (``UploadedImage``) and decode them ourselves (PNG/JPEG/16-bit/DICOM, size limits, bomb checks, 4xx errors).
   PIL images handed over in-process (tests, ``to_asgi``) pass through unchanged.
2. **No server-side fetching of URLs.** For a file field sent as a plain form value, BentoML downloads the value
   as a URL; for a JSON body that is a bare URL string, it downloads that. A medical service must not make
   outbound requests on a caller's behalf, so form values become data-URI uploads or a 400.
3. A data URI sent as a form value (``curl -F image=data:image/png;base64,...``) is accepted, like in JSON.
4. **Broken forms are a 400.** BentoML's form parsing lets starlette's "missing boundary"/"invalid multipart" and a
   binary file in a text field (a UnicodeDecodeError) escape as 500s; they become ``BadInput`` (400).
5. **Traffic answers in this service's error shape.** BentoML's timeout (504) and max-concurrency (429) middlewares
   sit outside any middleware a service can add, and answer ``{"error": ...}`` — the 429 without ``Retry-After``.
   Their responses are built here instead: ``{"status": "error", "error": ...}``, with ``Retry-After`` on the 429.
6. **The request timeout is disarmed when the request ends.** BentoML's ``TimeoutMiddleware`` arms a
   ``loop.call_later(traffic.timeout)`` per request and never cancels it, and a timer keeps a copy of the request's
   context (its OpenTelemetry span, which BentoML always records) until it fires: with ``timeout: 600`` every request
   left ~4 KB behind for ten minutes, so memory grew with the request count (the soak measured it). Same behaviour
   otherwise: the timeout runs until the response starts, then the rest of the response is awaited.
7. **No tracing span per streamed chunk.** BentoML wraps every app in OpenTelemetry's ASGI middleware, which by
   default opens a span for each ``send`` and ``receive`` message. A streamed answer sends one message per token,
   and those spans were more than half of the event loop's work per token (py-spy, c=1 streaming, small demo
   model), taking CPU from the engine on the same machine. The request's own span, and the trace ids in the logs,
   stay; only the per-message child spans go (``exclude_spans``, a documented option of the middleware).
"""

from __future__ import annotations

import asyncio
import codecs
import contextvars
import io
from typing import Any

from medgemma.errors import ServiceError
from medgemma.inputs import UploadedImage

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    from _bentoml_impl import serde
    from _bentoml_sdk import validators
    from bentoml.exceptions import BadInput
    from starlette.datastructures import Headers, UploadFile

    from medgemma.imaging import parse_data_uri

    orig_decode = validators.PILImageEncoder.decode

    def decode(self: Any, obj: Any) -> Any:
        if isinstance(obj, UploadFile):
            obj.file.seek(0)
            return UploadedImage(
                data=obj.file.read(),
                media_type=(obj.headers.get("Content-Type") or None),
                filename=obj.filename,
            )
        if isinstance(obj, bytes | bytearray):
            return UploadedImage(data=bytes(obj))
        return orig_decode(self, obj)

    async def ensure_file(obj: Any) -> Any:
        if isinstance(obj, UploadFile):
            return obj
        value = str(obj).strip().strip("\"'")
        if not value.startswith("data:"):
            raise BadInput("image fields take an uploaded file or a data URI; URLs are not fetched by this server")
        try:
            media_type, data = parse_data_uri(value)
        except ServiceError as exc:  # BentoML turns BadInput into a 400; the edge middleware reshapes the body
            raise BadInput(exc.message) from None
        return UploadFile(
            io.BytesIO(data), size=len(data), filename="upload", headers=Headers({"content-type": media_type})
        )

    from bentoml._internal.server.http import traffic
    from starlette.responses import JSONResponse

    def traffic_response(content: Any, status_code: int = 200, **kwargs: Any) -> JSONResponse:
        message = content.get("error") if isinstance(content, dict) else None
        headers = dict(kwargs.pop("headers", None) or {})
        if status_code == 429:
            headers.setdefault("Retry-After", "1")
            message = "too many concurrent requests for this replica; retry shortly"
        body = {"status": "error", "error": message or "request failed"}
        return JSONResponse(body, status_code=status_code, headers=headers, **kwargs)

    traffic.JSONResponse = traffic_response  # type: ignore[assignment,misc]

    async def timeout_call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        # BentoML's TimeoutMiddleware.__call__ (bentoml 1.4.40), plus: the timer runs in an empty context (its
        # callback needs none of the request's) and is cancelled when the request ends.
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter, context=contextvars.Context())

        async def _send(message: Any) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            await waiter
        except TimeoutError:  # asyncio.TimeoutError is TimeoutError since Python 3.11
            if fut.cancel():
                resp = traffic.JSONResponse(
                    {"error": f"Not able to process the request in {self.timeout} seconds"}, status_code=504
                )
                await resp(scope, receive, send)
        else:
            await fut
        finally:
            timer.cancel()

    traffic.TimeoutMiddleware.__call__ = timeout_call  # type: ignore[method-assign]
    from python_multipart.exceptions import ParseError
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    orig_parse = serde.MultipartSerde.parse_request

    async def parse_request(self: Any, request: Any, cls: Any) -> Any:
        try:
            form = await request.form()  # parsed once; starlette caches it for BentoML's own parse below
            for name in form:
                if name not in cls.model_fields:
                    raise BadInput(f"{name}: unknown field (not part of this API)")
                value = form[name]
                if isinstance(value, UploadFile) and name not in cls.multipart_fields:
                    head = await value.read(4096)
                    await value.seek(0)
                    try:
                        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut char is fine
                    except UnicodeDecodeError:
                        raise BadInput(f"{name}: expects text or JSON, got a binary file") from None
            return await orig_parse(self, request, cls)
        except HTTPException as exc:  # starlette's form parser: missing boundary, invalid multipart
            raise BadInput(f"malformed form body: {exc.detail}") from None
        except (ParseError, MultiPartException):
            raise BadInput("malformed form body") from None
        except UnicodeDecodeError:
            raise BadInput(
                "a form field that takes text or JSON received binary data (is a file in the wrong field?)"
            ) from None

    from opentelemetry.instrumentation import asgi as otel_asgi

    class OpenTelemetryMiddleware(otel_asgi.OpenTelemetryMiddleware):  # type: ignore[misc]
        def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("exclude_spans", ["receive", "send"])
            super().__init__(app, *args, **kwargs)

    # BentoML imports the class from the module when it builds its middleware stack, after this ran.
    otel_asgi.OpenTelemetryMiddleware = OpenTelemetryMiddleware  # type: ignore[misc]
    serde.MultipartSerde.parse_request = parse_request  # type: ignore[method-assign]
    validators.PILImageEncoder.decode = decode  # type: ignore[method-assign]
    serde.MultipartSerde.ensure_file = staticmethod(ensure_file)  # type: ignore[method-assign,assignment]
    serde.is_http_url = lambda _url: False  # never download a JSON body that is a URL
    _applied = True
