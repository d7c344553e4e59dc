"""What the scheduler measures and sizes: a decode step's cost, and the KV pool's default budget."""

from __future__ import annotations

import torch

from medgemma.engine.kv_cache import KVLayout


class DecodeCost:
    """Seconds of a decode step fitted as ``fixed + per_row * rows`` by least squares with exponential forgetting,
    over steps that read no prompt (rows come and go, which separates the two terms)."""

    def __init__(self, forget: float = 0.95) -> None:
        self.forget = forget
        self._s = [0.0] * 5  # sums of w, w*n, w*t, w*n*n, w*n*t

    def observe(self, rows: int, seconds: float) -> None:
        n, t = float(rows), seconds
        self._s = [self.forget * a + b for a, b in zip(self._s, (1.0, n, t, n * n, n * t), strict=True)]

    def seconds(self, rows: int) -> float | None:
        w, sn, st, snn, snt = self._s
        if w == 0:
            return None
        denom = w * snn - sn * sn
        if denom > 1e-9 * max(w * snn, 1e-12):
            slope = (w * snt - sn * st) / denom
            if slope >= 0:
                return max((st - slope * sn) / w + slope * rows, 0.0)
        return st / w


def default_kv_budget(layout: KVLayout, device: torch.device) -> int:
    """Bytes for the KV pools when no budget is set: 85 % of the GPU memory still free after loading (what vLLM's
    ``gpu_memory_utilization`` does, leaving room for activations), or on CPU 2 GiB (pages are committed lazily)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.85)
    return 2 * 2**30
