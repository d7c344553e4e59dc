"""A corpus of bad inputs against real servers: every one answers a 4xx with a message, never a 5xx.

``CORPUS`` below is the table: one ``Case`` per row, ``Case(id, api, request, status, message[, server])``.

* ``api``: ``seed`` (JSON to ``/{app}/v1/generate``), ``seed-multipart`` (a form upload to the same route) or
  ``openai`` (``/v1/chat/completions``);
* ``request``: the JSON body, or ``Raw(...)`` (bytes as they are, optionally chunked without Content-Length),
  or ``Form(...)`` (multipart fields and files); any of them may be a function of the running server (``Srv``),
  for bodies that are big or depend on the model's limits (built only when the case runs);
* ``status``: the expected 4xx; ``message``: a substring the error message must contain (case-insensitive);
* ``server``: ``vlm`` (the tiny image+text demo, default) or ``text`` (the tiny text-only demo).

Both servers run with small limits (``LIMITS``) so that every case stays cheap. For each case the test checks:
the status; the body is one JSON object (never a list); seed bodies are ``{"status": "error", "error": "..."}``
and OpenAI bodies ``{"error": {"message", "type", "param", "code"}}``; no traceback or file path in the body;
and a normal small request on the same API right after answers 200. ``python -m tests.e2e.test_bad_input_corpus``
prints the table as Markdown.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import pytest

pytestmark = pytest.mark.e2e

TIMEOUT = 30.0  # seconds per request; every case answers in under 3 s on a busy 2-core machine
LIMITS = {
    "MEDGEMMA_MAX_BODY_BYTES": "2000000",
    "MEDGEMMA_MAX_IMAGE_BYTES": "1000000",
    "MEDGEMMA_MAX_IMAGE_PIXELS": "4000000",
    "MEDGEMMA_MAX_IMAGES": "4",
    "MEDGEMMA_MAX_TEXT_CHARS": "5000",
    # Above the tiny demo's context (32768), so that "max_new_tokens within the cap but over the context" exists.
    "MEDGEMMA_MAX_NEW_TOKENS_CAP": "40000",
    "MEDGEMMA_DEFAULT_MAX_NEW_TOKENS": "4",
}
MAX_BODY = int(LIMITS["MEDGEMMA_MAX_BODY_BYTES"])
MAX_IMAGES = int(LIMITS["MEDGEMMA_MAX_IMAGES"])
MAX_TEXT = int(LIMITS["MEDGEMMA_MAX_TEXT_CHARS"])
CAP = int(LIMITS["MEDGEMMA_MAX_NEW_TOKENS_CAP"])


# --- what a case sends -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Srv:
    """A running server as the cases see it."""

    url: str
    app: str
    context_length: int
    log: Callable[[], str] = field(repr=False, default=lambda: "")


@dataclass(frozen=True)
class Raw:
    """Bytes sent as they are; ``chunked`` streams them without a Content-Length."""

    content: bytes | Callable[[], bytes]
    content_type: str = "application/json"
    chunked: bool = False


@dataclass(frozen=True)
class Form:
    """A multipart/form-data upload: plain fields and (name, filename, bytes, content type) files."""

    data: dict[str, str]
    files: list[tuple[str, str, bytes, str]] = field(default_factory=list)


API = Literal["seed", "seed-multipart", "openai"]


@dataclass(frozen=True)
class Case:
    id: str
    api: API
    request: Any  # JSON body | Raw | Form | Callable[[Srv], JSON body | Raw | Form]
    status: int
    message: str
    server: Literal["vlm", "text"] = "vlm"


# --- payload builders (lazy and cached: the big ones are built once, when a case needs them) ----------------------


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@functools.cache
def small_png() -> bytes:
    from PIL import Image

    return _png(Image.new("RGB", (40, 32), (90, 160, 30)))


@functools.cache
def truncated_png() -> bytes:
    """A valid header and the first half of the pixel data."""
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(7).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = _png(Image.fromarray(noise))
    return data[: len(data) // 2]


@functools.cache
def bomb_png() -> bytes:
    """A 1x1 PNG whose IHDR claims 20000 x 20000 (CRC recomputed): a decompression bomb's header, 70 bytes."""
    from PIL import Image

    data = bytearray(_png(Image.new("1", (1, 1))))
    data[16:24] = struct.pack(">II", 20000, 20000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@functools.cache
def hundred_megapixel_png() -> bytes:
    """A real 10000 x 10000 1-bit PNG: 100 M pixels in about 12 KB."""
    from PIL import Image

    return _png(Image.new("1", (10000, 10000)))


def malformed_dicom() -> bytes:
    return b"\0" * 128 + b"DICM" + bytes(range(256)) * 4


@functools.cache
def dicom_without_pixels() -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def png_uri() -> str:
    return uri(small_png())


def seed_image(value: str | Callable[[], str]) -> Callable[[Srv], dict[str, Any]]:
    """Seed simple format with one image."""
    return lambda _s: {"text": "Describe", "image": value() if callable(value) else value, "max_new_tokens": 2}


def oai_image(value: str | Callable[[], str]) -> Callable[[Srv], dict[str, Any]]:
    def build(s: Srv) -> dict[str, Any]:
        url = value() if callable(value) else value
        content = [{"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": {"url": url}}]
        return oai(s, [{"role": "user", "content": content}])

    return build


def oai(s: Srv, messages: Any, **extra: Any) -> dict[str, Any]:
    return {"model": s.app, "messages": messages, "max_tokens": 2, **extra}


def oai_body(messages: Any = None, **extra: Any) -> Callable[[Srv], dict[str, Any]]:
    msgs = [{"role": "user", "content": "hi"}] if messages is None else messages
    return lambda s: oai(s, msgs, **extra)


def json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "report", "schema": schema}}


HUGE_SCHEMA = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(2000)}}


def seed(**fields: Any) -> dict[str, Any]:
    return {"text": "q", "max_new_tokens": 2, **fields}


def chat(*messages: tuple[str, Any], **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in messages], "max_new_tokens": 2, **extra}


def over_context_parts(s: Srv) -> list[dict[str, str]]:
    """Text parts, each within the char limit, whose tokens exceed the context (a CJK char is 3 byte tokens)."""
    per_part = MAX_TEXT * 3
    n = s.context_length // per_part + 1
    return [{"type": "text", "text": "\u4e00" * MAX_TEXT} for _ in range(n)]


def huge_json() -> bytes:
    return json.dumps({"text": "q", "image": "data:image/png;base64," + "A" * (MAX_BODY + 100_000)}).encode()


def huge_oai_json() -> bytes:
    return json.dumps({"model": "x", "messages": [{"role": "user", "content": "A" * (MAX_BODY + 100_000)}]}).encode()


def png_file(data: Callable[[], bytes] = small_png, name: str = "image") -> Callable[[Srv], Form]:
    return lambda _s: Form({"text": '"Describe"', "max_new_tokens": "2"}, [(name, "x.png", data(), "image/png")])


U, A, S = "user", "assistant", "system"
BAD_B64 = "data:image/png;base64,@@not*base64@@"

# --- the corpus ----------------------------------------------------------------------------------------------------
# fmt: off
CORPUS: list[Case] = [
    # ---- seed API, images (JSON data URIs) ----
    Case("seed-bad-base64", "seed", seed(image=BAD_B64), 400, "base64"),
    Case("seed-data-uri-not-an-image", "seed", seed(image=uri(b"hello, world", "text/plain")), 400,
         "not a recognised image"),
    Case("seed-truncated-png", "seed", seed_image(lambda: uri(truncated_png())), 400, "truncated"),
    Case("seed-png-bomb-20000x20000", "seed", seed_image(lambda: uri(bomb_png())), 413, "pixels"),
    Case("seed-100-megapixel-png", "seed", seed_image(lambda: uri(hundred_megapixel_png())), 413, "pixels"),
    Case("seed-image-over-byte-limit", "seed", seed_image(lambda: uri(b"\x89PNG" + b"\0" * 1_100_000)), 413,
         "bytes"),
    Case("seed-pdf-as-image", "seed", seed(image=uri(b"%PDF-1.7\n" + b"x" * 64, "application/pdf")), 415, "PDF"),
    Case("seed-malformed-dicom", "seed", seed_image(lambda: uri(malformed_dicom(), "application/dicom")), 400,
         "DICOM"),
    Case("seed-dicom-without-pixel-data", "seed",
         seed_image(lambda: uri(dicom_without_pixels(), "application/dicom")), 400, "no pixel data"),
    Case("seed-http-url-image", "seed", seed(image="https://example.org/xray.png"), 400, "URL"),
    Case("seed-image-url-part-http", "seed",
         chat((U, [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}])), 400, "not fetched"),
    Case("seed-image-number", "seed", seed(image=7), 400, "image"),
    Case("seed-empty-images-list", "seed", seed(images=[]), 400, "empty"),
    Case("seed-image-and-images", "seed", lambda _s: seed(image=png_uri(), images=[png_uri()]), 400, "not both"),
    Case("seed-too-many-images", "seed", lambda _s: seed(images=[png_uri()] * (MAX_IMAGES + 1)), 413, "images"),
    Case("seed-image-in-system-message", "seed",
         lambda _s: chat((S, [{"type": "image", "image": png_uri()}]), (U, "q")), 400, "user messages"),
    Case("seed-window-width-zero", "seed", lambda _s: seed(image=png_uri(), window={"center": 40, "width": 0}),
         400, "window"),
    # ---- seed API, wrong types: every parameter ----
    Case("seed-type-text", "seed", {"text": 12}, 400, "text"),
    Case("seed-type-system", "seed", seed(system=["a"]), 400, "system"),
    Case("seed-type-messages", "seed", {"messages": "hello"}, 400, "messages"),
    Case("seed-type-max_new_tokens", "seed", seed(max_new_tokens="lots"), 400, "max_new_tokens"),
    Case("seed-type-max_new_tokens-fraction", "seed", seed(max_new_tokens=2.5), 400, "max_new_tokens"),
    Case("seed-type-do_sample", "seed", seed(do_sample={"yes": True}), 400, "do_sample"),
    Case("seed-type-temperature", "seed", seed(temperature="hot"), 400, "temperature"),
    Case("seed-type-top_p", "seed", seed(top_p=[0.5]), 400, "top_p"),
    Case("seed-type-top_k", "seed", seed(top_k=2.5), 400, "top_k"),
    Case("seed-type-repetition_penalty", "seed", seed(repetition_penalty="x"), 400, "repetition_penalty"),
    Case("seed-type-seed", "seed", seed(seed="abc"), 400, "seed"),
    Case("seed-type-window", "seed", seed(window="wide"), 400, "window"),
    Case("seed-type-dicom_frames", "seed", seed(dicom_frames="middle-ish"), 400, "dicom_frames"),
    Case("seed-type-stream", "seed", seed(stream="yes please"), 400, "stream"),
    Case("seed-type-images", "seed", seed(images="data:image/png;base64,AAAA"), 400, "images"),
    # ---- seed API, out of range: both sides where there are two ----
    Case("seed-max_new_tokens-zero", "seed", seed(max_new_tokens=0), 400, "max_new_tokens"),
    Case("seed-max_new_tokens-over-cap", "seed", seed(max_new_tokens=CAP + 1), 400, "max_new_tokens"),
    Case("seed-temperature-negative", "seed", seed(temperature=-0.1), 400, "temperature"),
    Case("seed-temperature-over-2", "seed", seed(temperature=2.1), 400, "temperature"),
    Case("seed-top_p-zero", "seed", seed(top_p=0), 400, "top_p"),
    Case("seed-top_p-over-1", "seed", seed(top_p=1.01), 400, "top_p"),
    Case("seed-top_k-zero", "seed", seed(top_k=0), 400, "top_k"),
    Case("seed-repetition_penalty-zero", "seed", seed(repetition_penalty=0), 400, "repetition_penalty"),
    Case("seed-repetition_penalty-infinity", "seed",
         Raw(b'{"text": "q", "max_new_tokens": 2, "repetition_penalty": Infinity}'), 400, "repetition_penalty"),
    Case("seed-seed-negative", "seed", seed(seed=-1), 400, "seed"),
    Case("seed-seed-over-int64", "seed", seed(seed=2**63), 400, "seed"),
    Case("seed-do_sample-false-with-temperature", "seed", seed(do_sample=False, temperature=0.7), 400, "do_sample"),
    Case("seed-max_new_tokens-over-context", "seed", lambda s: seed(max_new_tokens=s.context_length), 400,
         "context"),
    Case("seed-prompt-over-context", "seed", lambda s: chat((U, over_context_parts(s))), 400, "context"),
    Case("seed-text-over-char-limit", "seed", seed(text="a" * (MAX_TEXT + 1)), 413, "characters"),
    Case("seed-system-over-char-limit", "seed", seed(system="a" * (MAX_TEXT + 1)), 413, "characters"),
    # ---- seed API, formats and roles ----
    Case("seed-unknown-field", "seed", seed(max_tokens=5), 400, "max_tokens"),
    Case("seed-unknown-field-in-message", "seed", {"messages": [{"role": U, "content": "q", "name": "x"}]}, 400,
         "name"),
    Case("seed-text-and-messages", "seed", {"text": "q", "messages": [{"role": U, "content": "a"}]}, 400,
         "not both"),
    Case("seed-neither-text-nor-messages", "seed", {"system": "s"}, 400, "required"),
    Case("seed-empty-messages", "seed", {"messages": []}, 400, "at least one"),
    Case("seed-non-alternating-roles", "seed", chat((U, "a"), (U, "b")), 400, "alternate"),
    Case("seed-system-not-first", "seed", chat((U, "a"), (S, "b"), (U, "c")), 400, "system message"),
    Case("seed-last-message-assistant", "seed", chat((U, "a"), (A, "b")), 400, "last message"),
    Case("seed-only-system", "seed", chat((S, "be brief")), 400, "user message"),
    Case("seed-unknown-role", "seed", chat(("doctor", "q")), 400, "role"),
    Case("seed-empty-content", "seed", chat((U, "")), 400, "empty"),
    Case("seed-empty-content-list", "seed", chat((U, [])), 400, "empty"),
    Case("seed-unknown-content-type", "seed", chat((U, [{"type": "audio", "audio": "x"}])), 400, "type"),
    Case("seed-stream-with-bad-parameter", "seed", seed(stream=True, temperature=5), 400, "temperature"),
    # ---- seed API, bodies ----
    Case("seed-non-json-body", "seed", Raw(b"this is not json"), 400, "JSON"),
    Case("seed-truncated-json-body", "seed", Raw(b'{"text": "q"'), 400, "JSON"),
    Case("seed-json-list-body", "seed", Raw(b'[{"text": "q"}]'), 400, "object"),
    Case("seed-json-string-body", "seed", Raw(b'"just a string"'), 400, "object"),
    Case("seed-json-number-body", "seed", Raw(b"42"), 400, "object"),
    Case("seed-huge-body", "seed", Raw(huge_json), 413, f"limit of {MAX_BODY} bytes"),
    Case("seed-huge-body-chunked", "seed", Raw(huge_json, chunked=True), 413, f"limit of {MAX_BODY} bytes"),
    # ---- seed API, multipart form uploads ----
    Case("form-truncated-png", "seed-multipart", png_file(truncated_png), 400, "truncated"),
    Case("form-png-bomb", "seed-multipart", png_file(bomb_png), 413, "pixels"),
    Case("form-100-megapixel-png", "seed-multipart", png_file(hundred_megapixel_png), 413, "pixels"),
    Case("form-malformed-dicom", "seed-multipart",
         lambda _s: Form({"text": '"q"'}, [("image", "x.dcm", malformed_dicom(), "application/dicom")]), 400,
         "DICOM"),
    Case("form-pdf-as-image", "seed-multipart",
         lambda _s: Form({"text": '"q"'}, [("image", "x.pdf", b"%PDF-1.7\n" + b"x" * 64, "application/pdf")]), 415,
         "PDF"),
    Case("form-url-as-image-value", "seed-multipart", Form({"text": '"q"', "image": "https://example.org/x.png"}),
         400, "URL"),
    Case("form-bad-data-uri-value", "seed-multipart", Form({"text": '"q"', "image": BAD_B64}), 400, "base64"),
    Case("form-type-max_new_tokens", "seed-multipart", Form({"text": '"q"', "max_new_tokens": "lots"}), 400,
         "max_new_tokens"),
    Case("form-temperature-over-2", "seed-multipart", Form({"text": '"q"', "temperature": "5"}), 400,
         "temperature"),
    Case("form-too-many-images", "seed-multipart",
         lambda _s: Form({"text": '"q"'}, [("images", "x.png", small_png(), "image/png")] * (MAX_IMAGES + 1)), 413,
         "images"),
    Case("form-binary-file-as-text", "seed-multipart",
         lambda _s: Form({"max_new_tokens": "2"}, [("text", "x.png", small_png(), "image/png")]), 400, "text"),
    Case("form-file-in-unknown-field", "seed-multipart", png_file(name="scan"), 400, "scan"),
    Case("form-missing-boundary", "seed-multipart", Raw(b"garbage", "multipart/form-data"), 400, "boundary"),
    Case("form-garbage-body", "seed-multipart", Raw(b"--b\r\n[]--b--\r\n", "multipart/form-data; boundary=b"), 400,
         "multipart"),
    Case("seed-json_schema-invalid", "seed", seed(response_format=json_schema({"type": "strin"})), 400, "strin"),
    Case("seed-json_schema-unsupported-keyword", "seed",
         seed(response_format=json_schema({"type": "array", "uniqueItems": True})), 400, "uniqueItems"),
    Case("seed-json_schema-huge", "seed", seed(response_format=json_schema(HUGE_SCHEMA)), 400, "bytes"),
    Case("seed-json_schema-and-choice", "seed",
         seed(response_format=json_schema({"type": "object"}), structured_outputs={"choice": ["a"]}), 400,
         "send one of them"),
    Case("seed-regex-with-thinking-tag", "seed", seed(structured_outputs={"regex": "<unused95>yes"}), 400,
         "thinking tags"),
    Case("seed-structured_outputs-unknown", "seed", seed(structured_outputs={"json": {}}), 400, "json"),
    Case("seed-pad_to_square-string", "seed", seed(pad_to_square="yes"), 400, "pad_to_square"),
    Case("text-json_schema-unsupported-keyword", "seed",
         seed(response_format=json_schema({"type": "object", "not": {}})), 400, "not", server="text"),
    Case("form-unknown-field", "seed-multipart", Form({"text": '"q"', "max_new_tokens": "2", "max_tokens": "5"}),
         400, "max_tokens"),
    # ---- OpenAI API ----
    Case("oai-n-2", "openai", oai_body(n=2), 400, "n: "),
    Case("oai-unknown-model", "openai", {"model": "gpt-4o", "messages": [{"role": U, "content": "hi"}]}, 404,
         "not served"),
    Case("oai-missing-model", "openai", {"messages": [{"role": U, "content": "hi"}]}, 400, "model"),
    Case("seed-unknown-adapter", "seed", seed(adapter="radiology-v2"), 404, "not served"),
    Case("seed-adapter-not-a-string", "seed", seed(adapter=3), 400, "adapter"),
    Case("seed-adapter-empty", "seed", seed(adapter=""), 400, "adapter"),
    Case("oai-logprobs-true", "openai", oai_body(logprobs=True), 400, "logprobs"),
    Case("oai-frequency_penalty", "openai", oai_body(frequency_penalty=0.5), 400, "frequency_penalty"),
    Case("oai-response_format-yaml", "openai", oai_body(response_format={"type": "yaml"}), 400,
         "response_format"),
    Case("oai-json_schema-missing", "openai", oai_body(response_format={"type": "json_schema"}), 400,
         "needs a json_schema"),
    Case("oai-json_schema-invalid", "openai",
         oai_body(response_format=json_schema({"type": "object", "required": "a"})), 400, "not a valid JSON Schema"),
    Case("oai-json_schema-unsupported-keyword", "openai",
         oai_body(response_format=json_schema({"type": "object", "if": {"required": ["a"]}})), 400,
         "Unimplemented keys"),
    Case("oai-json_schema-huge", "openai", oai_body(response_format=json_schema(HUGE_SCHEMA)), 400,
         "MEDGEMMA_MAX_CONSTRAINT_BYTES"),
    Case("oai-response_format-and-regex", "openai",
         oai_body(response_format={"type": "json_object"}, structured_outputs={"regex": "yes|no"}), 400,
         "send one of them"),
    Case("oai-regex-invalid", "openai", oai_body(structured_outputs={"regex": "(yes|no"}), 400, "regex"),
    Case("oai-choice-empty", "openai", oai_body(structured_outputs={"choice": []}), 400, "choice"),
    Case("oai-grammar-invalid", "openai", oai_body(structured_outputs={"grammar": "start: nowhere"}), 400, "nowhere"),
    Case("oai-include_reasoning-string", "openai", oai_body(include_reasoning="no"), 400, "include_reasoning"),
    Case("oai-unknown-field", "openai", oai_body(best_of=3), 400, "best_of"),
    Case("oai-max_tokens-string", "openai", oai_body(max_tokens="many"), 400, "max_tokens"),
    Case("oai-max_tokens-zero", "openai", oai_body(max_tokens=0), 400, "max_tokens"),
    Case("oai-max_tokens-over-cap", "openai", oai_body(max_tokens=CAP + 1), 400, "max_tokens: "),
    Case("oai-max_tokens-disagree", "openai", oai_body(max_completion_tokens=3), 400, "disagree"),
    Case("oai-temperature-negative", "openai", oai_body(temperature=-1), 400, "temperature"),
    Case("oai-temperature-over-2", "openai", oai_body(temperature=3), 400, "temperature"),
    Case("oai-top_p-zero", "openai", oai_body(top_p=0), 400, "top_p"),
    Case("oai-top_p-over-1", "openai", oai_body(top_p=1.5), 400, "top_p"),
    Case("oai-top_k-zero", "openai", oai_body(top_k=0), 400, "top_k"),
    Case("oai-repetition_penalty-negative", "openai", oai_body(repetition_penalty=-1), 400, "repetition_penalty"),
    Case("oai-repetition_penalty-infinity", "openai",
         lambda s: Raw(json.dumps(oai(s, [{"role": U, "content": "hi"}], repetition_penalty=float("inf"))).encode()),
         400, "repetition_penalty"),
    Case("oai-seed-negative", "openai", oai_body(seed=-1), 400, "seed"),
    Case("oai-seed-over-int64", "openai", oai_body(seed=2**63), 400, "seed"),
    Case("oai-type-model", "openai", {"model": 5, "messages": [{"role": U, "content": "hi"}]}, 400, "model"),
    Case("oai-type-temperature", "openai", oai_body(temperature="hot"), 400, "temperature"),
    Case("oai-type-top_p", "openai", oai_body(top_p=[1]), 400, "top_p"),
    Case("oai-type-stop", "openai", oai_body(stop=5), 400, "stop"),
    Case("oai-type-seed", "openai", oai_body(seed="x"), 400, "seed"),
    Case("oai-type-stream", "openai", oai_body(stream="yes"), 400, "stream"),
    Case("oai-type-stream_options", "openai", oai_body(stream_options="usage"), 400, "stream_options"),
    Case("oai-type-user", "openai", oai_body(user=5), 400, "user"),
    Case("oai-type-content-part", "openai", oai_body([{"role": U, "content": [{"type": "text", "text": 5}]}]), 400,
         "text"),
    Case("oai-stop-empty", "openai", oai_body(stop=""), 400, "stop"),
    Case("oai-stop-too-many", "openai", oai_body(stop=[str(i) for i in range(9)]), 400, "stop"),
    Case("oai-messages-string", "openai", oai_body("hello"), 400, "messages"),
    Case("oai-empty-messages", "openai", oai_body([]), 400, "at least one"),
    Case("oai-non-alternating-roles", "openai", oai_body([{"role": U, "content": "a"}] * 2), 400, "alternate"),
    Case("oai-system-not-first", "openai",
         oai_body([{"role": U, "content": "a"}, {"role": S, "content": "b"}, {"role": U, "content": "c"}]), 400,
         "system message"),
    Case("oai-last-message-assistant", "openai",
         oai_body([{"role": U, "content": "a"}, {"role": A, "content": "b"}]), 400, "last message"),
    Case("oai-unknown-role", "openai", oai_body([{"role": "tool", "content": "x"}]), 400, "role"),
    Case("oai-empty-content", "openai", oai_body([{"role": U, "content": "  "}]), 400, "empty"),
    Case("oai-user-content-null", "openai", oai_body([{"role": U, "content": None}]), 400, "content"),
    Case("oai-image-in-system-message", "openai",
         lambda s: oai(s, [{"role": S, "content": [{"type": "image_url", "image_url": {"url": png_uri()}}]},
                           {"role": U, "content": "q"}]), 400, "user messages"),
    Case("oai-bad-base64", "openai", oai_image(BAD_B64), 400, "base64"),
    Case("oai-http-url-image", "openai", oai_image("https://example.org/x.png"), 400, "allow-listed"),
    Case("oai-truncated-png", "openai", oai_image(lambda: uri(truncated_png())), 400, "truncated"),
    Case("oai-100-megapixel-png", "openai", oai_image(lambda: uri(hundred_megapixel_png())), 413, "pixels"),
    Case("oai-malformed-dicom", "openai", oai_image(lambda: uri(malformed_dicom(), "application/dicom")), 400,
         "DICOM"),
    Case("oai-too-many-images", "openai",
         lambda s: oai(s, [{"role": U, "content": [{"type": "image_url", "image_url": {"url": png_uri()}}]
                            * (MAX_IMAGES + 1)}]), 413, "images"),
    Case("oai-text-over-char-limit", "openai", oai_body([{"role": U, "content": "a" * (MAX_TEXT + 1)}]), 413,
         "characters"),
    Case("oai-prompt-over-context", "openai", lambda s: oai(s, [{"role": U, "content": over_context_parts(s)}]),
         400, "context"),
    Case("oai-max_tokens-over-context", "openai", lambda s: oai(s, [{"role": U, "content": "hi"}],
                                                                max_tokens=s.context_length), 400, "context"),
    Case("oai-stream-with-bad-parameter", "openai", oai_body(stream=True, n=2), 400, "n: "),
    Case("oai-non-json-body", "openai", Raw(b"nope"), 400, "JSON"),
    Case("oai-json-list-body", "openai", Raw(b"[1, 2]"), 400, "object"),
    Case("oai-json-string-body", "openai", Raw(b'"hello"'), 400, "object"),
    Case("oai-huge-body", "openai", Raw(huge_oai_json), 413, f"limit of {MAX_BODY} bytes"),
    Case("oai-huge-body-chunked", "openai", Raw(huge_oai_json, chunked=True), 413, f"limit of {MAX_BODY} bytes"),
    # ---- the text-only model ----
    Case("text-seed-image", "seed", lambda _s: seed(image=png_uri()), 400, "text-only", "text"),
    Case("text-seed-chat-image", "seed", lambda _s: chat((U, [{"type": "image", "image": png_uri()}])), 400,
         "text-only", "text"),
    Case("text-form-image-upload", "seed-multipart", png_file(), 400, "text-only", "text"),
    Case("text-oai-image", "openai", oai_image(png_uri), 400, "text-only", "text"),
    Case("text-seed-prompt-over-context", "seed", lambda s: chat((U, over_context_parts(s))), 400, "context",
         "text"),
    Case("text-oai-unknown-model", "openai", {"model": "medgemma-4b-it", "messages": [{"role": U, "content": "x"}]},
         404, "not served", "text"),
]
# fmt: on


def markdown_table() -> str:
    rows = ["| id | API | server | status | message contains |", "|---|---|---|---|---|"]
    rows += [f"| {c.id} | {c.api} | {c.server} | {c.status} | {c.message} |" for c in CORPUS]
    return "\n".join(rows)


# --- servers -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tiny_vlm, tiny_text, tmp_path_factory) -> Iterator[dict[str, Srv]]:
    """Both servers, started side by side (each takes seconds to boot)."""
    from tests.conftest import bentoml_serve, wait_for_model

    specs = {"vlm": tiny_vlm, "text": tiny_text}
    managers = {
        kind: bentoml_serve({"MEDGEMMA_MODEL": str(path), **LIMITS}, tmp_path_factory.mktemp(f"corpus-{kind}"))
        for kind, path in specs.items()
    }
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        futures = {kind: pool.submit(cm.__enter__) for kind, cm in managers.items()}
        running = {}
        errors = []
        for kind, fut in futures.items():
            try:
                running[kind] = fut.result()
                stack.push(managers[kind])
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        out = {}
        for kind, server in running.items():
            app = specs[kind].name
            assert wait_for_model(server.url, app)["model_state"] == "ready"
            limits = httpx.get(f"{server.url}/{app}/v1/schema", timeout=TIMEOUT).json()["limits"]
            out[kind] = Srv(server.url, app, int(limits["context_length"]), server.log)
        yield out


# --- the test --------------------------------------------------------------------------------------------------------


def send(case: Case, s: Srv) -> httpx.Response:
    url = f"{s.url}/v1/chat/completions" if case.api == "openai" else f"{s.url}/{s.app}/v1/generate"
    request = case.request(s) if callable(case.request) else case.request
    if isinstance(request, Raw):
        content = request.content() if callable(request.content) else request.content
        body: Any = content
        if request.chunked:

            def chunks(data: bytes = content) -> Iterator[bytes]:
                for i in range(0, len(data), 64 * 1024):
                    yield data[i : i + 64 * 1024]

            body = chunks()
        return httpx.post(url, content=body, headers={"content-type": request.content_type}, timeout=TIMEOUT)
    if isinstance(request, Form):
        files = [(name, (fname, data, ctype)) for name, fname, data, ctype in request.files]
        if not files:  # httpx would send form-urlencoded: build the multipart body by hand
            return _post_multipart(url, request.data)
        return httpx.post(url, data=request.data, files=files, timeout=TIMEOUT)
    return httpx.post(url, json=request, timeout=TIMEOUT)


def _post_multipart(url: str, data: dict[str, str]) -> httpx.Response:
    """A multipart/form-data body of plain fields only (httpx would send form-urlencoded)."""
    return httpx.post(url, content=_multipart(data), timeout=TIMEOUT,
                      headers={"content-type": "multipart/form-data; boundary=corpusboundary"})  # fmt: skip


def _multipart(data: dict[str, str]) -> bytes:
    out = b""
    for name, value in data.items():
        out += f'--corpusboundary\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    return out + b"--corpusboundary--\r\n"


def normal_request(api: API, s: Srv) -> httpx.Response:
    if api == "openai":
        body = {"model": s.app, "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 2}
        return httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=TIMEOUT)
    body = {"text": "still there?", "max_new_tokens": 2}
    return httpx.post(f"{s.url}/{s.app}/v1/generate", json=body, timeout=TIMEOUT)


def error_message(case: Case, body: dict[str, Any]) -> str:
    if case.api == "openai":
        err = body.get("error")
        assert isinstance(err, dict), body
        assert set(err) >= {"message", "type", "param", "code"}, body
        assert isinstance(err["type"], str) and err["type"], body
        message = err["message"]
    else:
        assert body.get("status") == "error", body
        message = body.get("error")
    assert isinstance(message, str) and message.strip(), body
    return message


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_bad_input(case: Case, servers: dict[str, Srv]) -> None:
    s = servers[case.server]
    try:
        r = send(case, s)
    except httpx.TimeoutException:
        pytest.fail(f"{case.id}: no answer within {TIMEOUT} s (hang)\n{s.log()[-3000:]}")
    except httpx.TransportError as exc:
        pytest.fail(f"{case.id}: the connection failed without an answer ({exc!r})\n{s.log()[-3000:]}")
    context = f"{case.id}: HTTP {r.status_code} {r.text[:600]}"
    if r.status_code >= 500:
        context += f"\n--- server log (tail) ---\n{s.log()[-3000:]}"
    assert r.status_code == case.status, context
    assert "Traceback" not in r.text and 'File "' not in r.text, context
    assert r.headers.get("content-type", "").startswith("application/json"), context
    body = r.json()
    assert isinstance(body, dict), context
    message = error_message(case, body)
    assert case.message.lower() in message.lower(), context

    after = normal_request(case.api, s)
    assert after.status_code == 200, f"{case.id}: the normal request after it answered {after.status_code} {after.text}"


def test_corpus_is_wide_enough() -> None:
    assert len(CORPUS) >= 40
    assert len({c.id for c in CORPUS}) == len(CORPUS), "case ids must be unique"
    kinds = {(c.api, c.server) for c in CORPUS}
    assert {
        ("seed", "vlm"),
        ("seed-multipart", "vlm"),
        ("openai", "vlm"),
        ("seed", "text"),
        ("openai", "text"),
    } <= kinds
    assert all(400 <= c.status < 500 for c in CORPUS)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
