"""What several test modules share: the seed API's response fields and error object, a PNG to send, and transformers'
`generate()` as the greedy oracle for the engine."""

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


def greedy_generate(engine: Any, req: Any) -> list[int]:
    """transformers' ``generate()`` alone, greedy, on the engine's model: the tokens the engine must reproduce."""
    import torch

    p = engine.prepare(req)
    kwargs = {}
    if p.pixel_values is not None:
        kwargs = {"pixel_values": p.pixel_values, "token_type_ids": p.token_type_ids[None]}
    out = engine.model.generate(
        input_ids=p.input_ids[None],
        attention_mask=torch.ones_like(p.input_ids[None]),
        max_new_tokens=req.params.max_new_tokens,
        do_sample=False,
        **kwargs,
    )
    return [t for t in out[0, p.n_input :].tolist() if t not in engine.eos_ids]
