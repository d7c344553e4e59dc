"""How an exception in one request's step becomes that request's error (the scheduler keeps faults in their row)."""

from __future__ import annotations

import gc
import logging

import torch

from medgemma.errors import EngineUnavailable, InternalError, ServiceError

log = logging.getLogger(__name__)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(exc).lower()


def as_service_error(exc: BaseException) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    if is_oom(exc):
        return EngineUnavailable(
            "out of memory while generating this request; retry with fewer images or tokens", retry_after=5
        )
    log.error("generation failed: %s", type(exc).__name__)
    return InternalError()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
