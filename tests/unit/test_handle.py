"""The thread-to-asyncio request handle: deltas in order, coalesced when the reader lags, one outcome."""

from __future__ import annotations

import asyncio
import threading

import torch

from medgemma.engine.handle import RequestHandle
from medgemma.engine.prepare import PreparedRequest
from medgemma.protocol import GenerationResult, SamplingParams, TokenDelta


def prepared() -> PreparedRequest:
    return PreparedRequest("r1", torch.tensor([1, 2, 3]), None, None, SamplingParams(max_new_tokens=4))


def result(text: str) -> GenerationResult:
    return GenerationResult(text=text, finish_reason="length", input_tokens=3, output_tokens=4)


def test_deltas_that_piled_up_reach_a_lagging_reader_as_one_event_in_order():
    async def run() -> list[str]:
        handle = RequestHandle(prepared())
        for piece in ("Pneu", "mo", "nia", "."):  # the engine ran ahead of the event loop
            handle._emit(TokenDelta(piece))
        handle._finish(result("Pneumonia."))
        await asyncio.sleep(0)  # let call_soon_threadsafe deliver
        return [d.text async for d in handle.stream()]

    assert asyncio.run(run()) == ["Pneumonia."]


def test_a_reader_that_keeps_up_gets_every_delta_on_its_own():
    async def run() -> tuple[list[str], GenerationResult | None]:
        handle = RequestHandle(prepared())
        consumed = threading.Semaphore(0)
        got: list[str] = []

        def engine() -> None:
            for piece in ("a", "b", "c"):
                handle._emit(TokenDelta(piece))
                consumed.acquire()  # the next step's token comes after the reader took this one
            handle._finish(result("abc"))

        t = threading.Thread(target=engine)
        t.start()
        async for d in handle.stream():
            got.append(d.text)
            consumed.release()
        t.join()
        return got, handle.result

    got, res = asyncio.run(run())
    assert got == ["a", "b", "c"]
    assert res is not None and res.text == "abc"


def test_a_second_outcome_is_dropped():
    handle = RequestHandle(prepared(), stream=False)  # no event loop: the thread-safe queue
    assert handle._finish(result("first")) is True
    assert handle._finish(result("second")) is False
    assert handle.finish_calls == 2 and handle.wait_sync(timeout=1).text == "first"
