"""The benchmark's answer check (bench/benchmark.py): service texts against in-process greedy output."""

from __future__ import annotations

import importlib.util
import sys

from transformers import AutoTokenizer

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("bench_benchmark", ROOT / "bench" / "benchmark.py")
bench = sys.modules["bench_benchmark"] = importlib.util.module_from_spec(_spec)  # bench/ is scripts, not a package
_spec.loader.exec_module(bench)


def result(idx: int, text: str, ids: list[int] | None = None) -> object:
    return bench.ReqResult(idx=idx, requested=8, tokens=8, ttft_s=None, latency_s=1.0, text=text, token_ids=ids)


def test_streamed_byte_tokens_are_told_apart_from_a_real_difference(tiny_vlm):
    tok = AutoTokenizer.from_pretrained(tiny_vlm)
    bracket, continuation = tok.convert_tokens_to_ids(["<0x5B>", "<0x98>"])
    ids = [bracket] * 3 + [continuation] * 2  # '[' three times, then bytes that start no UTF-8 character
    whole = tok.decode(ids, skip_special_tokens=True)
    as_streamed = bench.streamed_text(tok)
    streamed = as_streamed(ids)
    # what a stream sends: the '[' went out before the invalid bytes came; decoding the run at once replaces it all
    assert streamed.startswith("[[[") and "[" not in whole

    inproc = [result(0, whole, ids), result(1, whole, ids)]
    service = [result(0, streamed), result(1, "something else")]
    got = bench.compare_texts(service, inproc, as_streamed)
    assert got == {"identical_text": 0, "same_tokens_streamed_text": 1, "compared": 2, "input_token_mismatches": 0}
    assert bench.compare_texts(service, inproc)["same_tokens_streamed_text"] == 0  # not streamed: no second view
