"""Turn a validated API request into the internal ``GenerationRequest``: messages, images, limits.

Both APIs end here, so the rules live once: roles must alternate (the Gemma chat template demands it), the last
turn is the user's, images only in user turns and only for image+text models, every image decoded by
``medgemma.imaging`` (PNG/JPEG, 16-bit, DICOM) within the configured limits. A CT series (several CT DICOM slices)
is ordered by slice and labelled "SLICE n", as Google's CT notebook does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from medgemma import boxes, imaging, sources
from medgemma.config import Settings
from medgemma.errors import BadRequest, NotFound, PayloadTooLarge
from medgemma.protocol import ConstraintSpec, GenerationRequest, ImagePart, Message, Part, SamplingParams, TextPart
from medgemma.schemas import (
    AnswerOptions,
    ChatMessage,
    DicomSource,
    GenerateRequest,
    ImageContent,
    ImageDicomContent,
    SeedImageURLContent,
)
from medgemma.sources import ImageOptions, Upload


@dataclass(frozen=True)
class UploadedImage:
    """An image or DICOM file that arrived as a multipart upload (BentoML client, curl -F)."""

    data: bytes
    media_type: str | None = None
    filename: str | None = None


def image_options(
    settings: Settings,
    window: Any = None,
    frames: str | None = None,
    seed: int | None = None,
    *,
    pad_to_square: bool = False,
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
        settings=settings,
        seed=seed or 0,
        pad_to_square=pad_to_square,
    )


def to_upload(value: Any, options: ImageOptions, *, param: str) -> Upload | Image.Image:
    """One image value (data URI, upload, bytes) as encoded bytes; a PIL image as it is."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, str):  # the one URL policy: a data URI stays, an http(s) URL is fetched (allow-listed) or 400
        value = sources.image_url_value(value, options.settings, param)
    if isinstance(value, Upload):  # already encoded bytes (fetched, or read once by the caller)
        return value
    if isinstance(value, UploadedImage):
        return Upload(value.data, value.media_type)
    if isinstance(value, str):
        media_type, data = imaging.parse_data_uri(value, param=param, limits=options.limits)
        return Upload(data, media_type)
    if isinstance(value, bytes | bytearray):
        return Upload(bytes(value))
    raise BadRequest(
        f"{param}: an image must be a data URI string (data:image/png;base64,...) or an uploaded file",
        param=param,
    )


def decode_image(value: Any, options: ImageOptions, *, param: str) -> list[ImagePart]:
    """One image value (data URI, upload, PIL image) → prepared images: one, or several for a multi-frame DICOM
    or a slide (its tissue patches)."""
    upload = to_upload(value, options, param=param)
    if isinstance(upload, Image.Image):
        prepared = [imaging.prepare_pil(upload, window=options.window, limits=options.limits, param=param)]
    else:
        if len(upload.data) > options.limits.max_bytes:  # before a slide reader or a decoder looks at it
            imaging.load_images(upload.data, limits=options.limits, param=param)  # raises the 413
        slide = sources.uploaded_slide(upload, options, param)
        if slide is not None:
            return [p for p in slide if isinstance(p, ImagePart)]
        prepared = imaging.load_images(
            upload.data,
            media_type=upload.media_type,
            window=options.window,
            frames=options.frames,
            limits=options.limits,
            param=param,
        )
    options.count(len(prepared), param)
    if options.pad_to_square:
        return [_padded(p.image, p.info) for p in prepared]
    return [ImagePart(image=p.image, info=p.info) for p in prepared]


def decode_images(values: Sequence[tuple[Any, str]], options: ImageOptions, *, param: str) -> list[Part]:
    """The image values of one message: several CT/MR DICOM files form a volume (selected, ordered, sampled,
    labelled ``SLICE n``); anything else is decoded value by value, in the order given."""
    uploads = [to_upload(value, options, param=p) for value, p in values]
    if all(isinstance(u, Upload) for u in uploads):
        series = sources.uploaded_series(uploads, options, param)  # type: ignore[arg-type]
        if series is not None:
            return series
    parts: list[Part] = []
    for upload, (_, p) in zip(uploads, values, strict=True):
        parts.extend(decode_image(upload, options, param=p))
    return parts


def dicom_source(spec: DicomSource, options: ImageOptions, *, param: str) -> list[Part]:
    """An ``image_dicom`` source (see :class:`medgemma.schemas.DicomSource`) fetched from the PACS."""
    if spec.patch_coordinates_list is not None:
        raise BadRequest(
            f"{param}.patch_coordinates_list is not supported: this server samples a slide's tissue patches itself "
            "(MEDGEMMA_WSI_MAX_PATCHES); remove the field",
            param=f"{param}.patch_coordinates_list",
        )
    credential = spec.access_credential.get_secret_value() if spec.access_credential is not None else None
    return sources.from_dicomweb(spec.dicom_source, credential or None, options, param)


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


def from_seed(
    req: GenerateRequest, settings: Settings, *, vision: bool, request_id: str | None = None
) -> GenerationRequest:
    """Seed API request (simple or chat format) → internal request."""
    check_adapter(req.adapter, settings, param="adapter")
    options = image_options(settings, req.window, req.dicom_frames, req.seed, pad_to_square=req.pad_to_square)
    params = req.seed_sampling_params(settings)
    if req.messages is not None:
        messages = [_chat_message(m, i, options) for i, m in enumerate(req.messages)]
    else:
        if req.image is not None:
            values = [(req.image, "image")]
        else:
            values = [(value, f"images[{i}]") for i, value in enumerate(req.images or [])]
        user_parts: list[Part] = [TextPart(req.text or "")]
        user_parts.extend(decode_images(values, options, param="images"))
        specs = req.image_dicom if isinstance(req.image_dicom, list) else [req.image_dicom] if req.image_dicom else []
        for i, spec in enumerate(specs):
            param = "image_dicom" if not isinstance(req.image_dicom, list) else f"image_dicom[{i}]"
            user_parts.extend(dicom_source(spec, options, param=param))
        messages = []
        if req.system is not None:
            messages.append(Message("system", (TextPart(req.system),)))
        messages.append(Message("user", tuple(user_parts)))
    greq = build_request(
        messages,
        params,
        settings,
        vision=vision,
        request_id=request_id,
        adapter=req.adapter,
        image_sources=options.sources,
        image_previews=req.image_previews,
    )
    greq.include_thinking = req.include_thinking
    return answer_options(req, settings, greq)


def check_adapter(name: str | None, settings: Settings, *, param: str) -> None:
    """An adapter name must be one of MEDGEMMA_LORA_ADAPTERS: 404 naming the served ones otherwise."""
    served = [n for n, _ in settings.lora_adapter_specs]
    if name is not None and name not in served:
        listed = ", ".join(served) if served else "none are configured (MEDGEMMA_LORA_ADAPTERS)"
        raise NotFound(f"adapter '{name[:100]}' is not served here; adapters: {listed}", param=param)


def build_request(
    messages: list[Message],
    params: SamplingParams,
    settings: Settings,
    *,
    vision: bool,
    request_id: str | None = None,
    adapter: str | None = None,
    image_sources: list[dict[str, Any]] | None = None,
    image_previews: bool = False,
) -> GenerationRequest:
    """Check the conversation as a whole and wrap it; shared by every API."""
    check_conversation(messages, settings, vision=vision)
    req = GenerationRequest(
        messages=messages,
        params=params,
        adapter=adapter,
        image_sources=list(image_sources or ()),
        image_previews=image_previews,
    )
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
    items: list[tuple[Any, str]] = []
    for j, c in enumerate(m.content):
        param = f"messages[{index}].content[{j}]"
        if isinstance(c, ImageDicomContent):
            items.append((c.image_dicom, f"{param}.image_dicom"))
        elif isinstance(c, SeedImageURLContent):
            items.append((c.url, param))  # an http(s) URL meets the URL policy when it is decoded (to_upload)
        elif isinstance(c, ImageContent):
            items.append((c.image, param))
        else:
            items.append((TextPart(c.text), param))
    return Message(m.role, tuple(content_parts(items, options, f"messages[{index}].content")))


def content_parts(items: Sequence[tuple[Any, str]], options: ImageOptions, param: str) -> list[Part]:
    """A message's content as internal parts, the same for every API (each maps its own part types first).

    ``items`` are ``(item, param)`` pairs: a :class:`TextPart`, a :class:`DicomSource` (fetched where it stands),
    or an image value (data URI, upload, bytes, PIL image). Several CT or MR DICOM files among the image values
    form one volume, placed after the other parts with its slices labelled ``SLICE n`` (Google's order:
    instruction, slices, question), unless the client labelled slices itself.
    """
    slots: list[Part | tuple[Any, str]] = []  # parts, or image values still to decode
    for item, p in items:
        if isinstance(item, DicomSource):
            slots.extend(dicom_source(item, options, param=p))
        elif isinstance(item, TextPart):
            slots.append(item)
        else:
            slots.append((item, p))
    values = [slot for slot in slots if isinstance(slot, tuple)]
    labelled = any(isinstance(s, TextPart) and s.text.startswith("SLICE") for s in slots)
    if len(values) > 1 and not labelled:
        uploads = [to_upload(value, options, param=p) for value, p in values]
        if all(isinstance(u, Upload) for u in uploads):
            series = sources.uploaded_series(uploads, options, param)  # type: ignore[arg-type]
            if series is not None:
                return [*(s for s in slots if not isinstance(s, tuple)), *series]
        # Not a series: decode what was just read (a data URI is not decoded twice, a URL not fetched twice).
        read = iter(uploads)
        slots = [(next(read), slot[1]) if isinstance(slot, tuple) else slot for slot in slots]
    parts: list[Part] = []
    for slot in slots:
        if isinstance(slot, tuple):
            parts.extend(decode_image(slot[0], options, param=slot[1]))
        else:
            parts.append(slot)
    return parts
