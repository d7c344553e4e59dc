"""The caller's side of a submitted request: events cross from the engine thread to asyncio or a plain thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from medgemma.errors import ServiceError
from medgemma.protocol import GenerationResult, TokenDelta

if TYPE_CHECKING:
    from medgemma.engine.prepare import PreparedRequest

log = logging.getLogger(__name__)

_DONE = object()


class RequestHandle:
    """Stream deltas, await the result, or cancel.

    Events go into an asyncio queue when the request was submitted from a running event loop, else into a
    thread-safe queue (benchmarks, tests, plain threads). A handle finishes exactly once: a second ``_finish`` is a
    bug in the engine, logged and ignored, so a caller never sees two outcomes.
    """

    def __init__(self, prepared: PreparedRequest, *, stream: bool = True) -> None:
        self.prepared = prepared
        self.streaming = stream  # whether the caller reads per-token text events
        self.request_id = prepared.request_id
        self.submitted_at = time.perf_counter()
        self.cancelled = threading.Event()
        self.result: GenerationResult | None = None
        self.error: ServiceError | None = None
        self.finish_calls = 0
        self._done_lock = threading.Lock()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._aq: asyncio.Queue[Any] | None = asyncio.Queue()
        except RuntimeError:
            self._loop = None
            self._aq = None
        self._tq: queue.Queue[Any] = queue.Queue()

    @property
    def done(self) -> bool:
        return self.finish_calls > 0

    # engine side
    def _emit(self, item: Any) -> None:
        if self._loop is not None and self._aq is not None:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
                self._loop.call_soon_threadsafe(self._aq.put_nowait, item)
        else:
            self._tq.put(item)

    def _finish(self, result: GenerationResult | None, error: ServiceError | None = None) -> bool:
        """Deliver the outcome; False (and nothing delivered) when the handle had already finished."""
        with self._done_lock:
            self.finish_calls += 1
            if self.finish_calls > 1:
                log.error("request finished twice; the second outcome is dropped")
                return False
            self.result, self.error = result, error
        self._emit(_DONE)
        return True

    # caller side
    def cancel(self) -> None:
        """Ask the engine to drop this request; it leaves the batch before the next step."""
        self.cancelled.set()

    async def stream(self) -> AsyncIterator[TokenDelta]:
        """Yield text deltas as they are produced; raises the request's error, if any, at the end."""
        assert self._aq is not None, "stream() needs the request to be submitted from an event loop"
        try:
            while True:
                item = await self._aq.get()
                if item is _DONE:
                    break
                # Deltas that piled up while the consumer was busy go out as one: a slow reader (a client on a
                # loaded machine) then costs one event per wake-up, not one per token. Nothing waits for this.
                done = False
                while not self._aq.empty():
                    more = self._aq.get_nowait()
                    if more is _DONE:
                        done = True
                        break
                    item = TokenDelta(item.text + more.text)
                yield item
                if done:
                    break
        finally:
            if self.result is None and self.error is None:
                self.cancel()  # the consumer went away (client disconnect): free the slot
        if self.error is not None:
            raise self.error

    async def wait(self) -> GenerationResult:
        async for _ in self.stream():
            pass
        assert self.result is not None
        return self.result

    def iter_sync(self, timeout: float | None = None) -> Iterator[TokenDelta]:
        while True:
            item = self._tq.get(timeout=timeout)
            if item is _DONE:
                break
            yield item
        if self.error is not None:
            raise self.error

    def wait_sync(self, timeout: float | None = None) -> GenerationResult:
        for _ in self.iter_sync(timeout):
            pass
        assert self.result is not None
        return self.result
