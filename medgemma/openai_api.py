"""OpenAI-compatible chat completions: schemas, conversion into ``GenerationRequest``, response and SSE shapes.

The request converts into the same internal request as the seed API (``medgemma.inputs.build_request``), so roles,
images, limits and sampling rules are checked once. Same extra-field policy as the seed schemas: unknown fields are
a 400 naming them. OpenAI fields this server does not implement are declared and accepted only at their neutral
value (``n=1``, ``frequency_penalty=0``, ``logprobs=false``), so a client that sends them explicitly at their
defaults still works, and one that relies on them is told instead of ignored. ``response_format`` (``json_object``,
``json_schema``) constrains decoding (``medgemma.structured``); a thought the model writes comes back as
``reasoning_content``, as vLLM names it (``include_reasoning: false`` drops it).

Deviations, on purpose: without ``max_tokens``/``max_completion_tokens`` the server default (200, like the seed)
applies rather than "until the context is full"; without ``temperature`` decoding is greedy (the seed's default),
``temperature > 0`` samples. ``top_k`` and ``repetition_penalty`` are accepted as extensions, as vLLM does.
"""

from __future__ import annotations

import ipaddress
import time
import urllib.parse
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from medgemma import answer, inputs
from medgemma.config import Settings
from medgemma.errors import BadRequest, NotFound, PayloadTooLarge
from medgemma.protocol import GenerationRequest, GenerationResult, Message, Part, TextPart
from medgemma.schemas import AnswerOptions, APIModel, GenerationParameters, ImageDicomContent


class OAIImageURL(APIModel):
    url: str
    detail: Literal["auto"] | None = None  # images are always processed at the model's resolution


class OAITextPart(APIModel):
    type: Literal["text"]
    text: str


class OAIImagePart(APIModel):
    type: Literal["image_url"]
    image_url: OAIImageURL


OAIPart = Annotated[OAITextPart | OAIImagePart | ImageDicomContent, Field(discriminator="type")]


class OAIMessage(APIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[OAIPart] | None = None
    name: str | None = None


class StreamOptions(APIModel):
    include_usage: bool = False


class ChatCompletionRequest(AnswerOptions):
    model: str
    messages: list[OAIMessage]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    stop: (
        Annotated[str, Field(max_length=256)]
        | Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=8)]
        | None
    ) = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    n: Literal[1] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: Literal[0] | None = None
    presence_penalty: Literal[0] | None = None
    logprobs: Literal[False] | None = None
    include_reasoning: bool = True  # vLLM's name: false leaves a thought out of the response
    user: str | None = None  # an end-user id for abuse tracking upstream; never logged here

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        if not self.messages:
            raise ValueError("messages must contain at least one message")
        if self.temperature == 0 and (self.top_p is not None or self.top_k is not None):
            raise ValueError("temperature 0 means greedy decoding, which contradicts top_p/top_k")
        if (isinstance(self.stop, list) and any(s == "" for s in self.stop)) or self.stop == "":
            raise ValueError("stop strings must not be empty")
        return self

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def parameters(self) -> GenerationParameters:
        return GenerationParameters(
            max_new_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
        )


def adapter_of(requested: str | None, settings: Settings) -> str | None:
    """The route name or the configured source (the base model, like vLLM's served name), or a LoRA adapter's name
    (as in vLLM), which this returns. OpenAI clients must name a model; Google's format may leave it out (None)."""
    if requested is None or requested in {settings.route_prefix, settings.model}:
        return None
    adapters = [n for n, _ in settings.lora_adapter_specs]
    if requested in adapters:
        return requested
    names = ", ".join(f"'{n}'" for n in [settings.route_prefix, *adapters])
    raise NotFound(f"model '{requested[:100]}' is not served here; use {names} (see GET /v1/models)", param="model")


def part_item(part: Any, settings: Settings, param: str) -> tuple[Any, str]:
    """An OpenAI content part as an item for ``inputs.content_parts``."""
    if isinstance(part, OAITextPart):
        return TextPart(part.text), param
    if isinstance(part, ImageDicomContent):
        return part.image_dicom, f"{param}.image_dicom"
    return image_value(part.image_url.url, settings, param), param


def to_generation_request(
    req: ChatCompletionRequest,
    settings: Settings,
    *,
    vision: bool,
    request_id: str | None = None,
    item: Callable[[Any, Settings, str], tuple[Any, str]] = part_item,
) -> GenerationRequest:
    """The request as the one internal request; ``item`` maps a content part (Google's format has more kinds)."""
    options = inputs.image_options(settings, seed=req.seed, pad_to_square=req.pad_to_square)
    messages: list[Message] = []
    for i, m in enumerate(req.messages):
        if m.name is not None:  # Gemma's chat format has no participant names: refuse rather than drop it
            raise BadRequest(f"messages[{i}].name is not supported by this model", param=f"messages[{i}].name")
        role = "system" if m.role in ("system", "developer") else m.role
        if m.content is None:
            if role != "assistant":
                raise BadRequest(f"messages[{i}].content is required", param=f"messages[{i}].content")
            parts: list[Part] = [TextPart("")]
        elif isinstance(m.content, str):
            parts = [TextPart(m.content)]
        else:
            items = [item(p, settings, f"messages[{i}].content[{j}]") for j, p in enumerate(m.content)]
            parts = inputs.content_parts(items, options, f"messages[{i}].content")
        messages.append(Message(role, tuple(parts)))  # type: ignore[arg-type]
    params = inputs.sampling_params(req.parameters(), settings, stop=req.stop_list())
    adapter = adapter_of(req.model, settings)
    greq = inputs.build_request(
        messages,
        params,
        settings,
        vision=vision,
        request_id=request_id,
        adapter=adapter,
        image_sources=options.sources,
    )
    greq.include_thinking = req.include_reasoning
    return inputs.answer_options(req, settings, greq)


def image_value(url: str, settings: Settings, param: str, credential: str | None = None) -> Any:
    """An image URL as an image value: an allow-listed http(s) URL is fetched, anything else is a data URI."""
    if url.startswith(("http://", "https://")):
        return fetch_image(url, settings, param, credential)
    return url


def fetch_image(url: str, settings: Settings, param: str, credential: str | None = None) -> inputs.UploadedImage:
    """Fetch an http(s) image only from an allow-listed domain, with a size cap and a short timeout."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    allowed = [d.lower().lstrip(".") for d in settings.image_url_domains]
    if not host or not any(host == d or host.endswith("." + d) for d in allowed):
        raise BadRequest(
            f"{param}: image URLs are not fetched unless their domain is allow-listed "
            "(MEDGEMMA_IMAGE_URL_DOMAINS); send the image as a data URI",
            param=param,
        )
    try:
        ipaddress.ip_address(host)
        raise BadRequest(f"{param}: image URLs must name a domain, not an IP address", param=param)
    except ValueError:
        pass
    import httpx

    limit = settings.max_image_bytes
    try:
        headers = {"Authorization": f"Bearer {credential}"} if credential else None
        with httpx.stream("GET", url, timeout=10.0, follow_redirects=False, headers=headers) as resp:
            if resp.status_code != 200:
                raise BadRequest(f"{param}: fetching the image URL answered HTTP {resp.status_code}", param=param)
            data = bytearray()
            for chunk in resp.iter_bytes():
                data.extend(chunk)
                if len(data) > limit:
                    raise PayloadTooLarge(f"{param}: the image at the URL is above {limit} bytes", param=param)
            return inputs.UploadedImage(bytes(data), resp.headers.get("content-type"))
    except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as exc:
        raise BadRequest(f"{param}: the image URL could not be fetched ({type(exc).__name__})", param=param) from None


# --- responses -------------------------------------------------------------------------------------------------------


def _finish(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.input_tokens,
        "completion_tokens": result.output_tokens,
        "total_tokens": result.input_tokens + result.output_tokens,
    }


def completion(req: GenerationRequest, result: GenerationResult, model: str, metrics: dict[str, Any]) -> dict[str, Any]:
    shaped = answer.answer_of(req, result)
    return {
        "id": f"chatcmpl-{req.request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": shaped.text, **shaped.openai_message_fields()},
                "finish_reason": _finish(result),
                "logprobs": None,
            }
        ],
        "usage": usage(result),
        "compute_metrics": metrics,
        **({"image_sources": req.image_sources} if req.image_sources else {}),
    }


def chunk(
    req: GenerationRequest, model: str, delta: dict[str, Any], finish: str | None = None, created: int = 0
) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{req.request_id}",
        "object": "chat.completion.chunk",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
