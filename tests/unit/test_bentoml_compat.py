"""The adjustments to BentoML 1.4's request parsing, exercised through BentoML's own classes on real requests:
uploads are kept as bytes, URLs are never fetched, broken forms are 400s, traffic errors come in this service's shape.
"""

from __future__ import annotations

import asyncio
import io
import json
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


def test_bentoml_tracing_keeps_the_request_span_but_opens_none_per_streamed_chunk():
    bentoml_compat.apply()
    from opentelemetry.instrumentation import asgi as otel_asgi

    async def app(scope: dict, receive: object, send: object) -> None:  # never called here
        return None

    middleware = otel_asgi.OpenTelemetryMiddleware(app)  # how BentoML builds it: no exclude_spans given
    assert middleware.exclude_send_span and middleware.exclude_receive_span
    kept = otel_asgi.OpenTelemetryMiddleware(app, exclude_spans=["receive"])  # an explicit choice is kept
    assert kept.exclude_receive_span and not kept.exclude_send_span
