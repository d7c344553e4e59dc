"""compute_metrics (the seed's per-response figures) and the medgemma_* Prometheus families."""

from __future__ import annotations

import os

import psutil
import pytest
import torch

from medgemma.protocol import GenerationResult, Timings
from medgemma.telemetry import MODEL_STATES, Metrics, compute_metrics, gpu_snapshot
from tests.helpers import METRIC_KEYS

GPU_KEYS = [k for k in METRIC_KEYS if "gpu" in k]


def result(**timings: float | None) -> GenerationResult:
    return GenerationResult(
        text="x", finish_reason="stop", input_tokens=12, output_tokens=5, timings=Timings(**timings)
    )


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    # Imported here, not at collection: prometheus_client picks its value store (in-process or the multiprocess
    # directory the service tests set up) when it is first imported.
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_compute_metrics_without_a_result():
    m = compute_metrics(1.234567)
    assert tuple(m) == METRIC_KEYS[:8]  # the seed's fields, in the seed's order
    assert m["query_duration_seconds"] == 1.2346
    rss_mb = psutil.Process(os.getpid()).memory_info().rss / 2**20
    assert abs(m["replica_memory_mb"] - rss_mb) < 0.1 * rss_mb  # this process's resident memory
    assert m["replica_cpu_percent"] >= 0


def test_compute_metrics_with_a_result_adds_tokens_and_timings():
    m = compute_metrics(0.5, result(queue_wait_s=0.00123456, time_to_first_token_s=0.1, output_tokens_per_second=9.876))
    assert tuple(m)[: len(METRIC_KEYS)] == METRIC_KEYS
    assert (m["input_tokens"], m["output_tokens"]) == (12, 5)
    assert m["queue_wait_seconds"] == 0.0012
    assert m["time_to_first_token_seconds"] == 0.1
    assert m["output_tokens_per_second"] == 9.88
    assert compute_metrics(0.5, result())["time_to_first_token_seconds"] is None


def test_gpu_figures_are_null_without_a_gpu_and_numbers_with_one():
    snap = gpu_snapshot()
    assert list(snap) == list(GPU_KEYS)
    if torch.cuda.is_available():
        assert snap["replica_gpu_memory_allocated_mb"] >= 0 and snap["replica_gpu_memory_reserved_mb"] >= 0
    else:
        assert snap["replica_gpu_memory_allocated_mb"] is None and snap["replica_gpu_memory_reserved_mb"] is None
    nvml = snap["replica_gpu_memory_total_mb"] is not None
    assert (snap["replica_gpu_memory_used_mb"] is not None) == nvml
    if nvml:
        assert 0 <= snap["replica_gpu_utilization_percent"] <= 100


def test_metrics_is_one_instance_per_process():
    assert Metrics.get() is Metrics.get()


def test_observe_result_feeds_tokens_and_latency_histograms():
    metrics = Metrics.get()
    before = {
        "prompt": sample("medgemma_prompt_tokens_total"),
        "generated": sample("medgemma_generation_tokens_total"),
        "ttft": sample("medgemma_time_to_first_token_seconds_count"),
        "e2e_sum": sample("medgemma_e2e_request_latency_seconds_sum"),
        "itl_sum": sample("medgemma_inter_token_latency_seconds_sum"),
        "queue": sample("medgemma_queue_wait_seconds_count"),
    }
    metrics.observe_result(result(queue_wait_s=0.01, time_to_first_token_s=0.2, total_s=1.0))
    assert sample("medgemma_prompt_tokens_total") == before["prompt"] + 12
    assert sample("medgemma_generation_tokens_total") == before["generated"] + 5
    assert sample("medgemma_time_to_first_token_seconds_count") == before["ttft"] + 1
    assert sample("medgemma_queue_wait_seconds_count") == before["queue"] + 1
    assert sample("medgemma_e2e_request_latency_seconds_sum") == pytest.approx(before["e2e_sum"] + 1.0)
    # mean time between the 5 output tokens: (1.0 - 0.2) / 4
    assert sample("medgemma_inter_token_latency_seconds_sum") == pytest.approx(before["itl_sum"] + 0.2)


def test_a_result_without_timings_only_counts_tokens():
    before = sample("medgemma_time_to_first_token_seconds_count"), sample("medgemma_generation_tokens_total")
    Metrics.get().observe_result(result())
    assert sample("medgemma_time_to_first_token_seconds_count") == before[0]
    assert sample("medgemma_generation_tokens_total") == before[1] + 5


@pytest.mark.parametrize("state", MODEL_STATES)
def test_model_state_is_one_hot(state: str):
    Metrics.get().set_state(state)
    values = {s: sample("medgemma_model_state", {"state": s}) for s in MODEL_STATES}
    assert values == {s: (1.0 if s == state else 0.0) for s in MODEL_STATES}
