"""OpenAI chat completions: request validation, conversion into the internal request, URL fetching, response shapes."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from medgemma import inputs, openai_api, sources
from medgemma.config import Settings
from medgemma.errors import BadRequest, NotFound, PayloadTooLarge, ServiceError
from medgemma.protocol import GenerationRequest, GenerationResult, ImagePart, Message, SamplingParams, TextPart, Timings
from medgemma.schemas import GenerateRequest, parse_model
from tests.helpers import png_bytes, png_data_uri

SETTINGS = Settings(model="google/medgemma-4b-it")
PNG = png_bytes((20, 120, 200), (24, 16))


def parse(**body: Any) -> openai_api.ChatCompletionRequest:
    body.setdefault("model", "medgemma-4b-it")
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return parse_model(openai_api.ChatCompletionRequest, body)


def convert(settings: Settings = SETTINGS, *, vision: bool = True, **body: Any) -> GenerationRequest:
    return openai_api.to_generation_request(parse(**body), settings, vision=vision, request_id="rid-1")


def shape(req: GenerationRequest) -> list[tuple[str, list[str]]]:
    return [(m.role, [f"text:{p.text}" if isinstance(p, TextPart) else "image" for p in m.parts]) for m in req.messages]


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"max_tokens": 5, "max_completion_tokens": 6}, "disagree"),
        ({"temperature": 0, "top_p": 0.9}, "temperature 0"),
        ({"temperature": 0, "top_k": 5}, "temperature 0"),
        ({"stop": ""}, "must not be empty"),
        ({"stop": ["ok", ""]}, "must not be empty"),
        ({"stop": [f"s{i}" for i in range(9)]}, "stop"),
        ({"n": 2}, "n"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": 1}, "presence_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "xml"}}, "response_format"),  # json_object and json_schema are served
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),  # strict: no coercion of JSON types
        ({"bogus_field": 1}, "bogus_field"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, "messages"),
    ],
)
def test_invalid_requests_are_400s_that_name_the_problem(body, words):
    with pytest.raises(BadRequest) as err:
        parse(**body)
    assert words in err.value.message


def test_neutral_values_of_unimplemented_fields_are_accepted():
    req = parse(n=1, frequency_penalty=0, presence_penalty=0, logprobs=False, response_format={"type": "text"})
    assert req.n == 1


def test_parameters_prefer_max_completion_tokens_and_carry_extensions():
    req = parse(max_completion_tokens=7, temperature=0.5, top_p=0.9, top_k=4, repetition_penalty=1.2, seed=3)
    p = req.engine_params(SETTINGS)
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.seed) == (7, 0.5, 0.9, 4, 1.2, 3)
    assert p.do_sample is True
    assert parse(max_tokens=9).engine_params(SETTINGS).max_new_tokens == 9
    assert parse().engine_params(SETTINGS).max_new_tokens == SETTINGS.default_max_new_tokens
    assert parse(stop="END").engine_params(SETTINGS).stop == ("END",)
    with pytest.raises(BadRequest) as err:  # the cap names the field this API calls it
        parse(max_completion_tokens=SETTINGS.max_new_tokens_cap + 1).engine_params(SETTINGS)
    assert err.value.param == "max_completion_tokens"


def test_empty_messages_are_refused_by_the_one_conversation_check():
    # Not a schema rule: inputs.check_conversation refuses it for every API, so it is written once.
    with pytest.raises(BadRequest) as err:
        convert(messages=[])
    assert "at least one message" in err.value.message and err.value.param == "messages"


@pytest.mark.parametrize(("stop", "expected"), [(None, ()), ("END", ("END",)), (["a", "b"], ("a", "b"))])
def test_stop_list(stop, expected):
    assert parse(stop=stop).stop_list() == expected


def test_adapter_of_accepts_the_route_name_the_source_and_adapters():
    assert openai_api.adapter_of("medgemma-4b-it", SETTINGS) is None
    assert openai_api.adapter_of("google/medgemma-4b-it", SETTINGS) is None
    assert openai_api.adapter_of(None, SETTINGS) is None  # Google's format may leave the model out
    with_adapter = SETTINGS.replace(lora_adapters=("radiology=/adapters/radiology",))
    assert openai_api.adapter_of("radiology", with_adapter) == "radiology"
    with pytest.raises(NotFound) as err:
        openai_api.adapter_of("gpt-4o", with_adapter)
    assert err.value.status_code == 404 and err.value.param == "model"
    assert "medgemma-4b-it" in err.value.message and "radiology" in err.value.message  # says which names to use


# ------------------------------------------------------------------------------------------------ conversion


def test_conversation_becomes_the_internal_request():
    image = {"type": "image_url", "image_url": {"url": png_data_uri(PNG)}}
    req = convert(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Look:"}, image]},
            {"role": "assistant", "content": None},
            {"role": "user", "content": "And now?"},
        ]
    )
    assert shape(req) == [
        ("system", ["text:Be brief."]),  # developer is OpenAI's new name for system
        ("user", ["text:Look:", "image"]),
        ("assistant", ["text:"]),
        ("user", ["text:And now?"]),
    ]
    part = req.images[0]
    assert isinstance(part, ImagePart) and part.info["source"] == "png" and part.image.size[0] > 0
    assert req.request_id == "rid-1"


def test_sampling_rules_and_defaults_are_applied():
    greedy = convert().params
    assert greedy == SamplingParams(max_new_tokens=SETTINGS.default_max_new_tokens, do_sample=False)
    sampled = convert(temperature=0.7, max_tokens=5, stop=["\n\n"], seed=1).params
    assert (sampled.do_sample, sampled.temperature, sampled.max_new_tokens, sampled.stop, sampled.seed) == (
        True,
        0.7,
        5,
        ("\n\n",),
        1,
    )
    assert convert(temperature=0).params.do_sample is False


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi", "name": "dr-x"}]}, 400, "messages[0].name"),
        ({"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),  # must end with the user
        ({"max_tokens": SETTINGS.max_new_tokens_cap + 1}, 400, "max_tokens"),  # the name this API uses
        ({"messages": [{"role": "user", "content": "x" * (SETTINGS.max_text_chars + 1)}]}, 413, "messages[0]"),
    ],
)
def test_conversion_refuses_what_gemma_cannot_take(body, status, param):
    with pytest.raises(ServiceError) as err:
        convert(**body)
    assert err.value.status_code == status
    assert err.value.param == param


def test_images_to_a_text_only_model_are_refused():
    image = {"type": "image_url", "image_url": {"url": png_data_uri(PNG)}}
    with pytest.raises(BadRequest) as err:
        convert(vision=False, messages=[{"role": "user", "content": [image]}])
    assert "text-only" in err.value.message


def test_image_urls_need_an_allow_listed_domain_name():
    url = {"type": "image_url", "image_url": {"url": "https://example.org/xray.png"}}
    with pytest.raises(BadRequest) as err:
        convert(messages=[{"role": "user", "content": [url]}])
    assert "MEDGEMMA_IMAGE_URL_DOMAINS" in err.value.message
    assert err.value.param == "messages[0].content[0]"
    by_ip = Settings(model="m", image_url_domains=("127.0.0.1",))
    with pytest.raises(BadRequest, match="not an IP address"):
        sources.fetch_image("http://127.0.0.1:1/x.png", by_ip, "p")
    lookalike = Settings(model="m", image_url_domains=("example.org",))
    with pytest.raises(BadRequest, match="allow-listed"):
        sources.fetch_image("https://evilexample.org/x.png", lookalike, "p")


# ------------------------------------------------------------------------------------------------ fetching URLs


class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}
    fetched: ClassVar[list[str]] = []  # every path asked for, in order

    def do_GET(self) -> None:
        self.fetched.append(self.path)
        status, headers, body = self.routes.get(self.path, (404, {}, b"not here"))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """A real HTTP server on loopback, reached by the domain name `localhost`."""
    _Handler.routes = {
        "/xray.png": (200, {"Content-Type": "image/png"}, PNG),
        "/big.png": (200, {"Content-Type": "image/png"}, PNG + b"\0" * 4096),
        "/moved.png": (301, {"Location": "/xray.png"}, b""),
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        with contextlib.suppress(Exception):
            server.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server fetches with the environment's proxy settings; the test server is on loopback."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def test_allow_listed_image_url_is_fetched_and_decoded(image_host):
    settings = Settings(model="google/medgemma-4b-it", image_url_domains=("localhost",))
    part = {"type": "image_url", "image_url": {"url": f"{image_host}/xray.png"}}
    req = convert(settings, messages=[{"role": "user", "content": [{"type": "text", "text": "?"}, part]}])
    assert req.images[0].info["source"] == "png"
    fetched = sources.fetch_image(f"{image_host}/xray.png", settings, "p")
    assert fetched.data == PNG and fetched.media_type == "image/png"


def test_each_image_url_of_a_seed_chat_message_is_fetched_once(image_host):
    # Several image values in one message are read once to look for a CT series, then decoded from what was read.
    settings = Settings(model="google/medgemma-4b-it", image_url_domains=("localhost",))
    url = {"type": "image_url", "image_url": f"{image_host}/xray.png"}
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "?"}, url, url]}]}
    _Handler.fetched.clear()
    req = inputs.from_seed(parse_model(GenerateRequest, body), settings, vision=True)
    assert len(req.images) == 2 and all(im.info["source"] == "png" for im in req.images)
    assert _Handler.fetched == ["/xray.png", "/xray.png"]


@pytest.mark.parametrize(
    ("path", "error", "words"),
    [
        ("/missing.png", BadRequest, "HTTP 404"),
        ("/moved.png", BadRequest, "HTTP 301"),  # redirects are not followed: they could leave the allow-list
        ("/big.png", PayloadTooLarge, "above"),
    ],
)
def test_image_url_failures_are_client_errors(image_host, path, error, words):
    settings = Settings(model="m", image_url_domains=("localhost",), max_image_bytes=len(PNG) + 100)
    with pytest.raises(error) as err:
        sources.fetch_image(image_host + path, settings, "messages[0].content[1]")
    assert words in err.value.message
    assert err.value.param == "messages[0].content[1]"


def test_unreachable_image_url_is_a_400():
    settings = Settings(model="m", image_url_domains=("localhost",))
    with pytest.raises(BadRequest, match="could not be fetched"):
        sources.fetch_image("http://localhost:1/x.png", settings, "p")


# ------------------------------------------------------------------------------------------------ response shapes


def _result(finish: str = "stop") -> GenerationResult:
    return GenerationResult(text="Normal.", finish_reason=finish, input_tokens=11, output_tokens=3, timings=Timings())  # type: ignore[arg-type]


def _request() -> GenerationRequest:
    return GenerationRequest([Message("user", (TextPart("q"),))], SamplingParams(max_new_tokens=3), request_id="abc")


def test_completion_shape():
    body = openai_api.completion(_request(), _result("length"), "medgemma-4b-it", {"query_duration_seconds": 0.1})
    assert body["id"] == "chatcmpl-abc"
    assert body["object"] == "chat.completion"
    assert body["model"] == "medgemma-4b-it"
    assert isinstance(body["created"], int) and body["created"] > 1_700_000_000
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Normal."},
            "finish_reason": "length",
            "logprobs": None,
        }
    ]
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    assert body["compute_metrics"] == {"query_duration_seconds": 0.1}


@pytest.mark.parametrize(("finish", "openai_finish"), [("stop", "stop"), ("length", "length"), ("cancelled", "stop")])
def test_finish_reasons_map_to_openai_values(finish, openai_finish):
    body = openai_api.completion(_request(), _result(finish), "m", {})
    assert body["choices"][0]["finish_reason"] == openai_finish


def test_chunk_shape():
    c = openai_api.chunk(_request(), "m", {"content": "No"}, created=123)
    assert c == {
        "id": "chatcmpl-abc",
        "object": "chat.completion.chunk",
        "created": 123,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "No"}, "finish_reason": None, "logprobs": None}],
    }
    assert openai_api.chunk(_request(), "m", {}, "stop")["choices"][0]["finish_reason"] == "stop"
