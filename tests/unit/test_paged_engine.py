"""The paged KV cache, chunked prefill and length grouping, on real (tiny, random-weight) Gemma 3 models.

The oracle is transformers' own ``generate()`` / full forward on the same weights, with one request alone.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
from PIL import Image

from medgemma.config import Settings
from medgemma.engine import Engine
from medgemma.engine import scheduler as scheduler_module
from medgemma.engine.kv_cache import KVLayout, budget_for_tokens
from medgemma.errors import BadRequest
from medgemma.loader import load_model
from medgemma.protocol import GenerationRequest, ImagePart, Message, SamplingParams, TextPart
from tests.helpers import greedy_generate

# fp32 on CPU: chunked prefill and paged attention add the same terms in another order, so logits move in the last
# bits only. 1e-4 (absolute, logits of order 1) is far above that noise and far below a real difference.
LOGIT_TOLERANCE = 1e-4

WORDS = ["the", "patient", "presents", "with", "fever", "cough", "and", "shortness", "of", "breath", "after"]


@pytest.fixture(scope="module")
def vlm(tiny_vlm):
    return load_model(Settings(model=str(tiny_vlm)))


def image(seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def long_text(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))


def request(text: str, *, n: int = 16, images: tuple[Image.Image, ...] = ()) -> GenerationRequest:
    parts: list = [TextPart(text), *(ImagePart(im, {}) for im in images)]
    if images:
        parts.append(TextPart("and after the images, more words"))
    return GenerationRequest([Message("user", tuple(parts))], SamplingParams.resolve(max_new_tokens=n))


@pytest.fixture
def make_engine(vlm):
    engines: list[Engine] = []

    def make(**kw) -> Engine:
        eng = Engine(vlm, **{"max_batch_size": 16, **kw})
        eng.start()
        engines.append(eng)
        return eng

    yield make
    for e in engines:
        e.stop()


def test_long_prompts_past_the_window_beside_short_ones_match_generate(make_engine):
    eng = make_engine(prefill_chunk_tokens=48)
    window = eng.kv.window
    assert window is not None
    reqs = [
        request(long_text(5 * window, seed=1), n=24),
        request("short question", n=20),
        request(long_text(2 * window, seed=2), n=30, images=(image(1), image(2))),
        request("another short one", n=8),
    ]
    assert eng.prepare(reqs[0]).n_input > 3 * window
    expected = [greedy_generate(eng, r) for r in reqs]
    handles = [eng.submit(eng.prepare(r)) for r in reqs]
    got = [h.wait_sync(120).token_ids for h in handles]
    assert got == expected
    assert len({tuple(t) for t in expected}) == len(expected)  # distinct answers: rows cannot be mixed up unseen


def test_chunk_boundaries_never_split_an_image_and_chunked_logits_match_one_pass(make_engine, monkeypatch):
    eng = make_engine(prefill_chunk_tokens=16)  # the smallest chunk: boundaries fall inside text and at images
    req = request(long_text(40, seed=3), n=6, images=(image(3), image(4), image(5)))
    p = eng.prepare(req)
    spans = p.image_spans()
    assert len(spans) == 3

    chunks: list[tuple[int, int]] = []
    real_forward = eng._forward

    def recording(work):
        chunks.extend((s, e) for row, s, e in work if s < row.n_input)
        return real_forward(work)

    first_logits: list[torch.Tensor] = []
    real_sample = scheduler_module.sample

    def capture(rows, logits, **kw):
        if not first_logits:
            first_logits.append(logits[0].clone())
        return real_sample(rows, logits, **kw)

    # the oracle first: the engine frees the request's image tensors once its prompt is read
    with torch.no_grad():
        full = eng.model(
            input_ids=p.input_ids[None],
            pixel_values=p.pixel_values,
            token_type_ids=p.token_type_ids[None],
            attention_mask=torch.ones_like(p.input_ids[None]),
        ).logits[0, -1]
    monkeypatch.setattr(eng, "_forward", recording)
    monkeypatch.setattr(scheduler_module, "sample", capture)
    got = eng.submit(p).wait_sync(60).token_ids

    assert len(chunks) > 3, "the prompt was not read in chunks"
    assert chunks[0][0] == 0 and chunks[-1][1] == p.n_input
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    assert any(e not in {s for s, _ in spans} | {e for _, e in spans} for _, e in chunks[:-1]), "no cut inside text"
    for start, end in chunks:
        for s, e in spans:
            assert not (start < s < end < e or s < start < e), f"chunk {start}:{end} splits image {s}:{e}"

    assert torch.allclose(first_logits[0], full.float(), atol=LOGIT_TOLERANCE, rtol=0)
    assert got == greedy_generate(eng, req)


def test_sliding_layers_never_hold_more_than_the_window(make_engine, monkeypatch):
    eng = make_engine(prefill_chunk_tokens=32)
    window, bs = eng.kv.window, eng.kv.block_size
    worst = {"sliding": 0, "full": 0, "steps": 0}
    real_step = eng._step

    def step():
        real_step()
        worst["steps"] += 1
        for row in list(eng._rows):
            worst["sliding"] = max(worst["sliding"], eng.kv.held_tokens(row.kv, "sliding"))
            worst["full"] = max(worst["full"], eng.kv.held_tokens(row.kv, "full"))

    monkeypatch.setattr(eng, "_step", step)
    reqs = [request(long_text(6 * window, seed=4), n=3 * window), request("short", n=2 * window)]
    for h in [eng.submit(eng.prepare(r)) for r in reqs]:
        h.wait_sync(120)
    assert worst["steps"] > 3 * window
    assert worst["full"] > 6 * window  # the full layers did keep the whole context
    assert 0 < worst["sliding"] <= window + bs  # the window plus at most one partly used block


def test_sixteen_requests_with_one_6000_token_prompt_fit_a_budget_for_8000_tokens(vlm):
    layout = KVLayout.from_model(vlm.model)
    eng = Engine(
        vlm,
        max_batch_size=16,
        kv_cache_bytes=budget_for_tokens(layout, 8000, block_size=16, max_rows=16, max_chunk=512),
    )
    assert 8000 <= eng.kv.capacity_tokens < 8100
    eng.start()
    try:
        per_word = eng.prepare(request(long_text(1000, seed=5))).n_input / 1000
        long = request(long_text(round(6000 / per_word), seed=5), n=16)
        assert 5900 < eng.prepare(long).n_input < 6100
        shorts = [request(f"short question number {i}", n=16) for i in range(15)]
        handles = [eng.submit(eng.prepare(r)) for r in [long, *shorts]]
        results = [h.wait_sync(300) for h in handles]
    finally:
        eng.stop()
    assert [r.output_tokens for r in results] == [16] * 16
    assert eng.kv.stats()["full"]["blocks_used"] == 0


def test_requests_wait_for_kv_blocks_and_one_that_never_fits_is_a_400(vlm):
    layout = KVLayout.from_model(vlm.model)
    eng = Engine(
        vlm, max_batch_size=8, kv_cache_bytes=budget_for_tokens(layout, 256, block_size=16, max_rows=8, max_chunk=512)
    )
    eng.start()
    try:
        with pytest.raises(BadRequest) as info:
            eng.prepare(request(long_text(400, seed=6), n=16))
        assert "KV cache" in info.value.message and info.value.status_code == 400
        # each needs ~100 tokens of a 256-token pool: at most two run at once, the rest wait (no 429, no failure)
        reqs = [request(f"question {i}", n=80) for i in range(6)]
        handles = [eng.submit(eng.prepare(r)) for r in reqs]
        peak = 0
        while not all(h.done for h in handles):
            peak = max(peak, eng.stats().running)
        assert [h.wait_sync(60).output_tokens for h in handles] == [80] * 6
        assert 1 <= peak <= 2
    finally:
        eng.stop()


def test_decoding_rows_advance_every_step_while_a_long_prompt_is_read_in_efficient_chunks(make_engine, monkeypatch):
    eng = make_engine(prefill_chunk_tokens=256)
    steps: list[tuple[set[str], list[tuple[str, int, int, int]]]] = []  # (decoding ids, prompt chunks)
    real_forward = eng._forward

    def recording(work):
        decoding = {r.handle.request_id for r, s, e in work if s >= r.n_input}
        chunks = [(r.handle.request_id, s, e, r.n_input) for r, s, e in work if s < r.n_input]
        steps.append((decoding, chunks))
        return real_forward(work)

    monkeypatch.setattr(eng, "_forward", recording)
    shorts = [eng.submit(eng.prepare(request(f"short question {i}", n=80))) for i in range(3)]
    while len(steps) < 3:  # the shorts are decoding before the long prompt arrives
        time.sleep(0.005)
    long_p = eng.prepare(request(long_text(900, seed=7), n=4))
    assert long_p.n_input > 3 * 256
    long_h = eng.submit(long_p)
    results = [h.wait_sync(120) for h in shorts]
    assert long_h.wait_sync(120).output_tokens == 4

    short_ids = {h.request_id for h in shorts}
    beside = [(d, c) for d, c in steps if d & short_ids and any(rid == long_h.request_id for rid, *_ in c)]
    assert beside, "the long prompt was never read while the shorts decoded"
    for decoding, chunks in steps:
        for rid, start, end, n_input in chunks:
            if rid == long_h.request_id and decoding:
                # beside decoding rows a long prompt is read in chunks of at least the efficient minimum
                assert end - start >= scheduler_module._MIN_DECODING_CHUNK or end == n_input
    # the decoding rows are never held up: each short produced a token in every step from its first to its last
    for h, r in zip(shorts, results, strict=True):
        own = [i for i, (d, _) in enumerate(steps) if h.request_id in d]
        assert own == list(range(own[0], own[0] + len(own)))
        assert len(own) == r.output_tokens - 1 + (r.finish_reason == "stop")
