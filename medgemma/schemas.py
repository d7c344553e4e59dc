"""Pydantic schemas of the seed API (`/{app}/v1/generate`): request formats exactly as the Ray Serve original.

One base class, one extra-field policy: unknown fields are rejected with a 400 that names them, because a field
the service does not know would otherwise be silently ignored (a misspelt ``max_tokens`` would quietly generate
200 tokens). The OpenAI schemas follow the same policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from medgemma.config import Settings
from medgemma.errors import BadRequest
from medgemma.protocol import SamplingParams


class APIModel(BaseModel):
    # strict: JSON types are not coerced ("200" is not an int, 1 is not a bool) — a client bug gets a 400, not a guess.
    # allow_inf_nan=False: `Infinity`/`NaN` (which Python's JSON parser accepts) are refused, not generated with.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)


# An image in a request: a data URI string in JSON; bytes or a PIL image when it arrived as an uploaded file.
ImageValue = Any


class WindowSpec(APIModel):
    """Override the display window (HU for CT) applied to DICOM and 16-bit images."""

    center: float
    width: Annotated[float, Field(gt=0)]


class TextContent(APIModel):
    type: Literal["text"]
    text: str


class ImageContent(APIModel):
    type: Literal["image"]
    image: ImageValue


class ImageURL(APIModel):
    url: str
    detail: Literal["auto"] | None = None  # images are always processed at the model's resolution


class ImageURLContent(APIModel):
    """OpenAI's image part. What its URL may be (a data URI, or an allow-listed http(s) address) is decided in one
    place for every API: ``medgemma.sources.image_url_value``."""

    type: Literal["image_url"]
    image_url: ImageURL

    @property
    def url(self) -> str:
        """The URL, whether the part carries it as an object or (seed, Google: subclasses) as a plain string."""
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


class SeedImageURLContent(ImageURLContent):
    """The seed chat format also takes the URL as a plain string."""

    image_url: ImageURL | str  # type: ignore[assignment]


class DicomSource(APIModel):
    """A DICOMweb source, the ``image_dicom`` object of Google's MedGemma container.

    ``dicom_source`` names a series (``<root>/studies/<UID>/series/<UID>``), one instance (``.../instances/<UID>``)
    or an ordered list of instance URLs, under a root the operator allow-listed (``MEDGEMMA_DICOMWEB_URLS``).
    ``access_credential`` is sent to that PACS as a bearer token for this request only, never logged or echoed.
    """

    dicom_source: str | Annotated[list[str], Field(min_length=1, max_length=4096)]
    access_credential: Annotated[SecretStr, Field(max_length=16384)] | None = None
    # Google's container can cut given regions out of an instance; this server samples tissue patches itself and
    # refuses the field by name (see medgemma.inputs) rather than ignore it.
    patch_coordinates_list: list[Any] | None = None


class ImageDicomContent(APIModel):
    type: Literal["image_dicom"]
    image_dicom: DicomSource


ContentPart = Annotated[
    TextContent | ImageContent | SeedImageURLContent | ImageDicomContent, Field(discriminator="type")
]


class ChatMessage(APIModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class SamplingFields(APIModel):
    """The sampling parameters both public APIs share, with their ranges: declared once, here.

    ``sampling_params`` turns them into the engine's ``SamplingParams`` by name, so a new parameter is added here,
    in ``protocol.SamplingParams`` and where the engine applies it, and nowhere else. The length field (seed
    ``max_new_tokens``, OpenAI ``max_tokens``/``max_completion_tokens``), ``do_sample`` (seed only) and ``stop``
    (OpenAI only) are each API's own and passed in by it.
    """

    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None

    @model_validator(mode="after")
    def _temperature_zero_is_greedy(self) -> SamplingFields:
        knobs = [n for n in ("top_p", "top_k") if getattr(self, n) is not None]
        if getattr(self, "do_sample", None):
            knobs.append("do_sample: true")
        if self.temperature == 0 and knobs:
            raise ValueError(f"temperature 0 means greedy decoding, which contradicts {', '.join(knobs)}")
        return self

    def sampling_params(
        self,
        settings: Settings,
        *,
        max_new_tokens: int | None,
        do_sample: bool | None = None,
        stop: Sequence[str] = (),
        param: str = "max_new_tokens",
    ) -> SamplingParams:
        """The engine's parameters: the server default and cap applied to the length, the rest by name."""
        max_new = max_new_tokens if max_new_tokens is not None else settings.default_max_new_tokens
        if max_new > settings.max_new_tokens_cap:
            raise BadRequest(
                f"{param}: {max_new} is above this server's limit of {settings.max_new_tokens_cap}", param=param
            )
        knobs = {name: getattr(self, name) for name in SamplingFields.model_fields}
        return SamplingParams.resolve(max_new_tokens=max_new, do_sample=do_sample, stop=tuple(stop), **knobs)


class _SeedLength(APIModel):
    # A base of its own so that the seed's fields keep the seed's order (pydantic lists a later base's fields first).
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None
    do_sample: bool | None = None


class GenerationParameters(SamplingFields, _SeedLength):
    """The seed's generation parameters, with the ranges the issue tracker agreed on."""

    @model_validator(mode="after")
    def _do_sample_false_means_greedy(self) -> GenerationParameters:
        if self.do_sample is False:
            given = [n for n in ("top_p", "top_k") if getattr(self, n) is not None]
            if self.temperature not in (None, 0):
                given.insert(0, "temperature")
            if given:
                verb = "applies" if len(given) == 1 else "apply"
                raise ValueError(f"{', '.join(given)} only {verb} when do_sample is true; remove or set do_sample true")
        return self

    def seed_sampling_params(self, settings: Settings) -> SamplingParams:
        return self.sampling_params(settings, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample)


class JSONSchemaFormat(APIModel):
    """OpenAI's ``response_format.json_schema``: the schema the answer must validate against."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")  # `schema` would shadow a pydantic method
    strict: bool | None = None  # the schema is always enforced; `false` is accepted and changes nothing


class ResponseFormat(APIModel):
    """OpenAI's ``response_format``, on both APIs: plain text, any JSON object, or JSON valid for a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object with name and schema")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema only goes with type json_schema, not {self.type}")
        return self


class StructuredOutputs(APIModel):
    """Constraints beyond OpenAI's, under vLLM's ``structured_outputs`` names: exactly one of them."""

    regex: Annotated[str, Field(min_length=1)] | None = None
    choice: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1024)] | None = None
    grammar: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [n for n in ("regex", "choice", "grammar") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of regex, choice or grammar")
        return self


class AnswerOptions(APIModel):
    """What both APIs accept about the shape of the answer (constraints, thinking, localization)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    pad_to_square: bool = False  # zero-pad images to square as the localization notebook does; boxes map back

    @model_validator(mode="after")
    def _one_constraint(self) -> AnswerOptions:
        fmt = self.response_format
        if self.structured_outputs is not None and fmt is not None and fmt.type != "text":
            raise ValueError(
                f"response_format {fmt.type} and structured_outputs both constrain the answer; send one of them"
            )
        return self


class GenerateRequest(AnswerOptions, GenerationParameters):
    """Simple format (`text`, `system`, `image`/`images`) or chat format (`messages`); never both."""

    text: str | None = None
    system: str | None = None
    image: ImageValue | None = None
    images: list[ImageValue] | None = None
    messages: list[ChatMessage] | None = None
    image_dicom: DicomSource | Annotated[list[DicomSource], Field(min_length=1, max_length=16)] | None = None
    window: WindowSpec | None = None
    dicom_frames: Literal["middle", "first", "all"] | None = None
    image_previews: bool = False  # add a small JPEG of every image the model was given (the playground shows them)
    include_thinking: bool = True  # false: a thought the model writes is left out of the response
    stream: bool = False
    adapter: Annotated[str, Field(min_length=1, max_length=200)] | None = None  # a LoRA adapter's name

    @field_validator("images")
    @classmethod
    def _images_not_empty(cls, v: list[Any] | None) -> list[Any] | None:
        if v is not None and len(v) == 0:
            raise ValueError("images must not be an empty list")
        return v

    @model_validator(mode="after")
    def _one_format(self) -> GenerateRequest:
        simple = (
            self.text is not None
            or self.system is not None
            or self.image is not None
            or self.images
            or self.image_dicom is not None
        )
        if self.messages is not None and simple:
            raise ValueError(
                "use either the simple format (text, system, image, images, image_dicom) or the chat format "
                "(messages), not both"
            )
        if self.messages is None and self.text is None:
            raise ValueError("either text (simple format) or messages (chat format) is required")
        if self.image is not None and self.images:
            raise ValueError("give one image in `image` or several in `images`, not both")
        return self


_TYPE_NAMES = {"str", "int", "float", "bool", "bytes", "dict", "list"}
_PART_TAGS = {
    "text",
    "image",
    "image_url",
    "image_dicom",
    "image_bytes",
}  # discriminator tags pydantic puts after a content part's index


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """A pydantic error as (one readable sentence, the offending field path)."""
    return readable_error(exc.errors(include_url=False, include_input=False))


def readable_error(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    """Pydantic's error list (also as BentoML answers it) as (one readable sentence, the offending field path)."""
    if not errors:
        return "invalid request", None
    # In unions pydantic reports every member's failure; the deepest one is the one that explains the mistake.
    err = max(errors, key=lambda e: len(e.get("loc", ())))
    loc: list[str] = []
    raw = list(err.get("loc", ()))
    for i, p in enumerate(raw):
        # pydantic puts union members (`str`, `list[...]`) and discriminator tags (`text` before the field `text`)
        # into locations; they mean nothing to a client.
        part = str(p)
        is_tag = part in _PART_TAGS and i > 0 and isinstance(raw[i - 1], int) and loc[-2:-1] == ["content"]
        if "[" in part or part in _TYPE_NAMES or is_tag:
            continue
        loc.append(part)
    path = ""
    for part in loc:
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field (not part of this API)"
    if path:
        return f"{path}: {msg}", path
    return msg, None


def parse_model(model: type[APIModel], data: Any) -> Any:
    """Validate ``data`` into ``model`` or raise BadRequest naming the field."""
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise BadRequest(message, param=param) from None
