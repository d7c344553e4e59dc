"""What several test modules assert about the seed API: its response fields, its error object, a PNG to send."""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image

SIX_PARAMETERS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
METRIC_KEYS = (
    "query_duration_seconds",
    "replica_cpu_percent",
    "replica_memory_mb",
    "replica_gpu_memory_allocated_mb",
    "replica_gpu_memory_reserved_mb",
    "replica_gpu_memory_total_mb",
    "replica_gpu_memory_used_mb",
    "replica_gpu_utilization_percent",
    "input_tokens",
    "output_tokens",
)
DEMO_MARK = "random-weight demo"


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def assert_error(r: Any, status: int = 400) -> dict:
    """The one error shape: a JSON object with `status: "error"` and a message, never a list or a traceback."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert isinstance(body, dict), body  # an object, never BentoML's list
    assert body["status"] == "error"
    assert isinstance(body["error"], str)
    assert body["error"]
    assert "Traceback" not in r.text
    assert 'File "' not in r.text
    return body
