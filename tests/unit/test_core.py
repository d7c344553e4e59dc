"""MedGemmaCore, without any transport: what generate, chat completions, health, models and schema answer.

A real tiny image+text demo checkpoint is loaded once for the module (the real loader, engine and lifecycle).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from medgemma import discovery
from medgemma.config import Settings
from medgemma.core import ClientGone, MedGemmaCore, sse
from medgemma.errors import BadRequest, EngineUnavailable, ModelFailed, ModelLoading, NotFound
from medgemma.lifecycle import ModelState
from tests.helpers import DEMO_MARK, METRIC_KEYS, SIX_PARAMETERS, png_bytes, png_data_uri

PNG_URI = png_data_uri(png_bytes((200, 40, 40), (20, 16)))


def wait_state(core: MedGemmaCore, *states: ModelState, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while core.manager.state not in states:
        assert time.monotonic() < deadline, core.manager.state
        time.sleep(0.02)


@pytest.fixture(scope="module")
def core(tiny_vlm: Path) -> Iterator[MedGemmaCore]:
    c = MedGemmaCore(Settings(model=str(tiny_vlm), max_batch_size=4))
    c.startup()
    wait_state(c, ModelState.READY, ModelState.FAILED)
    assert c.manager.state is ModelState.READY, c.manager.error
    yield c
    c.shutdown()


async def collect(events: AsyncIterator[str]) -> list[str]:
    return [e async for e in events]


def data_of(events: list[str]) -> list[Any]:
    out = []
    for e in events:
        assert e.startswith("data: ") and e.endswith("\n\n"), e
        payload = e[len("data: ") : -2]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


# ------------------------------------------------------------------------------------------------ seed API


def test_generate_answers_the_seed_body(core: MedGemmaCore):
    body = asyncio.run(core.generate({"text": "Signs of sepsis?", "max_new_tokens": 3}, request_id="rid-7"))
    assert body["status"] == "success"
    assert DEMO_MARK in body["model"]
    assert isinstance(body["response"], str)
    assert body["parameters"] == dict.fromkeys(SIX_PARAMETERS) | {"max_new_tokens": 3, "do_sample": False}
    assert body["finish_reason"] in ("stop", "length")
    assert body["request_id"] == "rid-7"
    metrics = body["compute_metrics"]
    assert set(METRIC_KEYS) <= set(metrics)
    assert 1 <= metrics["output_tokens"] <= 3 and metrics["input_tokens"] > 3
    assert metrics["query_duration_seconds"] > 0
    assert "images" not in body


def test_generate_reports_what_was_done_to_each_image(core: MedGemmaCore):
    body = asyncio.run(core.generate({"text": "Describe.", "image": PNG_URI, "max_new_tokens": 2}))
    assert [im["source"] for im in body["images"]] == ["png"]
    assert body["compute_metrics"]["input_tokens"] > core.manager.loaded.config.mm_tokens_per_image


def test_invalid_payload_is_a_400_before_any_work(core: MedGemmaCore):
    with pytest.raises(BadRequest) as err:
        asyncio.run(core.generate({"text": "q", "top_k": 0}))
    assert err.value.param == "top_k"
    with pytest.raises(BadRequest, match="unknown field"):
        asyncio.run(core.generate({"text": "q", "max_tokens": 5}))


def test_stream_events_end_with_the_full_body(core: MedGemmaCore):
    async def run() -> list[str]:
        return await collect(await core.generate_stream({"text": "Hi", "max_new_tokens": 4}, request_id="s-1"))

    events = data_of(asyncio.run(run()))
    *deltas, final = events
    assert all(e["status"] == "streaming" and isinstance(e["delta"], str) and e["delta"] for e in deltas)
    assert final["done"] is True and final["status"] == "success" and final["request_id"] == "s-1"
    assert final["compute_metrics"]["output_tokens"] <= 4


def test_stream_validation_errors_are_raised_before_the_stream(core: MedGemmaCore):
    with pytest.raises(BadRequest):
        asyncio.run(core.generate_stream({"text": "q", "temperature": 3}))


def test_a_client_that_leaves_frees_its_slot(core: MedGemmaCore):
    async def gone() -> bool:
        return True

    with pytest.raises(ClientGone):
        asyncio.run(core.generate({"text": "long", "max_new_tokens": 2000}, disconnected=gone))
    deadline = time.monotonic() + 30
    while core.busy():
        assert time.monotonic() < deadline, core.manager.engine.stats()
        time.sleep(0.05)


def test_draining_refuses_new_work_with_retry_after(core: MedGemmaCore):
    core.draining = True
    try:
        with pytest.raises(EngineUnavailable) as err:
            asyncio.run(core.generate({"text": "q", "max_new_tokens": 1}))
        assert err.value.status_code == 503 and err.value.headers["Retry-After"]
        assert core.health()["status"] == "draining"
    finally:
        del core.draining  # back to the class default
    assert core.health()["status"] == "healthy"


# ------------------------------------------------------------------------------------------------ OpenAI API


def chat(app: str, **extra: Any) -> dict[str, Any]:
    return {"model": app, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, **extra}


def test_chat_completion(core: MedGemmaCore):
    app = core.settings.route_prefix
    body = asyncio.run(core.chat_completion(chat(app), request_id="c-1"))
    assert body["id"] == "chatcmpl-c-1" and body["object"] == "chat.completion" and body["model"] == app
    usage = body["usage"]
    assert 1 <= usage["completion_tokens"] <= 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["compute_metrics"]["output_tokens"] == usage["completion_tokens"]


def test_chat_completion_checks_the_model_name(core: MedGemmaCore):
    with pytest.raises(NotFound):
        asyncio.run(core.chat_completion(chat("gpt-4o")))
    with pytest.raises(BadRequest, match="JSON object"):
        asyncio.run(core.chat_completion([1, 2]))


def test_chat_completion_stream_with_usage(core: MedGemmaCore):
    app = core.settings.route_prefix

    async def run() -> list[str]:
        payload = chat(app, stream=True, stream_options={"include_usage": True})
        return await collect(await core.chat_completion_stream(payload, request_id="c-2"))

    events = data_of(asyncio.run(run()))
    assert events[-1] == "[DONE]"
    first, *middle, finish, usage, _ = events
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["id"] == "chatcmpl-c-2" and e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert all(isinstance(e["choices"][0]["delta"]["content"], str) for e in middle)
    assert finish["choices"][0]["finish_reason"] in ("stop", "length") and finish["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] <= 3
    assert "compute_metrics" in usage


# ------------------------------------------------------------------------------------------ health, models, schema


def test_health_shows_details_only_when_asked(core: MedGemmaCore, tiny_vlm: Path):
    open_ = core.health()
    assert open_["model_state"] == "ready" and open_["status"] == "healthy"
    kv = open_["engine"].pop("kv_cache")
    assert open_["engine"] == {"waiting": 0, "running": 0, "max_batch_size": 4}
    assert kv["full"]["blocks_used"] == 0 and kv["full"]["blocks_total"] > 0 and kv["capacity_tokens"] > 0
    assert open_["load_seconds"] > 0 and open_["loads"] == 1 and open_["model_memory_mb"] > 0
    assert "details" not in open_ and str(tiny_vlm) not in json.dumps(open_)
    assert core.health(details=True)["details"] == {"model_source": str(tiny_vlm), "loading_error": None}


def test_cuda_graphs_setting_runs_bucketed_decode_steps_and_health_counts_them(tiny_vlm: Path):
    c = MedGemmaCore(Settings(model=str(tiny_vlm), max_batch_size=4, cuda_graphs=True))
    c.startup()
    try:
        wait_state(c, ModelState.READY, ModelState.FAILED)
        assert c.manager.state is ModelState.READY, c.manager.error
        body = asyncio.run(c.generate({"text": "Signs of sepsis?", "max_new_tokens": 6}))
        assert body["status"] == "success"
        n, eos = body["compute_metrics"]["output_tokens"], body["finish_reason"] == "stop"
        # the prompt's step chooses the first token; every later token (and an end-of-sequence) is a decode step
        expected = {"capture": False, "graphs": 0, "replays": 0, "eager_steps": n - 1 + eos}  # CPU: no capture
        assert c.health()["engine"]["decode_graphs"] == expected
    finally:
        c.shutdown()


def test_models_lists_the_served_model(core: MedGemmaCore):
    listing = core.models()
    assert listing["object"] == "list"
    (entry,) = listing["data"]
    assert entry["id"] == core.settings.route_prefix
    assert entry["state"] == "ready" and entry["demo"] is True
    assert entry["capabilities"] == ["text-to-text", "image-text-to-text"]


def test_schema_is_the_discovery_of_the_loaded_model(core: MedGemmaCore):
    schema = core.schema()
    assert schema == discovery.describe(core.manager.loaded, core.settings)
    assert schema["model_class"] == "Gemma3ForConditionalGeneration"


def test_sse_framing_keeps_unicode():
    assert sse({"delta": "Röntgen ✓"}) == 'data: {"delta": "Röntgen ✓"}\n\n'


# ------------------------------------------------------------------------------------------------ lifecycle states


def test_failed_load_answers_503_and_a_short_public_error(tmp_path: Path):
    missing = tmp_path / "ward-7" / "no-such-model"
    core = MedGemmaCore(Settings(model=str(missing), load_retry_backoff_s=600))
    core.startup()
    wait_state(core, ModelState.FAILED)
    with pytest.raises(ModelFailed) as err:
        asyncio.run(core.generate({"text": "q"}))
    assert str(missing) in err.value.body()["loading_error"]  # model routes: full error (token-protected if set)
    health = core.health()
    assert health["model_state"] == "failed"
    assert health["loading_error"] == "FileNotFoundError: model directory <path> does not exist"
    assert str(missing) not in json.dumps(health)
    details = core.health(details=True)["details"]
    assert details["model_source"] == str(missing) and str(missing) in details["loading_error"]
    assert core.models()["data"][0]["state"] == "failed"
    with pytest.raises(ModelFailed):
        core.schema()


def test_first_request_starts_a_lazy_load(tiny_text: Path):
    core = MedGemmaCore(Settings(model=str(tiny_text), load_on_startup=False))
    core.startup()
    try:
        assert core.health()["model_state"] == "unloaded"
        with pytest.raises(ModelLoading) as err:
            asyncio.run(core.generate({"text": "q"}))
        assert err.value.status_code == 202 and "started loading" in err.value.body()["message"]
        wait_state(core, ModelState.READY)
        assert core.models()["data"][0]["capabilities"] == ["text-to-text"]
    finally:
        core.shutdown()


def test_count_response_feeds_the_requests_metric(core: MedGemmaCore):
    from prometheus_client import REGISTRY

    labels = {"route": "/{app}/v1/test-only", "status": "418"}
    before = REGISTRY.get_sample_value("medgemma_requests_total", labels) or 0.0
    core.count_response("/{app}/v1/test-only", 418)
    core.count_response("/{app}/v1/test-only", 418)
    assert REGISTRY.get_sample_value("medgemma_requests_total", labels) == before + 2
