"""Bucketed (CUDA-graph-ready) decode steps: padded rows and context change no token.

On a CPU nothing is captured, so these tests run the exact fixed-shape code a graph would record: the static
buffers, the scratch slot that padding reads and writes, and the per-bucket plans. The oracle is ``generate()``.
"""

from __future__ import annotations

import time

import pytest
import torch

from medgemma.config import Settings
from medgemma.engine import Engine
from medgemma.engine.graphs import DecodeGraphs, batch_buckets, length_bucket
from medgemma.engine.kv_cache import KVLayout, PagedKVCache
from medgemma.loader import load_model
from tests.helpers import greedy_generate
from tests.unit.test_paged_engine import LOGIT_TOLERANCE, image, long_text, request


@pytest.fixture(scope="module")
def vlm(tiny_vlm):
    return load_model(Settings(model=str(tiny_vlm)))


@pytest.fixture
def engine(vlm):
    eng = Engine(vlm, max_batch_size=8, decode_graphs=True)
    eng.start()
    yield eng
    eng.stop()


def test_buckets():
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(1) == [1]
    assert [length_bucket(n, 16, None) for n in (1, 16, 17, 33, 200)] == [16, 16, 32, 64, 256]
    assert length_bucket(60, 16, 64) == 64 and length_bucket(64, 16, 48) == 64  # never shorter than the row


def test_the_scratch_block_is_never_handed_to_a_row(vlm):
    layout = KVLayout.from_model(vlm.model)
    cache = PagedKVCache(layout, budget_bytes=2**20, block_size=16, max_rows=2, max_chunk=32, scratch=True)
    for kind, pool in cache.pools.items():
        slot = cache.scratch[kind]
        assert slot == pool.num_blocks * 16
        tensors = [k for k, lk in zip(cache.k, layout.kinds, strict=True) if lk == kind]
        assert all(t.shape[0] == slot + 16 for t in tensors)  # one block past the pool's own
        assert pool.reserve(pool.num_blocks)
        taken = {pool.take() for _ in range(pool.num_blocks)}
        assert slot // 16 not in taken
    with pytest.raises(ValueError, match="scratch"):
        DecodeGraphs(
            vlm.model,
            PagedKVCache(layout, budget_bytes=2**20, block_size=16, max_rows=2, max_chunk=32),
            max_rows=2,
            device=torch.device("cpu"),
        )


def test_padded_decode_steps_match_generate(engine, monkeypatch):
    """Five, then seven rows in buckets of 8 (padding rows), rows joining while others decode, a prompt five windows
    long, an image row, and a short prompt decoded past the window (its sliding context capped at the window).

    Every bucketed step's logits are also checked against the same step on the default (unpadded) path: the tiny
    random model's greedy tokens alone would not notice a key too many."""
    window = engine.kv.window
    assert window is not None
    steps: list[tuple[int, int, dict]] = []
    graphs = engine.graphs
    assert graphs is not None and not graphs.capture  # CPU: the bucketed code runs eagerly
    real_run = graphs.run

    def recording(rows):
        views = {k: max(graphs._view(r, k).shape[0] for r in rows) for k in engine.kv.pools}
        steps.append((len(rows), next(b for b in graphs.buckets if b >= len(rows)), views))
        return real_run(rows)

    monkeypatch.setattr(graphs, "run", recording)
    diffs: list[float] = []
    real_forward = engine._forward

    def compared(work):
        logits = real_forward(work)
        if engine._graphable(work):  # the same step on the default path (it rewrites the same K/V to the same slots)
            engine.graphs = None
            try:
                diffs.append((real_forward(work) - logits).abs().max().item())
            finally:
                engine.graphs = graphs
        return logits

    monkeypatch.setattr(engine, "_forward", compared)
    first = [
        request(long_text(5 * window, seed=1), n=20),
        request("short question", n=window + 24),
        request(long_text(window, seed=2), n=24, images=(image(1),)),
        request("another short one", n=12),
        request(long_text(30, seed=4), n=16),
    ]
    later = [request("a second wave", n=18), request(long_text(50, seed=5), n=10)]
    expected = [greedy_generate(engine, r) for r in first + later]
    handles = [engine.submit(engine.prepare(r)) for r in first]
    while not any(len(row.generated) >= 3 for row in list(engine._rows)):
        time.sleep(0.005)  # let the first wave start decoding
    handles += [engine.submit(engine.prepare(r)) for r in later]
    got = [h.wait_sync(180).token_ids for h in handles]

    assert got == expected
    assert len({tuple(t) for t in expected}) == len(expected)
    assert len(diffs) == len(steps) and max(diffs) < LOGIT_TOLERANCE
    assert any(n < bucket for n, bucket, _ in steps), "no step was padded with rows"
    assert any(n >= 6 for n, _, _ in steps), "the rows that joined never decoded beside the first ones"
    assert any(v["sliding"] == window for _, _, v in steps), "no row decoded past the sliding window"
    assert graphs.eager_steps == len(steps)


def test_a_failed_capture_falls_back_to_running_without_graphs(engine, caplog):
    """On this CPU any capture fails (no CUDA): the step that tried still answers, later ones run without graphs."""
    graphs = engine.graphs
    assert graphs is not None
    graphs.capture = True
    req = request("short question", n=8)
    expected = greedy_generate(engine, req)
    with caplog.at_level("WARNING", logger="medgemma.engine.graphs"):
        result = engine.submit(engine.prepare(req)).wait_sync(60)
    assert result.token_ids == expected
    steps = len(expected) - 1 + (result.finish_reason == "stop")  # the first token comes from the prompt's step
    assert graphs.capture is False and graphs.graphs == 0 and graphs.eager_steps == steps
    (record,) = caplog.records
    assert record.getMessage().startswith("CUDA graph capture failed (") and "run without graphs" in record.getMessage()
