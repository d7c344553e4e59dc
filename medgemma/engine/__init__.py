"""The continuous-batching generation engine. No BentoML in here.

One module per job: ``prepare`` (chat template + processor → tensors, on the caller's thread), ``handle`` (the
thread-to-asyncio request handle), ``kv_cache`` (the paged KV pools and block tables), ``attention`` (attention over
those pools inside transformers' Gemma 3 layers), ``sampling`` (next-token choice and stop strings) and ``scheduler``
(the step loop: admission, chunked prefill, decode, fault isolation).
"""

from __future__ import annotations

from medgemma.engine.handle import RequestHandle
from medgemma.engine.prepare import PreparedRequest
from medgemma.engine.scheduler import Engine, EngineStats

__all__ = ["Engine", "EngineStats", "PreparedRequest", "RequestHandle"]
