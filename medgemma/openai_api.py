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

import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from medgemma import answer, inputs, sources
from medgemma.config import Settings
from medgemma.errors import BadRequest, NotFound
from medgemma.protocol import GenerationRequest, GenerationResult, Message, Part, SamplingParams, TextPart
from medgemma.schemas import (
    AnswerOptions,
    APIModel,
    ImageDicomContent,
    ImageURLContent,
    SamplingFields,
    TextContent,
)

OAIPart = Annotated[TextContent | ImageURLContent | ImageDicomContent, Field(discriminator="type")]


class OAIMessage(APIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[OAIPart] | None = None
    name: str | None = None


class StreamOptions(APIModel):
    include_usage: bool = False


class ChatCompletionRequest(AnswerOptions, SamplingFields):
    model: str
    messages: list[OAIMessage]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: (
        Annotated[str, Field(max_length=256)]
        | Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=8)]
        | None
    ) = None
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
        if (isinstance(self.stop, list) and any(s == "" for s in self.stop)) or self.stop == "":
            raise ValueError("stop strings must not be empty")
        return self

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def engine_params(self, settings: Settings) -> SamplingParams:
        """The engine's parameters, straight from this request (no detour through the seed's schema)."""
        length = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        return self.sampling_params(settings, max_new_tokens=getattr(self, length), stop=self.stop_list(), param=length)


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
    if isinstance(part, TextContent):
        return TextPart(part.text), param
    if isinstance(part, ImageDicomContent):
        return part.image_dicom, f"{param}.image_dicom"
    return sources.image_url_value(part.url, settings, param), param


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
    params = req.engine_params(settings)
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
