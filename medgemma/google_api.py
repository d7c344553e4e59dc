"""Google's MedGemma request format at ``POST /predict``: code written for Google's endpoint works by changing the URL.

Google's serving container (and so a Vertex AI endpoint) takes an OpenAI-style chat request, sent bare or wrapped
as ``{"instances": [request]}``, optionally marked ``"@requestFormat": "chatCompletions"``, with more content part
types than OpenAI's: ``text``, ``image_url`` (``{"url", "access_credential"}``), ``image`` (a URL or data URI),
``image_bytes`` (``{"input_bytes": base64}``) and ``image_dicom`` (a DICOMweb series, instance or list of instances
with a bearer credential). The answer is the OpenAI chat completion, bare for a bare request and as
``{"predictions": completion}`` for a wrapped one, so ``predictions["choices"][0]["message"]["content"]`` reads it
as it does from Google's container. Errors are OpenAI's ``{"error": {"message", ...}}``, as Google's are.

Refused by name (400), never ignored: ``image_gcs`` (nothing here can reach a bucket), ``patch_coordinates_list``,
other request formats, ``parameters`` beside ``instances``, more than one instance, and streaming.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr

from medgemma import openai_api, sources
from medgemma.config import Settings
from medgemma.errors import BadRequest
from medgemma.protocol import GenerationRequest, TextPart
from medgemma.schemas import APIModel, ImageDicomContent, ImageURL, ImageURLContent, TextContent, parse_model


class GoogleImageURL(ImageURL):
    access_credential: Annotated[SecretStr, Field(max_length=16384)] | None = None


class GoogleImageURLPart(ImageURLContent):
    image_url: GoogleImageURL | str  # type: ignore[assignment]


class GoogleImagePart(APIModel):
    type: Literal["image"]
    image: str  # a data URI, or an http(s) URL on an allow-listed domain


class ImageBytes(APIModel):
    input_bytes: str  # base64 of the encoded file (PNG, JPEG, DICOM, ...)


class GoogleImageBytesPart(APIModel):
    type: Literal["image_bytes"]
    image_bytes: ImageBytes


GooglePart = Annotated[
    TextContent | GoogleImageURLPart | GoogleImagePart | GoogleImageBytesPart | ImageDicomContent,
    Field(discriminator="type"),
]


class GoogleMessage(openai_api.OAIMessage):
    content: str | list[GooglePart] | None = None  # type: ignore[assignment]


class GoogleChatRequest(openai_api.ChatCompletionRequest):
    """An OpenAI chat request in Google's dialect: ``model`` optional, Google's content parts, a format marker."""

    model: str | None = None  # type: ignore[assignment]
    messages: list[GoogleMessage]  # type: ignore[assignment]
    request_format: Literal["chatCompletions"] | None = Field(default=None, alias="@requestFormat")


_UNSUPPORTED_PARTS = {
    "image_gcs": "image_gcs is not supported: this server cannot reach Cloud Storage; send the image as image_bytes "
    "or image_dicom",
}


def parse(payload: Any, settings: Settings) -> tuple[GoogleChatRequest, bool]:
    """Validate a /predict body; returns the request and whether it came wrapped in ``instances``."""
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    wrapped = "instances" in payload
    prefix = ""
    body: Any = payload
    if wrapped:
        for key in payload:
            if key == "parameters":
                raise BadRequest(
                    "parameters is not supported: put the generation parameters inside the instance", param="parameters"
                )
            if key != "instances":
                raise BadRequest(f"{key[:64]}: unknown field (not part of this API)", param=key[:64])
        instances = payload["instances"]
        if not isinstance(instances, list) or len(instances) != 1:
            raise BadRequest(
                "instances must hold exactly one chat request (send one request per call)", param="instances"
            )
        body, prefix = instances[0], "instances[0]."
        if not isinstance(body, dict):
            raise BadRequest("instances[0] must be a JSON object", param="instances[0]")
    fmt = body.get("@requestFormat")
    if fmt is not None and fmt != "chatCompletions":
        raise BadRequest(
            f"{prefix}@requestFormat: only 'chatCompletions' is supported", param=f"{prefix}@requestFormat"
        )
    _refuse_unsupported_parts(body, prefix)
    try:
        req = parse_model(GoogleChatRequest, body)
    except BadRequest as exc:
        raise BadRequest(prefix + exc.message, param=prefix + (exc.param or "") if exc.param else None) from None
    if req.stream:
        raise BadRequest(f"{prefix}stream is not supported at /predict; use /v1/chat/completions", param="stream")
    openai_api.adapter_of(req.model, settings)  # an unknown model or adapter is a 404 before any work
    return req, wrapped


def _refuse_unsupported_parts(body: dict[str, Any], prefix: str) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in _UNSUPPORTED_PARTS:
                param = f"{prefix}messages[{i}].content[{j}]"
                raise BadRequest(f"{param}: {_UNSUPPORTED_PARTS[kind]}", param=param)


def part_item(part: Any, settings: Settings, param: str) -> tuple[Any, str]:
    """A Google content part as an item for ``inputs.content_parts``."""
    if isinstance(part, GoogleImageBytesPart):
        return "data:application/octet-stream;base64," + part.image_bytes.input_bytes, f"{param}.image_bytes"
    if isinstance(part, GoogleImagePart):
        return sources.image_url_value(part.image, settings, param), param
    if isinstance(part, GoogleImageURLPart):
        secret = None if isinstance(part.image_url, str) else part.image_url.access_credential
        credential = secret.get_secret_value() if secret is not None else None
        return sources.image_url_value(part.url, settings, param, credential), param
    if isinstance(part, TextContent):
        return TextPart(part.text), param
    return openai_api.part_item(part, settings, param)


def to_generation_request(
    req: GoogleChatRequest, settings: Settings, *, vision: bool, request_id: str | None = None
) -> GenerationRequest:
    return openai_api.to_generation_request(req, settings, vision=vision, request_id=request_id, item=part_item)


def response(completion: dict[str, Any], wrapped: bool) -> dict[str, Any]:
    return {"predictions": completion} if wrapped else completion
