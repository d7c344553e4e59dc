"""LoRA adapters chosen per request, against a real `bentoml serve` (tiny image+text demo, fp32, CPU).

One server with five configured adapters: two good ones (Google's notebook layout — every linear layer including
the vision tower, plus lm_head and embed_tokens copies — and an attention-only one) and three broken ones (shapes of
another base, a corrupt safetensors file, a missing directory). Every answer through an adapter is compared with
transformers' ``generate()`` on the same adapter merged into the base by PEFT (``merge_and_unload``), in this process.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from medgemma import inputs, openai_api
from medgemma.config import Settings
from medgemma.demo_lora import build_adapter
from medgemma.schemas import GenerateRequest, parse_model
from tests.conftest import bentoml_serve, wait_for_model
from tests.helpers import assert_error, png_bytes, png_data_uri
from tests.lora_refs import loaded_with, reference_text

pytestmark = pytest.mark.e2e

TIMEOUT = 60
GOOD = ("radiology", "derm")
BROKEN = {"shapes": "trained on another base model", "corrupt": "could not be read", "missing": "does not exist"}
PROMPTS = ["What are the symptoms of diabetes?", "Describe a normal chest radiograph.", "x"]
IMAGE = png_data_uri(png_bytes((200, 30, 90), (40, 36)))


def _wrong_shapes(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("v_proj.lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] * 2)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def lora(tiny_vlm, tmp_path_factory) -> Any:
    root = tmp_path_factory.mktemp("lora-e2e")
    paths = {
        "radiology": build_adapter(tiny_vlm, root / "radiology", seed=21, style="notebook", rank=4),
        "derm": build_adapter(tiny_vlm, root / "derm", seed=22, style="attention", rank=8),
    }
    paths["shapes"] = _wrong_shapes(paths["derm"], root / "shapes")
    paths["corrupt"] = Path(shutil.copytree(paths["derm"], root / "corrupt"))
    (paths["corrupt"] / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    paths["missing"] = root / "no-such-adapter"
    spec = ",".join(f"{name}={path}" for name, path in paths.items())
    env = {"MEDGEMMA_MODEL": str(tiny_vlm), "MEDGEMMA_LORA_ADAPTERS": spec}
    with bentoml_serve(env, root) as server:
        app = tiny_vlm.name
        assert wait_for_model(server.url, app)["model_state"] == "ready"
        deadline = time.monotonic() + 60
        while True:  # adapters load in the background after the base
            health = httpx.get(f"{server.url}/{app}/v1/health", timeout=TIMEOUT).json()
            if all(a["state"] != "loading" for a in health["adapters"]):
                break
            assert time.monotonic() < deadline, health
            time.sleep(0.2)
        settings = Settings(model=str(tiny_vlm), lora_adapters=tuple(spec.split(",")))
        yield SimpleNamespace(
            server=server,
            url=server.url,
            app=app,
            paths=paths,
            settings=settings,
            health=health,
            refs={name: loaded_with(tiny_vlm, paths.get(name)) for name in (None, *GOOD)},
        )


def seed(lora: Any, payload: dict) -> httpx.Response:
    return httpx.post(f"{lora.url}/{lora.app}/v1/generate", json=payload, timeout=TIMEOUT)


def seed_reference(lora: Any, payload: dict) -> str:
    """What the merged model generates for this seed request, prepared exactly as the server prepares it."""
    req = inputs.from_seed(parse_model(GenerateRequest, payload), lora.settings, vision=True)
    return reference_text(lora.refs[req.adapter], req)


def test_adapters_listed_with_rank_targets_memory_and_errors(lora):
    models = httpx.get(f"{lora.url}/v1/models", timeout=TIMEOUT).json()["data"]
    assert [m["id"] for m in models] == [lora.app, *GOOD, *BROKEN]
    by_id = {m["id"]: m for m in models}
    radiology = by_id["radiology"]
    assert radiology["parent"] == lora.app and radiology["state"] == "ready"
    assert radiology["lora"]["rank"] == 4
    assert {"q_proj", "down_proj", "fc1"} <= set(radiology["lora"]["target_modules"])
    assert radiology["lora"]["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert radiology["lora"]["vision_tower"] is True
    assert by_id["derm"]["lora"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    for name, words in BROKEN.items():
        assert by_id[name]["state"] == "failed" and words in by_id[name]["lora"]["error"], by_id[name]
    # the seed listing is the same list
    seed_models = httpx.get(f"{lora.url}/{lora.app}/v1/models", timeout=TIMEOUT).json()["data"]
    assert [m["id"] for m in seed_models] == [m["id"] for m in models]

    schema = httpx.get(f"{lora.url}/{lora.app}/v1/schema", timeout=TIMEOUT).json()
    assert "adapter" in schema["inputs"]["optional"]
    listed = {a["name"]: a for a in schema["adapters"]}
    assert listed["radiology"]["rank"] == 4 and listed["derm"]["rank"] == 8
    assert all(words in listed[name]["error"] for name, words in BROKEN.items())

    health = httpx.get(f"{lora.url}/{lora.app}/v1/health", timeout=TIMEOUT).json()
    assert health["model_state"] == "ready" and health["status"] == "healthy"
    assert health["adapter_memory_mb"] == pytest.approx(sum(listed[n]["memory_mb"] for n in GOOD), abs=0.01)
    assert health["adapter_memory_mb"] > 0


@pytest.mark.parametrize("adapter", GOOD)
def test_seed_answers_equal_the_merged_adapter(lora, adapter):
    for text in PROMPTS:
        payload = {"text": text, "max_new_tokens": 16, "adapter": adapter}
        r = seed(lora, payload)
        assert r.status_code == 200, r.text
        assert r.json()["response"] == seed_reference(lora, payload), text
        assert r.json()["compute_metrics"]["adapter"] == adapter


def test_image_request_goes_through_the_adapted_vision_tower(lora):
    payload = {"text": "Describe this image", "image": IMAGE, "max_new_tokens": 16, "adapter": "radiology"}
    r = seed(lora, payload)
    assert r.status_code == 200, r.text
    assert r.json()["response"] == seed_reference(lora, payload)
    base = seed(lora, {k: v for k, v in payload.items() if k != "adapter"})
    assert base.json()["response"] == seed_reference(lora, {k: v for k, v in payload.items() if k != "adapter"})
    assert base.json()["compute_metrics"]["adapter"] is None


def test_openai_model_names_the_adapter(lora):
    client = openai.OpenAI(base_url=f"{lora.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    for adapter in GOOD:
        for text in PROMPTS[:2]:
            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
            r = client.chat.completions.create(model=adapter, messages=messages, max_tokens=16)
            assert r.model == adapter
            payload = {"model": adapter, "messages": messages, "max_tokens": 16}
            req = openai_api.to_generation_request(
                parse_model(openai_api.ChatCompletionRequest, payload), lora.settings, vision=True
            )
            assert req.adapter == adapter
            assert r.choices[0].message.content == reference_text(lora.refs[adapter], req)
    chunks = client.chat.completions.create(
        model="radiology", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=16, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == seed_reference(lora, {"text": PROMPTS[1], "max_new_tokens": 16, "adapter": "radiology"})


def test_a_random_adapter_changes_the_answers(lora):
    for adapter in GOOD:
        changed = 0
        for text in PROMPTS:
            with_adapter = seed(lora, {"text": text, "max_new_tokens": 16, "adapter": adapter}).json()["response"]
            base = seed(lora, {"text": text, "max_new_tokens": 16}).json()["response"]
            changed += with_adapter != base
        assert changed == len(PROMPTS), adapter


def test_two_adapters_and_the_base_concurrently_answer_as_alone(lora):
    payloads = [
        {"text": text, "max_new_tokens": 16, **({"adapter": adapter} if adapter else {})}
        for text in PROMPTS
        for adapter in (None, *GOOD)
    ]
    payloads.append({"text": "Describe this image", "image": IMAGE, "max_new_tokens": 12, "adapter": "radiology"})
    alone = [seed(lora, p).json()["response"] for p in payloads]
    with ThreadPoolExecutor(len(payloads)) as pool:
        together = list(pool.map(lambda p: seed(lora, p), payloads * 2))  # every request twice, all in flight
    assert all(r.status_code == 200 for r in together), [r.text for r in together if r.status_code != 200]
    assert [r.json()["response"] for r in together] == alone * 2
    assert len(set(alone)) > len(PROMPTS)  # answers differ by adapter: rows mixed up would be caught


def test_unknown_adapter_is_404_on_both_apis(lora):
    r = seed(lora, {"text": "hi", "adapter": "no-such-adapter"})
    body = assert_error(r, 404)
    assert body["param"] == "adapter" and "radiology" in body["error"]
    client = openai.OpenAI(base_url=f"{lora.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["type"] == "not_found_error" and err.value.body["param"] == "model"
    raw = httpx.post(
        f"{lora.url}/v1/chat/completions",
        json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
        timeout=TIMEOUT,
    )
    assert raw.status_code == 404 and set(raw.json()) == {"error"}


def test_broken_adapter_is_reported_while_the_base_serves(lora):
    for name, words in BROKEN.items():
        r = seed(lora, {"text": "hi", "max_new_tokens": 4, "adapter": name})
        body = r.json()
        assert r.status_code == 503 and body["status"] == "failed" and words in body["loading_error"], body
        assert body["adapter"] == name and body["param"] == "adapter"
        raw = httpx.post(
            f"{lora.url}/v1/chat/completions",
            json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=TIMEOUT,
        )
        assert raw.status_code == 503 and raw.json()["error"]["param"] == "model"
    assert seed(lora, {"text": "hi", "max_new_tokens": 4}).status_code == 200
    assert seed(lora, {"text": "hi", "max_new_tokens": 4, "adapter": "derm"}).status_code == 200


def test_access_log_says_which_adapter_answered(lora):
    r = httpx.post(
        f"{lora.url}/{lora.app}/v1/generate",
        json={"text": "hi", "max_new_tokens": 4, "adapter": "derm"},
        headers={"X-Request-ID": "lora-log-check-1"},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200
    time.sleep(0.3)
    lines = [line for line in lora.server.log().splitlines() if "request_id=lora-log-check-1" in line]
    access = [line for line in lines if "method=POST" in line]
    assert access and "adapter=derm" in access[-1], lines
    assert any("route=generate adapter=derm" in line for line in lines), lines
