"""The one internal request type: every API (seed, OpenAI, playground) converts into ``GenerationRequest``.

Validation of meaning (roles, images, limits) happens while building it (``medgemma.inputs``); the engine trusts
it. Nothing here imports torch, transformers or BentoML.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from PIL import Image

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    image: Image.Image
    info: dict[str, Any]  # what was done to it (kind, modality, window, size); never patient data


Part = TextPart | ImagePart


@dataclass(frozen=True)
class Message:
    role: Role
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters after defaults and consistency rules were applied (see ``resolve``)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @classmethod
    def resolve(
        cls, *, max_new_tokens: int, do_sample: bool | None = None, stop: tuple[str, ...] = (), **knobs: Any
    ) -> SamplingParams:
        """Apply the rules once, for every API (``knobs`` are the other fields, by name).

        - ``do_sample`` unset: sampling is on when a sampling parameter asks for it (temperature > 0, top_p, top_k),
          as a caller who sends ``temperature: 0.7`` means; otherwise greedy (the seed's default).
        - ``temperature == 0`` means greedy, as in OpenAI's API.
        - An explicit ``do_sample: false`` with sampling parameters is contradictory and is rejected by the schema
          layer, so no parameter is ever silently ignored.
        """
        temperature = knobs.get("temperature")
        if do_sample is None:
            asks = (temperature is not None and temperature > 0) or knobs.get("top_p") is not None
            do_sample = bool(asks or knobs.get("top_k") is not None)
        if temperature == 0:
            do_sample = False
        return cls(max_new_tokens=max_new_tokens, do_sample=do_sample, stop=stop, **knobs)

    def seed_parameters(self) -> dict[str, Any]:
        """The seed API's ``parameters`` object: every decoding parameter (null when unset) but the seed and stops,
        which the seed's response never echoed."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("seed", "stop")}


ConstraintKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class ConstraintSpec:
    """What the answer must match (``medgemma.structured`` compiles it).

    ``source`` is the canonical text: the schema as compact JSON (key order kept), the regex, the choices as a JSON
    list, or the Lark grammar; ``param`` is the request field, for error messages."""

    kind: ConstraintKind
    source: str
    param: str


@dataclass
class GenerationRequest:
    messages: list[Message]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    adapter: str | None = None  # a LoRA adapter's name (MEDGEMMA_LORA_ADAPTERS); None = the base model
    # For the response only (the engine ignores both): what each image source gave (DICOMweb, series, slides),
    # and whether the caller asked to see the images the model was given.
    image_sources: list[dict[str, Any]] = field(default_factory=list)
    image_previews: bool = False
    constraint: ConstraintSpec | None = None
    include_thinking: bool = True  # False: a thought the model writes is removed from the response
    pad_to_square: bool = False  # images were zero-padded to square (their info says how); boxes map back

    @property
    def images(self) -> list[ImagePart]:
        return [p for m in self.messages for p in m.parts if isinstance(p, ImagePart)]


@dataclass
class Timings:
    """Per-request figures, all in seconds (None when the event did not happen)."""

    queue_wait_s: float | None = None
    time_to_first_token_s: float | None = None
    total_s: float | None = None
    output_tokens_per_second: float | None = None


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    input_tokens: int
    output_tokens: int
    timings: Timings = field(default_factory=Timings)
    token_ids: list[int] = field(default_factory=list)


@dataclass
class TokenDelta:
    """A piece of streamed text, sent as soon as it decodes to whole characters (and cannot start a stop string)."""

    text: str
