"""The OpenAI-compatible API against a real `bentoml serve`, driven by the official `openai` package."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import bentoml_serve, wait_for_model

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tiny_vlm, tmp_path_factory):
    with bentoml_serve({"MEDGEMMA_MODEL": str(tiny_vlm)}, tmp_path_factory.mktemp("openai")) as srv:
        assert wait_for_model(srv.url, tiny_vlm.name)["model_state"] == "ready"
        yield srv


@pytest.fixture(scope="module")
def app(tiny_vlm) -> str:
    return tiny_vlm.name


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def png_data_uri(seed: int = 0, size: int = 48) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_models_list(client, app):
    models = client.models.list()
    assert [m.id for m in models.data] == [app]
    assert models.data[0].owned_by == "medgemma-bentoml"


def test_chat_completion_shape_and_usage(client, app):
    r = client.chat.completions.create(
        model=app,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is sepsis?"}],
        max_tokens=12,
    )
    assert r.object == "chat.completion"
    assert r.model == app
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens > 5


def test_stream_equals_non_stream(client, app):
    kwargs = {"model": app, "messages": [{"role": "user", "content": "List causes of fever."}], "max_tokens": 24}
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stream_is_sse_with_done(server, app):
    body = {"model": app, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_image_url_data_uri(client, app):
    r = client.chat.completions.create(
        model=app,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe this image."},
                    {"type": "image_url", "image_url": {"url": png_data_uri()}},
                ],
            }
        ],
        max_tokens=8,
    )
    # The tiny model spends 4 soft tokens (+ start/end markers) per image: the prompt is longer than text alone.
    text_only = client.chat.completions.create(
        model=app, messages=[{"role": "user", "content": "Describe this image."}], max_tokens=1
    )
    assert r.usage.prompt_tokens >= text_only.usage.prompt_tokens + 4
    assert r.choices[0].message.content


def test_app_prefixed_base_url_works_too(server, app):
    c = openai.OpenAI(base_url=f"{server.url}/{app}/v1", api_key="unused", max_retries=0)
    r = c.chat.completions.create(model=app, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.choices[0].message.content is not None


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"model": "gpt-4o"}, 404, "model"),
        ({"n": 2}, 400, "n"),
        ({"temperature": 3}, 400, "temperature"),
        ({"frequency_penalty": 0.5}, 400, "frequency_penalty"),
        ({"extra_body": {"tools_choice": "auto"}}, 400, "tools_choice"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
                ]
            },
            400,
            "messages[0].content[0]",
        ),
    ],
)
def test_errors_in_openai_shape(client, app, kwargs, status, param):
    base = {"model": app, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    base.update(kwargs)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**base)
    err = info.value
    assert err.status_code == status
    body = err.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param
    assert body["error"]["message"]
    # and the server keeps serving
    ok = client.chat.completions.create(model=app, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.choices


def test_invalid_json_is_openai_shaped_400(server):
    r = httpx.post(
        f"{server.url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
