"""Answers software can use, end to end through a real `bentoml serve` with the random-weight demo model.

* 100 JSON-schema-constrained requests (nested objects, arrays, enums, required fields) on both APIs, streamed and
  not, batched together with unconstrained greedy requests: every answer validates (``jsonschema``), every greedy
  neighbour gives exactly the text it gives alone.
* Thinking: a grammar forces a thought block and a ``box_2d`` answer (the demo cannot think on its own); the thought
  comes back apart (``thinking`` / ``reasoning_content``), streamed and not; the drop option removes it; an unclosed
  thought is reported; no tag ever reaches the answer.
* Boxes: a padded non-square image and a forced ``box_2d`` answer give pixel boxes checked by arithmetic; malformed
  box JSON gives empty boxes, a note and a 200.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import bentoml
import httpx
import jsonschema
import openai
import pytest

from tests.conftest import bentoml_serve, wait_for_model
from tests.helpers import png_bytes, png_data_uri

pytestmark = pytest.mark.e2e

REPORT = {
    "type": "object",
    "properties": {
        "finding": {"type": "string", "maxLength": 24},
        "severity": {"enum": ["none", "mild", "moderate", "severe"]},
        "confidence_percent": {"type": "integer", "minimum": 0, "maximum": 100},
        "location": {
            "type": "object",
            "properties": {
                "side": {"enum": ["left", "right", "bilateral"]},
                "zone": {"enum": ["upper", "middle", "lower"]},
            },
            "required": ["side", "zone"],
            "additionalProperties": False,
        },
        "differential": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
        "follow_up": {"type": "boolean"},
    },
    "required": ["finding", "severity", "confidence_percent", "location", "differential", "follow_up"],
    "additionalProperties": False,
}
FINDINGS = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no"]},
        "findings": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "label": {"enum": ["nodule", "effusion", "fracture"]},
                    "size_mm": {"type": "integer", "minimum": 1, "maximum": 80},
                },
                "required": ["label", "size_mm"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["answer", "findings"],
    "additionalProperties": False,
}
SCHEMAS = [REPORT, FINDINGS]
MAX_TOKENS = 600
NEIGHBOUR_PROMPTS = [f"Case {i}: summarise the chest radiograph findings." for i in range(6)]
# A thought, then a box answer: the demo model only picks the free parts (the thought's words, the label).
BOX_GRAMMAR = (
    'start: <unused94> "thought\\n" /[a-z ]{4,24}/ <unused95> '
    '"```json\\n[{\\"box_2d\\": [250, 100, 500, 600], \\"label\\": \\"" /[a-z]{3,10}/ "\\"}]\\n```"'
)
TAGS = ("<unused94>", "<unused95>")


@pytest.fixture(scope="module")
def server(tiny_vlm, tmp_path_factory):
    env = {"MEDGEMMA_MODEL": str(tiny_vlm), "MEDGEMMA_MAX_BATCH_SIZE": "16"}
    with bentoml_serve(env, tmp_path_factory.mktemp("structured")) as srv:
        assert wait_for_model(srv.url, tiny_vlm.name)["model_state"] == "ready"
        yield srv


@pytest.fixture(scope="module")
def app(tiny_vlm) -> str:
    return tiny_vlm.name


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "report", "schema": schema, "strict": True}}


def seed_call(url: str, app: str, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    """One seed request; for a stream, the final event, with the concatenated deltas checked against it."""
    if not stream:
        r = httpx.post(f"{url}/{app}/v1/generate", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()
    deltas, thinking, final = "", "", None
    with httpx.stream("POST", f"{url}/{app}/v1/generate", json={**body, "stream": True}, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            assert event.get("status") != "error", event
            deltas += event.get("delta", "")
            thinking += event.get("thinking_delta", "")
            if event.get("done"):
                final = event
    assert final is not None
    assert deltas == final["response"]  # the streamed answer is the answer
    assert thinking == final.get("thinking", "")
    return final


def oai_call(client: openai.OpenAI, app: str, *, stream: bool, **kwargs: Any) -> tuple[str, dict[str, Any], str]:
    """(content, extra message fields, finish_reason) of one OpenAI request, streamed or not."""
    if not stream:
        r = client.chat.completions.create(model=app, **kwargs)
        msg = r.choices[0].message
        return msg.content or "", dict(msg.model_extra or {}), r.choices[0].finish_reason
    content, reasoning, extra, finish = "", "", {}, ""
    for chunk in client.chat.completions.create(model=app, stream=True, **kwargs):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        fields = dict(delta.model_extra or {})
        reasoning += fields.pop("reasoning_content", None) or ""
        extra |= fields
        finish = chunk.choices[0].finish_reason or finish
    if reasoning:
        extra["reasoning_content"] = reasoning
    return content, extra, finish


def greedy_text(server, app: str, prompt: str) -> str:
    body = {"text": prompt, "max_new_tokens": 20}
    r = httpx.post(f"{server.url}/{app}/v1/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["response"]


def test_100_schema_constrained_requests_on_both_apis_beside_unchanged_greedy_neighbours(server, app, client):
    alone = {p: greedy_text(server, app, p) for p in NEIGHBOUR_PROMPTS}
    failures: list[str] = []
    lock = threading.Lock()

    def constrained(i: int) -> None:
        schema = SCHEMAS[i % len(SCHEMAS)]
        prompt = f"Patient {i}: report the findings as JSON."
        api, stream = ("seed", "openai")[i % 4 // 2], bool(i % 2)
        if api == "seed":
            body = {"text": prompt, "max_new_tokens": MAX_TOKENS, "response_format": response_format(schema)}
            out = seed_call(server.url, app, body, stream=stream)
            text, finish = out["response"], out["finish_reason"]
        else:
            messages = [{"role": "user", "content": prompt}]
            text, _, finish = oai_call(
                client, app, stream=stream, messages=messages, max_tokens=MAX_TOKENS,
                response_format=response_format(schema),
            )  # fmt: skip
        try:
            jsonschema.validate(json.loads(text), schema)
            assert finish == "stop", finish
        except Exception as exc:
            with lock:
                failures.append(f"request {i} ({api}, stream={stream}): {type(exc).__name__}: {exc!s:.200}")

    def neighbour(prompt: str) -> str:
        return greedy_text(server, app, prompt)

    with ThreadPoolExecutor(max_workers=16) as pool:
        constrained_jobs, neighbour_jobs = [], []
        for i in range(100):  # neighbours spread through the constrained load, so they share batches with it
            constrained_jobs.append(pool.submit(constrained, i))
            if i % 8 == 0:
                prompt = NEIGHBOUR_PROMPTS[(i // 8) % len(NEIGHBOUR_PROMPTS)]
                neighbour_jobs.append((prompt, pool.submit(neighbour, prompt)))
        for job in constrained_jobs:
            job.result()
        together = [(p, job.result()) for p, job in neighbour_jobs]
    assert not failures, "\n".join(failures)
    assert len(together) == 13
    for prompt, text in together:  # greedy neighbours of constrained rows: the same text, token for token
        assert text == alone[prompt], prompt


def test_json_object_and_choice_on_both_apis(server, app, client):
    body = {
        "text": "Is there a pneumothorax? Answer yes or no.",
        "max_new_tokens": 8,
        "structured_outputs": {"choice": ["yes", "no"]},
    }
    out = seed_call(server.url, app, body, stream=False)
    assert out["response"] in ("yes", "no") and out["finish_reason"] == "stop"
    text, _, finish = oai_call(
        client, app, stream=True, messages=[{"role": "user", "content": "Yes or no?"}], max_tokens=8,
        extra_body={"structured_outputs": {"regex": "(yes|no)"}},
    )  # fmt: skip
    assert text in ("yes", "no") and finish == "stop"
    bounded_object = {"type": "json_object"}
    text, _, _ = oai_call(
        client, app, stream=False, messages=[{"role": "user", "content": "JSON please"}], max_tokens=5,
        response_format=bounded_object,
    )  # fmt: skip
    assert text.startswith("{")  # 5 tokens cannot finish an object: what there is starts as one


def test_max_tokens_ending_the_json_early_says_length(server, app):
    body = {"text": "report", "max_new_tokens": 6, "response_format": response_format(REPORT)}
    out = seed_call(server.url, app, body, stream=False)
    assert out["finish_reason"] == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(out["response"])


def padded_image_body(grammar: str, **extra: Any) -> dict[str, Any]:
    image = png_data_uri(png_bytes((200, 200, 200), (400, 200)))  # non-square: padded to 400x400, 100 rows on top
    return {
        "text": "Where is the nodule? Answer with box_2d JSON.",
        "image": image,
        "pad_to_square": True,
        "max_new_tokens": 120,
        "structured_outputs": {"grammar": grammar},
        **extra,
    }


EXPECTED_BOX = {"x": 40.0, "y": 0.0, "width": 200.0, "height": 100.0}  # see test_boxes: 400x200 padded to square


@pytest.mark.parametrize("stream", [False, True])
def test_seed_forced_thought_and_box_answer(server, app, stream):
    out = seed_call(server.url, app, padded_image_body(BOX_GRAMMAR), stream=stream)
    assert out["finish_reason"] == "stop"
    assert not any(tag in out["response"] for tag in TAGS)
    assert out["response"].startswith("```json\n[{")
    assert 4 <= len(out["thinking"]) <= 24 and out["thinking_complete"] is True
    assert not any(tag in out["thinking"] for tag in TAGS) and not out["thinking"].startswith("thought")
    (box,) = out["boxes"]
    assert {k: box[k] for k in EXPECTED_BOX} == EXPECTED_BOX
    assert box["box_2d"] == [250, 100, 500, 600] and box["image_index"] == 0
    assert out["images"][0]["padded_to_square"] == {"size": 400, "left": 0, "top": 100}
    assert out["images"][0]["size"] == [400, 200]


@pytest.mark.parametrize("stream", [False, True])
def test_openai_forced_thought_is_reasoning_content(client, app, stream):
    body = padded_image_body(BOX_GRAMMAR)
    content = [{"type": "text", "text": body["text"]}, {"type": "image_url", "image_url": {"url": body["image"]}}]
    text, extra, finish = oai_call(
        client, app, stream=stream, messages=[{"role": "user", "content": content}], max_tokens=120,
        extra_body={"structured_outputs": body["structured_outputs"], "pad_to_square": True},
    )  # fmt: skip
    assert finish == "stop"
    assert text.startswith("```json") and not any(tag in text for tag in TAGS)
    assert 4 <= len(extra["reasoning_content"]) <= 24 and extra["reasoning_complete"] is True
    (box,) = extra["boxes"]
    assert {k: box[k] for k in EXPECTED_BOX} == EXPECTED_BOX


def test_drop_option_removes_the_thought(server, app, client):
    out = seed_call(server.url, app, padded_image_body(BOX_GRAMMAR, include_thinking=False), stream=True)
    assert "thinking" not in out and out["response"].startswith("```json")
    body = padded_image_body(BOX_GRAMMAR)
    content = [{"type": "text", "text": "Where?"}, {"type": "image_url", "image_url": {"url": body["image"]}}]
    for stream in (False, True):
        text, extra, _ = oai_call(
            client, app, stream=stream, messages=[{"role": "user", "content": content}], max_tokens=120,
            extra_body={"structured_outputs": body["structured_outputs"], "include_reasoning": False},
        )  # fmt: skip
        assert "reasoning_content" not in extra and text.startswith("```json")


def test_unclosed_thought_is_reported(server, app, client):
    grammar = 'start: <unused94> "thought\\n" /[a-z]{40,60}/ <unused95> "done"'
    body = {"text": "think", "max_new_tokens": 10, "structured_outputs": {"grammar": grammar}}
    out = seed_call(server.url, app, body, stream=True)
    assert out["finish_reason"] == "length"
    assert out["response"] == "" and out["thinking_complete"] is False and out["thinking"]
    _, extra, finish = oai_call(
        client, app, stream=False, messages=[{"role": "user", "content": "think"}], max_tokens=10,
        extra_body={"structured_outputs": {"grammar": grammar}},
    )  # fmt: skip
    assert finish == "length" and extra["reasoning_complete"] is False


def test_malformed_box_json_gives_empty_boxes_and_a_note(server, app):
    grammar = 'start: "[{\\"box_2d\\": [" /[0-9]{1,3}/ ", 5, 9], \\"label\\": \\"x\\"}]"'  # three numbers
    out = seed_call(server.url, app, padded_image_body(grammar), stream=False)
    assert out["boxes"] == [] and "four numbers" in out["boxes_note"]
    assert out["response"].startswith('[{"box_2d"')  # the text itself is untouched


def test_bentoml_client_sends_the_new_fields(server, app):
    with bentoml.SyncHTTPClient(server.url, server_ready_timeout=30) as c:
        out = c.generate(text="Is it normal?", max_new_tokens=8, structured_outputs={"choice": ["normal", "abnormal"]})
    assert out["response"] in ("normal", "abnormal")


def test_schema_lists_the_new_options(server, app):
    schema = httpx.get(f"{server.url}/{app}/v1/schema", timeout=30).json()
    optional = set(schema["inputs"]["optional"])
    assert {"response_format", "structured_outputs", "include_thinking", "pad_to_square"} <= optional
    assert schema["structured_outputs"]["structured_outputs"] == ["regex", "choice", "grammar"]
    assert schema["limits"]["max_constraint_bytes"] == 32768
