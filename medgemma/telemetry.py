"""Telemetry: the seed's per-response ``compute_metrics`` and the ``medgemma_*`` Prometheus families.

GPU figures come from torch.cuda (allocated/reserved by this process) and NVML (total/used/utilization of the
device); on a machine without a GPU they are null, never an error. Prometheus metrics are created lazily, on first
use, so that they land in BentoML's multiprocess registry (``PROMETHEUS_MULTIPROC_DIR`` is set by ``bentoml serve``
before workers start) and are served by BentoML's own ``/metrics``.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
from typing import Any

import psutil

from medgemma.protocol import GenerationResult

# What the edge's access-log line says about a request besides its route and status, set by the code that answers it.
ACCESS_NOTES: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("access_notes", default=None)


def note_access(key: str, value: str) -> None:
    """Add ``key=value`` to the current request's access-log line (values must never be patient data)."""
    notes = ACCESS_NOTES.get()
    if notes is not None:
        notes[key] = value


log = logging.getLogger(__name__)
_MB = 1024 * 1024

_process = psutil.Process()
_process.cpu_percent(None)  # prime: the first reading is always 0.0
_nvml_lock = threading.Lock()
_nvml_handles: list[Any] | None = None


def _nvml() -> list[Any]:
    """NVML handles of the GPUs this process may use; empty when there is no driver or no GPU."""
    global _nvml_handles
    with _nvml_lock:
        if _nvml_handles is not None:
            return _nvml_handles
        handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            indices = range(count)
            if visible:
                indices = [int(i) for i in visible.split(",") if i.strip().isdigit() and int(i) < count]
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        except Exception:  # no driver, no library, no GPU: GPU figures are null
            handles = []
        _nvml_handles = handles
        return handles


def _cuda() -> Any:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    return torch if torch.cuda.is_available() else None


def gpu_snapshot() -> dict[str, float | None]:
    out: dict[str, float | None] = {
        "replica_gpu_memory_allocated_mb": None,
        "replica_gpu_memory_reserved_mb": None,
        "replica_gpu_memory_total_mb": None,
        "replica_gpu_memory_used_mb": None,
        "replica_gpu_utilization_percent": None,
    }
    torch = _cuda()
    if torch is not None:
        n = torch.cuda.device_count()
        out["replica_gpu_memory_allocated_mb"] = round(sum(torch.cuda.memory_allocated(i) for i in range(n)) / _MB, 2)
        out["replica_gpu_memory_reserved_mb"] = round(sum(torch.cuda.memory_reserved(i) for i in range(n)) / _MB, 2)
    handles = _nvml()
    if handles:
        try:
            import pynvml

            mems = [pynvml.nvmlDeviceGetMemoryInfo(h) for h in handles]
            utils = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]
            out["replica_gpu_memory_total_mb"] = round(sum(m.total for m in mems) / _MB, 2)
            out["replica_gpu_memory_used_mb"] = round(sum(m.used for m in mems) / _MB, 2)
            out["replica_gpu_utilization_percent"] = round(sum(utils) / len(utils), 1)
        except Exception:
            log.debug("NVML query failed", exc_info=True)
    return out


def compute_metrics(
    duration_s: float, result: GenerationResult | None = None, *, adapter: str | None = None
) -> dict[str, Any]:
    """The seed's ``compute_metrics`` object, plus token counts, per-request timings and the LoRA adapter that
    answered (null for the base model)."""
    metrics: dict[str, Any] = {
        "query_duration_seconds": round(duration_s, 4),
        "replica_cpu_percent": _process.cpu_percent(None),
        "replica_memory_mb": round(_process.memory_info().rss / _MB, 2),
        **gpu_snapshot(),
    }
    if result is not None:
        t = result.timings
        metrics.update(
            {
                "input_tokens": result.input_tokens,
                "output_tokens": result.output_tokens,
                "queue_wait_seconds": _r(t.queue_wait_s),
                "time_to_first_token_seconds": _r(t.time_to_first_token_s),
                "output_tokens_per_second": _r(t.output_tokens_per_second, 2),
                "adapter": adapter,
            }
        )
    return metrics


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


# --- Prometheus ------------------------------------------------------------------------------------------------------

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
MODEL_STATES = ("unloaded", "loading", "ready", "failed")


class Metrics:
    """The ``medgemma_*`` families. One instance per process, made on first use."""

    _instance: Metrics | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        multiproc = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        live = {"multiprocess_mode": "livesum"} if multiproc else {}
        latest = {"multiprocess_mode": "mostrecent"} if multiproc else {}
        self.requests = Counter("medgemma_requests", "Requests answered, by route and HTTP status", ["route", "status"])
        self.ttft = Histogram(
            "medgemma_time_to_first_token_seconds",
            "Time from submission to the first token",
            buckets=_LATENCY_BUCKETS,
        )
        self.inter_token = Histogram(
            "medgemma_inter_token_latency_seconds",
            "Mean time between output tokens of a request",
            buckets=_TOKEN_BUCKETS,
        )
        self.e2e = Histogram(
            "medgemma_e2e_request_latency_seconds", "Submission to last token", buckets=_LATENCY_BUCKETS
        )
        self.queue_wait = Histogram(
            "medgemma_queue_wait_seconds", "Time waiting for a batch slot", buckets=_LATENCY_BUCKETS
        )
        self.prompt_tokens = Counter("medgemma_prompt_tokens", "Prompt tokens processed (image tokens included)")
        self.generation_tokens = Counter("medgemma_generation_tokens", "Tokens generated")
        self.waiting = Gauge("medgemma_requests_waiting", "Requests waiting for a batch slot", **live)
        self.running = Gauge("medgemma_requests_running", "Requests in the running batch", **live)
        self.model_state = Gauge("medgemma_model_state", "1 for the model's current state", ["state"], **latest)
        self.load_duration = Gauge("medgemma_model_load_duration_seconds", "Duration of the last load", **latest)
        self.kv_blocks = Gauge(
            "medgemma_kv_cache_blocks",
            "KV cache blocks by pool (full/sliding attention layers) and state (used/free/reserved/total)",
            ["pool", "state"],
            **live,
        )
        self.kv_capacity = Gauge("medgemma_kv_cache_capacity_tokens", "Tokens of context the KV pool holds", **live)
        self.preemptions = Gauge(
            "medgemma_kv_cache_preemptions",
            "Running requests preempted for KV space (0 by design: admission reserves each request's blocks)",
            **live,
        )

    @classmethod
    def get(cls) -> Metrics:
        with cls._lock:
            if cls._instance is None:
                cls._instance = Metrics()
            return cls._instance

    def observe_result(self, result: GenerationResult) -> None:
        t = result.timings
        self.prompt_tokens.inc(result.input_tokens)
        self.generation_tokens.inc(result.output_tokens)
        if t.queue_wait_s is not None:
            self.queue_wait.observe(t.queue_wait_s)
        if t.time_to_first_token_s is not None:
            self.ttft.observe(t.time_to_first_token_s)
        if t.total_s is not None:
            self.e2e.observe(t.total_s)
            if result.output_tokens > 1 and t.time_to_first_token_s is not None:
                self.inter_token.observe((t.total_s - t.time_to_first_token_s) / (result.output_tokens - 1))

    def set_kv(self, kv: dict[str, Any]) -> None:
        """Gauges from ``Engine.stats().kv``."""
        for pool in ("full", "sliding"):
            if pool in kv:
                p = kv[pool]
                for state, key in (("used", "blocks_used"), ("free", "blocks_free"), ("reserved", "blocks_reserved")):
                    self.kv_blocks.labels(pool=pool, state=state).set(p[key])
                self.kv_blocks.labels(pool=pool, state="total").set(p["blocks_total"])
        if "capacity_tokens" in kv:
            self.kv_capacity.set(kv["capacity_tokens"])
        self.preemptions.set(kv.get("preemptions", 0))

    def set_state(self, state: str) -> None:
        for s in MODEL_STATES:
            self.model_state.labels(state=s).set(1 if s == state else 0)
