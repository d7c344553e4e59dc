"""The soak's verdicts: the memory slope fit and the validation of every 200 body (bench/soak.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("bench_soak", ROOT / "bench" / "soak.py")
soak = sys.modules["bench_soak"] = importlib.util.module_from_spec(_spec)  # bench/ is scripts, not a package
_spec.loader.exec_module(soak)

MB = 2**20


def test_slope_is_fitted_after_warm_up_only():
    # 60 s of warm-up growth (2 MB/s), then a steady 0.1 MB/s leak: the fit must see the leak, not the warm-up.
    samples = [(t, int((500 + 2 * min(t, 60) + 0.1 * max(0, t - 60)) * MB)) for t in range(0, 181, 2)]
    trend = soak.rss_trend(samples, warmup_s=60)
    assert trend.samples == 61 and trend.first_s == 60 and trend.last_s == 180
    assert trend.slope_mb_per_min == pytest.approx(6.0, rel=1e-3)
    assert trend.stderr_mb_per_min < 0.01
    assert trend.percent_per_min == pytest.approx(100 * 6.0 / trend.mean_mb)


def test_flat_noisy_memory_has_a_slope_near_zero_with_its_error():
    samples = [(t, int((700 + (3 if t % 4 else -3)) * MB)) for t in range(60, 200, 2)]
    trend = soak.rss_trend(samples, warmup_s=60)
    assert abs(trend.slope_mb_per_min) < 2 * trend.stderr_mb_per_min + 0.1


def test_too_few_samples_give_no_slope():
    assert soak.rss_trend([(70.0, 100 * MB)], warmup_s=60) is None
    assert soak.rss_trend([(10.0, MB), (20.0, MB)], warmup_s=60) is None
    assert math.isnan(soak.rss_trend([(61.0, MB), (62.0, 2 * MB)], warmup_s=60).stderr_mb_per_min)


def test_growth_per_request_does_not_depend_on_the_request_rate():
    # 4 KB left behind by every request: the same figure at 20 and at 140 requests/s, where MB/min differ 7-fold.
    for rate in (20, 140):
        samples = [soak.Sample(t, rate * t, {"1:python": 800 * MB + 4096 * rate * t}) for t in range(0, 301, 2)]
        fit = soak.rss_per_request(samples, warmup_s=60)
        assert fit.kb_per_request == pytest.approx(4.0)
        assert fit.requests == rate * 240
        per_minute = soak.rss_trend([(x.t, x.rss) for x in samples], 60).slope_mb_per_min
        assert per_minute == pytest.approx(rate * 60 * 4 / 1024)


def test_no_growth_per_request_when_memory_is_flat():
    samples = [soak.Sample(t, 50 * t, {"1:python": (700 + (3 if t % 4 else -3)) * MB}) for t in range(0, 301, 2)]
    fit = soak.rss_per_request(samples, warmup_s=60)
    assert abs(fit.kb_per_request) < 2 * fit.stderr_kb + 0.01


def test_no_growth_per_request_without_requests():
    assert soak.rss_per_request([soak.Sample(t, 7, {"1:python": MB}) for t in range(60, 100, 2)], 60) is None


def seed_body(**changes):
    body = {
        "status": "success",
        "model": "m",
        "response": "ab",
        "parameters": dict.fromkeys(soak.SIX_PARAMETERS) | {"max_new_tokens": 4, "do_sample": False},
        "finish_reason": "length",
        "request_id": "r",
        "compute_metrics": {"input_tokens": 9, "output_tokens": 4},
    }
    return body | changes


TEXT = soak.Request("text", "/a/v1/generate", {"text": "q", "max_new_tokens": 4})
STREAM = soak.Request("stream", "/a/v1/generate", {"text": "q", "max_new_tokens": 4, "stream": True}, stream=True)
OPENAI = soak.Request("openai", "/v1/chat/completions", {"model": "a", "messages": [], "max_tokens": 4})


def sse(*events):
    return "".join(f"data: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events).encode()


@pytest.mark.parametrize(
    ("req", "raw", "problem"),
    [
        (TEXT, json.dumps(seed_body()).encode(), None),
        (TEXT, json.dumps(seed_body(status="error")).encode(), "status"),
        (
            TEXT,
            json.dumps(seed_body(compute_metrics={"input_tokens": 9, "output_tokens": 5})).encode(),
            "output_tokens",
        ),
        (TEXT, json.dumps(seed_body(finish_reason="cancelled")).encode(), "finish_reason"),
        (TEXT, b"[]", "not a JSON object"),
        (TEXT, b"{", "JSONDecodeError"),
        (TEXT, json.dumps({"status": "success"}).encode(), "KeyError"),
        # a delta holding U+2028 must not be split as if it were a line break
        (STREAM, sse({"status": "streaming", "delta": "a\u2028"}, seed_body(response="a\u2028", done=True)), None),
        (STREAM, sse({"status": "streaming", "delta": "a"}, seed_body(response="ab", done=True)), "add up"),
        (STREAM, sse({"status": "streaming", "delta": "ab"}, seed_body(response="ab")), "final"),
        (
            OPENAI,
            json.dumps(
                {
                    "object": "chat.completion",
                    "choices": [{"message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 6},
                }
            ).encode(),
            "add up",
        ),
    ],
)
def test_every_200_body_is_checked(req, raw, problem):
    found = soak.validate_body(req, raw)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
