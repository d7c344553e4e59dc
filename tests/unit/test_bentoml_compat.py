"""The adjustments to BentoML 1.4's request parsing, exercised through BentoML's own classes on real requests:
uploads are kept as bytes, URLs are never fetched, broken forms are 400s, traffic errors come in this service's shape,
and the per-request timeout timer is disarmed when the request ends.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import io
import json
import weakref
from typing import Any, Optional

import httpx
import pytest
from PIL import Image as PILImage
from starlette.datastructures import Headers, UploadFile
from starlette.requests import Request

from medgemma import bentoml_compat
from medgemma.inputs import UploadedImage
from tests.helpers import png_bytes, png_data_uri

bentoml_compat.apply()

from _bentoml_impl import serde  # noqa: E402  (patched above)
from _bentoml_sdk import IODescriptor, validators  # noqa: E402
from bentoml._internal.server.http import traffic  # noqa: E402
from bentoml.exceptions import BadInput  # noqa: E402

PNG = png_bytes((10, 200, 90), (12, 10))


def generate(  # the shape of the service's generate API, for BentoML to build its input model from
    text: str | None = None,
    image: Optional[PILImage.Image] = None,  # noqa: UP045 - BentoML recognises typing.Optional for PIL fields
    images: Optional[list[PILImage.Image]] = None,  # noqa: UP045
    max_new_tokens: int | None = None,
) -> dict:
    return {}


SPEC = IODescriptor.from_input(generate)


def parse_form(data: dict[str, Any] | None = None, files: Any = None, content_type: str | None = None) -> Any:
    """Run BentoML's multipart parsing on a real multipart body (encoded by httpx)."""
    built = httpx.Request("POST", "http://test/generate", data=data, files=files)
    body = built.read()
    headers = dict(built.headers)
    if content_type is not None:
        headers["content-type"] = content_type
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/generate",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return asyncio.run(serde.MultipartSerde().parse_request(Request(scope, receive), SPEC))


def test_apply_is_idempotent():
    patched = serde.MultipartSerde.parse_request
    bentoml_compat.apply()
    assert serde.MultipartSerde.parse_request is patched


def test_uploaded_images_are_kept_as_bytes_not_opened():
    dicom_like = b"\0" * 128 + b"DICM" + b"not an image PIL could open"
    upload = UploadFile(
        io.BytesIO(dicom_like), filename="ct.dcm", headers=Headers({"content-type": "application/dicom"})
    )
    decoded = validators.PILImageEncoder().decode(upload)
    assert decoded == UploadedImage(data=dicom_like, media_type="application/dicom", filename="ct.dcm")
    assert validators.PILImageEncoder().decode(PNG) == UploadedImage(data=PNG)
    image = PILImage.new("RGB", (2, 2))
    assert validators.PILImageEncoder().decode(image) is image  # in-process callers pass PIL images through


def test_form_with_an_uploaded_image_and_json_fields():
    parsed = parse_form({"text": "Describe", "max_new_tokens": "5"}, {"image": ("x.png", PNG, "image/png")})
    assert parsed.text == "Describe" and parsed.max_new_tokens == 5
    assert parsed.image == UploadedImage(data=PNG, media_type="image/png", filename="x.png")


def test_a_data_uri_form_value_becomes_an_upload():
    parsed = parse_form({"text": "q", "image": png_data_uri(PNG)})
    assert parsed.image.data == PNG and parsed.image.media_type == "image/png"


@pytest.mark.parametrize(
    ("data", "files", "content_type", "words"),
    [
        ({"text": "q", "image": "https://example.org/x.png"}, None, None, "URLs are not fetched"),
        ({"text": "q", "image": "data:image/png;base64,@@@"}, None, None, "base64"),
        ({"text": "q", "temperature": "0.5"}, None, None, "temperature: unknown field"),
        (None, {"text": ("t.bin", b"\xff\xfe\x00\x81binary", "application/octet-stream")}, None, "binary"),
        ({"text": "q"}, {"image": ("x.png", PNG, "image/png")}, "multipart/form-data", "malformed form body"),
    ],
)
def test_broken_or_unsafe_forms_are_bad_input(data, files, content_type, words):
    with pytest.raises(BadInput) as err:
        parse_form(data, files, content_type)
    assert words in str(err.value)
    assert int(err.value.error_code) == 400


def test_json_bodies_that_are_urls_are_never_downloaded():
    assert serde.is_http_url("http://169.254.169.254/latest/meta-data") is False


@pytest.mark.parametrize(
    ("status", "content", "body", "retry_after"),
    [
        (429, {"error": "Too many requests"}, "too many concurrent requests for this replica; retry shortly", "1"),
        (504, {"error": "Request timed out"}, "Request timed out", None),
        (503, None, "request failed", None),
    ],
)
def test_traffic_answers_come_in_this_service_shape(status, content, body, retry_after):
    response = traffic.JSONResponse(content, status_code=status)
    assert response.status_code == status
    assert json.loads(response.body) == {"status": "error", "error": body}
    assert response.headers.get("retry-after") == retry_after


def _timeout_middleware_request(app: Any, timeout: float) -> tuple[list[dict], Any, list[Any]]:
    """One request through BentoML's TimeoutMiddleware, in a task whose context holds a marker object (as the
    server's request context holds its OpenTelemetry span). Returns what was sent, a weak reference to the marker
    after the request, and the loop's timers still armed."""
    marker_var: contextvars.ContextVar[object] = contextvars.ContextVar("marker")

    class Marker:
        pass

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def main() -> tuple[list[dict], Any, list[Any]]:
        middleware = traffic.TimeoutMiddleware(app, timeout=timeout)
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def one_request() -> Any:
            marker = Marker()
            marker_var.set(marker)
            await middleware({"type": "http", "method": "POST", "path": "/x", "headers": []}, receive, send)
            return weakref.ref(marker)

        ref = await asyncio.create_task(one_request())
        await asyncio.sleep(0)  # one loop iteration: the loop drops cancelled timers from the head of its heap
        gc.collect()
        loop = asyncio.get_running_loop()
        armed = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
        return sent, ref, armed

    return asyncio.run(main())


async def _answer_ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_a_finished_request_leaves_no_timer_and_no_context_behind():
    # BentoML's own TimeoutMiddleware arms loop.call_later(traffic.timeout) per request and never disarms it: the
    # timer kept the request's context (its OpenTelemetry span, ~4 KB) alive for the whole timeout (600 s in
    # configuration.yaml) after the answer, so memory grew with every request for ten minutes (the soak's slope).
    sent, ref, armed = _timeout_middleware_request(_answer_ok, timeout=600)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200
    assert armed == []
    assert ref() is None


def test_the_timeout_still_answers_504_in_this_service_shape():
    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(5)
        await _answer_ok(scope, receive, send)

    sent, ref, armed = _timeout_middleware_request(slow, timeout=0.05)
    assert sent[0]["status"] == 504
    assert json.loads(sent[1]["body"])["status"] == "error"
    assert armed == [] and ref() is None


def test_bentoml_tracing_keeps_the_request_span_but_opens_none_per_streamed_chunk():
    bentoml_compat.apply()
    from opentelemetry.instrumentation import asgi as otel_asgi

    async def app(scope: dict, receive: object, send: object) -> None:  # never called here
        return None

    middleware = otel_asgi.OpenTelemetryMiddleware(app)  # how BentoML builds it: no exclude_spans given
    assert middleware.exclude_send_span and middleware.exclude_receive_span
    kept = otel_asgi.OpenTelemetryMiddleware(app, exclude_spans=["receive"])  # an explicit choice is kept
    assert kept.exclude_receive_span and not kept.exclude_send_span
