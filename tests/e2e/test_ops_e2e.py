"""Operations against a real `bentoml serve`: Prometheus families move, idle unload frees the model and reloads."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.conftest import bentoml_serve, wait_for_model

pytestmark = pytest.mark.e2e

FAMILIES = (
    "medgemma_requests_total",
    "medgemma_time_to_first_token_seconds_count",
    "medgemma_inter_token_latency_seconds_count",
    "medgemma_e2e_request_latency_seconds_count",
    "medgemma_queue_wait_seconds_count",
    "medgemma_prompt_tokens_total",
    "medgemma_generation_tokens_total",
)


def scrape(url: str) -> dict[str, float]:
    """Sum every sample of each family (over labels) from BentoML's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(medgemma_[a-z0-9_]+)(\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def sample(url: str, name: str, labels: str) -> float | None:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_families_change(tiny_vlm, tmp_path):
    app = tiny_vlm.name
    with bentoml_serve({"MEDGEMMA_MODEL": str(tiny_vlm)}, tmp_path) as srv:
        wait_for_model(srv.url, app)
        before = scrape(srv.url)
        for name in ("medgemma_requests_waiting", "medgemma_requests_running", "medgemma_model_load_duration_seconds"):
            assert name in before, f"{name} missing from /metrics"
        assert sample(srv.url, "medgemma_model_state", 'state="ready"') == 1.0
        assert before["medgemma_model_load_duration_seconds"] > 0
        for n in (3, 5):
            r = httpx.post(f"{srv.url}/{app}/v1/generate", json={"text": "fever?", "max_new_tokens": n}, timeout=60)
            assert r.status_code == 200
        httpx.post(f"{srv.url}/{app}/v1/generate", json={"text": "x", "max_new_tokens": 0}, timeout=60)
        after = scrape(srv.url)
        for fam in FAMILIES:
            assert after.get(fam, 0) > before.get(fam, 0), f"{fam} did not move: {before.get(fam)} -> {after.get(fam)}"
        assert after["medgemma_generation_tokens_total"] - before.get("medgemma_generation_tokens_total", 0) >= 2
        assert sample(srv.url, "medgemma_requests_total", 'status="400"') == 1.0
        assert sample(srv.url, "medgemma_requests_total", 'route="/{app}/v1/generate",status="200"') == 2.0
        assert after["medgemma_requests_running"] == 0
        # KV cache: the pools' blocks by pool and state; every block is back once the requests are answered
        for pool in ("full", "sliding"):
            total = sample(srv.url, "medgemma_kv_cache_blocks", f'pool="{pool}",state="total"')
            assert total is not None and total > 0, pool
            assert sample(srv.url, "medgemma_kv_cache_blocks", f'pool="{pool}",state="free"') == total
            assert sample(srv.url, "medgemma_kv_cache_blocks", f'pool="{pool}",state="used"') == 0
        assert after["medgemma_kv_cache_capacity_tokens"] > 0
        assert after["medgemma_kv_cache_preemptions"] == 0
        kv = httpx.get(f"{srv.url}/{app}/v1/health", timeout=5).json()["engine"]["kv_cache"]
        assert kv["capacity_tokens"] == after["medgemma_kv_cache_capacity_tokens"]
        assert kv["full"]["blocks_used"] == 0 and kv["full"]["blocks_total"] > 0
        assert kv["admission"] == "reserve" and kv["preemptions"] == 0


def test_idle_unload_then_reload(tiny_vlm, tmp_path):
    app = tiny_vlm.name
    env = {"MEDGEMMA_MODEL": str(tiny_vlm), "MEDGEMMA_IDLE_UNLOAD_S": "2", "MEDGEMMA_LOADING_RETRY_AFTER_S": "1"}
    with bentoml_serve(env, tmp_path) as srv:
        health = wait_for_model(srv.url, app)
        assert health["model_state"] == "ready"
        assert health["model_memory_mb"] > 0
        assert httpx.post(f"{srv.url}/{app}/v1/generate", json={"text": "a"}, timeout=60).status_code == 200

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = httpx.get(f"{srv.url}/{app}/v1/health", timeout=5).json()
            if health["model_state"] == "unloaded":
                break
            time.sleep(0.25)
        assert health["model_state"] == "unloaded", health
        assert health["model_memory_mb"] == 0
        assert "engine" not in health
        assert sample(srv.url, "medgemma_model_state", 'state="unloaded"') == 1.0

        first = httpx.post(f"{srv.url}/{app}/v1/generate", json={"text": "b", "max_new_tokens": 3}, timeout=60)
        assert first.status_code == 202
        assert first.headers["retry-after"] == "1"
        assert first.json()["status"] == "loading"

        deadline = time.monotonic() + 60
        while True:
            r = httpx.post(f"{srv.url}/{app}/v1/generate", json={"text": "b", "max_new_tokens": 3}, timeout=60)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            assert r.status_code == 202
            time.sleep(0.2)
        assert r.status_code == 200
        assert r.json()["status"] == "success"
        assert httpx.get(f"{srv.url}/{app}/v1/health", timeout=5).json()["loads"] == 2
