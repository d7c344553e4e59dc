"""Turn a validated API request into the internal ``GenerationRequest``: messages, images, limits.

Both APIs end here, so the rules live once: roles must alternate (the Gemma chat template demands it), the last
turn is the user's, images only in user turns and only for image+text models, every image decoded by
``medgemma.imaging`` (PNG/JPEG, 16-bit, DICOM) within the configured limits. A CT series (several CT DICOM slices)
is ordered by slice and labelled "SLICE n", as Google's CT notebook does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from medgemma import boxes, imaging
from medgemma.config import Settings
from medgemma.errors import BadRequest, PayloadTooLarge
from medgemma.protocol import ConstraintSpec, GenerationRequest, ImagePart, Message, Part, SamplingParams, TextPart
from medgemma.schemas import (
    AnswerOptions,
    ChatMessage,
    GenerateRequest,
    GenerationParameters,
    ImageContent,
    ImageURLContent,
)


@dataclass(frozen=True)
class UploadedImage:
    """An image or DICOM file that arrived as a multipart upload (BentoML client, curl -F)."""

    data: bytes
    media_type: str | None = None
    filename: str | None = None


@dataclass
class ImageOptions:
    """How to decode the images of one request, and how many it may still decode."""

    window: imaging.Window | None
    frames: imaging.FrameSelection
    limits: imaging.ImageLimits
    max_images: int
    decoded: int = 0
    pad_to_square: bool = False

    def count(self, n: int, param: str) -> None:
        # Checked as images are decoded (a multi-frame DICOM counts each frame), not after all of them are in memory.
        self.decoded += n
        if self.decoded > self.max_images:
            raise PayloadTooLarge(
                f"more than {self.max_images} images in this request (DICOM frames count one each), above the "
                f"limit of {self.max_images} per request",
                param=param,
            )


def image_options(
    settings: Settings, window: Any = None, frames: str | None = None, *, pad_to_square: bool = False
) -> ImageOptions:
    return ImageOptions(
        window=imaging.Window(center=window.center, width=window.width) if window is not None else None,
        frames=frames or settings.dicom_frames,  # type: ignore[arg-type]
        limits=imaging.ImageLimits(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            max_frames=settings.max_images,
        ),
        max_images=settings.max_images,
        pad_to_square=pad_to_square,
    )


def decode_image(value: Any, options: ImageOptions, *, param: str) -> list[ImagePart]:
    """One image value (data URI, upload, PIL image) → one or more prepared images (multi-frame DICOM)."""
    if isinstance(value, Image.Image):
        prepared = [imaging.prepare_pil(value, window=options.window, limits=options.limits, param=param)]
    elif isinstance(value, UploadedImage):
        prepared = imaging.load_images(
            value.data,
            media_type=value.media_type,
            window=options.window,
            frames=options.frames,
            limits=options.limits,
            param=param,
        )
    elif isinstance(value, str):
        media_type, data = imaging.parse_data_uri(value, param=param, limits=options.limits)
        prepared = imaging.load_images(
            data,
            media_type=media_type,
            window=options.window,
            frames=options.frames,
            limits=options.limits,
            param=param,
        )
    elif isinstance(value, bytes | bytearray):
        prepared = imaging.load_images(
            bytes(value), window=options.window, frames=options.frames, limits=options.limits, param=param
        )
    else:
        raise BadRequest(
            f"{param}: an image must be a data URI string (data:image/png;base64,...) or an uploaded file",
            param=param,
        )
    options.count(len(prepared), param)
    if options.pad_to_square:
        return [_padded(p.image, p.info) for p in prepared]
    return [ImagePart(image=p.image, info=p.info) for p in prepared]


def _padded(image: Image.Image, info: dict[str, Any]) -> ImagePart:
    square, record = boxes.pad_to_square(image)
    return ImagePart(image=square, info={**info, "padded_to_square": record})


def answer_options(opts: AnswerOptions, settings: Settings, request: GenerationRequest) -> GenerationRequest:
    """Apply what both APIs accept about the answer's shape to an internal request."""
    request.constraint = constraint_spec(opts, settings)
    request.pad_to_square = opts.pad_to_square
    return request


def constraint_spec(opts: AnswerOptions, settings: Settings) -> ConstraintSpec | None:
    """``response_format`` / ``structured_outputs`` → what the answer must match, checked for size and, for JSON
    schemas, against the JSON Schema meta-schema (what the grammar library refuses is found at compile time)."""
    limit = settings.max_constraint_bytes
    fmt, extra = opts.response_format, opts.structured_outputs
    if fmt is not None and fmt.type == "json_object":
        return ConstraintSpec("json_object", '{"type":"object"}', "response_format")
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
        param = "response_format.json_schema.schema"
        schema = fmt.json_schema.schema_
        # Key order kept: the model writes properties in the order the schema lists them.
        source = _bounded(json.dumps(schema, separators=(",", ":")), param, limit)
        _check_json_schema(schema, param)
        return ConstraintSpec("json_schema", source, param)
    if extra is None:
        return None
    if extra.regex is not None:
        param = "structured_outputs.regex"
        return ConstraintSpec("regex", _bounded(extra.regex, param, limit), param)
    if extra.grammar is not None:
        param = "structured_outputs.grammar"
        return ConstraintSpec("grammar", _bounded(extra.grammar, param, limit), param)
    choices = json.dumps(extra.choice, ensure_ascii=False)
    return ConstraintSpec("choice", _bounded(choices, "structured_outputs.choice", limit), "structured_outputs.choice")


def _bounded(text: str, param: str, limit: int) -> str:
    size = len(text.encode())
    if size > limit:
        raise BadRequest(
            f"{param} is {size} bytes (as compact JSON), above this server's limit of {limit} bytes "
            "(MEDGEMMA_MAX_CONSTRAINT_BYTES)",
            param=param,
        )
    return text


def _check_json_schema(schema: dict[str, Any], param: str) -> None:
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        at = f" (at {where})" if where else ""
        raise BadRequest(f"{param} is not a valid JSON Schema: {exc.message[:300]}{at}", param=param) from None


def sampling_params(p: GenerationParameters, settings: Settings, stop: Sequence[str] = ()) -> SamplingParams:
    max_new = p.max_new_tokens if p.max_new_tokens is not None else settings.default_max_new_tokens
    if max_new > settings.max_new_tokens_cap:
        raise BadRequest(
            f"max_new_tokens: {max_new} is above this server's limit of {settings.max_new_tokens_cap}",
            param="max_new_tokens",
        )
    return SamplingParams.resolve(
        max_new_tokens=max_new,
        do_sample=p.do_sample,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        repetition_penalty=p.repetition_penalty,
        seed=p.seed,
        stop=tuple(stop),
    )


def from_seed(
    req: GenerateRequest, settings: Settings, *, vision: bool, request_id: str | None = None
) -> GenerationRequest:
    """Seed API request (simple or chat format) → internal request."""
    options = image_options(settings, req.window, req.dicom_frames, pad_to_square=req.pad_to_square)
    params = sampling_params(req, settings)
    if req.messages is not None:
        messages = [_chat_message(m, i, options) for i, m in enumerate(req.messages)]
    else:
        images: list[ImagePart] = []
        values = [req.image] if req.image is not None else list(req.images or [])
        for i, value in enumerate(values):
            param = "image" if req.image is not None else f"images[{i}]"
            images.extend(decode_image(value, options, param=param))
        user_parts: list[Part] = [TextPart(req.text or "")]
        user_parts.extend(_label_series(images))
        messages = []
        if req.system is not None:
            messages.append(Message("system", (TextPart(req.system),)))
        messages.append(Message("user", tuple(user_parts)))
    greq = build_request(messages, params, settings, vision=vision, request_id=request_id)
    greq.include_thinking = req.include_thinking
    return answer_options(req, settings, greq)


def build_request(
    messages: list[Message],
    params: SamplingParams,
    settings: Settings,
    *,
    vision: bool,
    request_id: str | None = None,
) -> GenerationRequest:
    """Check the conversation as a whole and wrap it; shared by every API."""
    check_conversation(messages, settings, vision=vision)
    req = GenerationRequest(messages=messages, params=params)
    if request_id:
        req.request_id = request_id
    return req


def check_conversation(messages: list[Message], settings: Settings, *, vision: bool) -> None:
    if not messages:
        raise BadRequest("messages must contain at least one message", param="messages")
    n_images = 0
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if m.role == "system" and i != 0:
            raise BadRequest(f"{param}: a system message is only allowed first", param=param)
        for part in m.parts:
            if isinstance(part, TextPart) and len(part.text) > settings.max_text_chars:
                raise PayloadTooLarge(
                    f"{param}: text of {len(part.text)} characters is above the limit of {settings.max_text_chars}",
                    param=param,
                )
            if isinstance(part, ImagePart):
                n_images += 1
                if m.role != "user":
                    raise BadRequest(f"{param}: images are only allowed in user messages", param=param)
                if not vision:
                    raise BadRequest(
                        "this model is text-only and does not accept images; remove the image or serve an "
                        "image+text model such as google/medgemma-4b-it",
                        param=param,
                    )
        empty = all(isinstance(p, TextPart) and not p.text.strip() for p in m.parts)
        if empty and m.role != "assistant":
            raise BadRequest(f"{param}: content must not be empty", param=param)
    if n_images > settings.max_images:
        raise PayloadTooLarge(
            f"{n_images} images (DICOM frames count one each) is above the limit of {settings.max_images} per request",
            param="messages",
        )
    turns = [m for m in messages if m.role != "system"]
    if not turns:
        raise BadRequest("messages need at least one user message after the system message", param="messages")
    offset = len(messages) - len(turns)  # the system message, if any, comes first
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            raise BadRequest(
                f"roles must alternate user/assistant starting with user; message {i + offset} is "
                f"'{m.role}' where '{expected}' was expected",
                param="messages",
            )
    if turns[-1].role != "user":
        raise BadRequest("the last message must come from the user", param="messages")


def _chat_message(m: ChatMessage, index: int, options: ImageOptions) -> Message:
    if isinstance(m.content, str):
        return Message(m.role, (TextPart(m.content),))
    parts: list[Part] = []
    for j, c in enumerate(m.content):
        param = f"messages[{index}].content[{j}]"
        if isinstance(c, ImageContent):
            parts.extend(decode_image(c.image, options, param=param))
        elif isinstance(c, ImageURLContent):
            url = c.image_url if isinstance(c.image_url, str) else c.image_url.url
            parts.extend(decode_image(_data_uri_only(url, param), options, param=param))
        else:
            parts.append(TextPart(c.text))
    return Message(m.role, tuple(_label_series_in_parts(parts)))


def _data_uri_only(url: str, param: str) -> str:
    if url.startswith(("http://", "https://")):
        raise BadRequest(
            f"{param}: image URLs are not fetched by this server; send the image as a data URI",
            param=param,
        )
    return url


def _is_ct_series(images: Sequence[ImagePart]) -> bool:
    return len(images) > 1 and all(
        im.info.get("source") == "dicom" and im.info.get("modality") == "CT" for im in images
    )


def _slice_key(im: ImagePart) -> tuple[float, float]:
    inst = im.info.get("instance_number")
    loc = im.info.get("slice_location")
    return (float(inst) if inst is not None else float("inf"), float(loc) if loc is not None else 0.0)


def _label_series(images: list[ImagePart]) -> list[Part]:
    """Several CT slices → ordered by slice, each followed by "SLICE n"; other images stay as sent."""
    if not _is_ct_series(images):
        return list(images)
    ordered = sorted(images, key=_slice_key)
    out: list[Part] = []
    for n, im in enumerate(ordered, start=1):
        out.extend([im, TextPart(f"SLICE {n}")])
    return out


def _label_series_in_parts(parts: list[Part]) -> Iterable[Part]:
    images = [p for p in parts if isinstance(p, ImagePart)]
    if not _is_ct_series(images) or any(isinstance(p, TextPart) and p.text.startswith("SLICE") for p in parts):
        return parts
    texts = [p for p in parts if isinstance(p, TextPart)]
    return [*texts, *_label_series(images)]
