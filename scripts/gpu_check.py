#!/usr/bin/env python
"""GPU check of the continuous-batching engine with the real MedGemma shapes (random weights, no download).

Run on a machine with one GPU (made for one H200: 141 GB, about 4.8 TB/s peak, ~4.3 TB/s achievable)::

    python scripts/gpu_check.py [--json $OUT/gpu_check.json] [--budget-s 420] [--skip-27b]

and, here on CPU with tiny shapes, to prove the script itself works::

    python scripts/gpu_check.py --cpu-smoke

What it does, within a time budget (default 420 s, hard stop by a watchdog 40 s later, so under 8 minutes; 27B
is skipped when less than 240 s remain):

1. builds ``Gemma3ForConditionalGeneration`` with medgemma-4b-it's shapes directly on the GPU in bf16 (random
   weights, nothing written to disk), with the demo tokenizer and a ``Gemma3Processor`` sized like the real one
   (896x896 images, 256 soft tokens per image); the shapes and the config are the demo builder's
   (``medgemma.demo_sizes``: ``MEDGEMMA_SIZES`` and ``model_config``);
2. wraps it in ``medgemma.engine.Engine`` (no BentoML needed) and measures one request alone (batch 1) and 16
   requests submitted together; then one image+text request;
3. prints tok/s, ms/token and the ratio to the memory-bandwidth bound: at batch 1 every decoded token reads all
   language-model weights once (decoder layers + LM head = tied embedding; the vision tower is not read while
   decoding), so the bound is ``bandwidth / weight_bytes`` tokens/s, and 16 x that for 16 sequences (still
   memory-bound at batch 16). KV-cache reads are left out of the bound: with ~150-token prompts and 128 new tokens
   they add under 0.5 % of the bytes per step at batch 1 and about 6 % (4B: 136 KiB per token of context) and 3 %
   (27B: 496 KiB per token) at batch 16;
4. when time allows, builds a second engine with bucketed decode steps (``MEDGEMMA_CUDA_GRAPHS``,
   ``medgemma/engine/graphs.py``), runs batch 1 and the concurrent requests again and prints decode ms/token with
   and without graphs; on a GPU the stage fails if no decode step was captured (with ``--cpu-smoke`` the same
   bucketed code runs without capture);
5. the same for medgemma-27b-it's shapes when time allows (~55 GB of bf16 weights).

Needs: torch, transformers (>= 5.0; 5.17 and 5.24 checked on CPU), its tokenizers, Pillow and numpy. Not
needed: bentoml, psutil, pydicom, PyYAML, torchvision, network. ``medgemma/{engine,loader,protocol,config,errors,
demo,demo_sizes}.py`` import only the standard library, torch, transformers and Pillow.

Exit code 0 when every stage that ran succeeded (stages skipped for lack of time are not failures), 1 when a stage
failed, 2 when no GPU is visible and ``--cpu-smoke`` was not given. The last line printed is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medgemma.demo_sizes import SizeSpec

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BANDWIDTH_BYTES_PER_S = 4.3e12  # H200: 4.8 TB/s peak HBM3e, about 4.3 TB/s reachable by a streaming kernel
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


# --- sizes ------------------------------------------------------------------------------------------------------------


def model_sizes(cpu_smoke: bool) -> dict[str, tuple[str, SizeSpec]]:
    """The two models of a run, by stage key: (name, dimensions), from the demo builder's ``SizeSpec``.

    The real ones are ``medgemma.demo_sizes.MEDGEMMA_SIZES`` (medgemma-4b-it and medgemma-27b-it as in Google's
    config.json); ``--cpu-smoke`` runs the same code path on two tiny "models", so that the 27B stage runs too.
    """
    from dataclasses import replace

    from medgemma.demo_sizes import DEMO_SIZES, MEDGEMMA_SIZES

    if not cpu_smoke:
        return {"4b": ("medgemma-4b-it", MEDGEMMA_SIZES["4b"]), "27b": ("medgemma-27b-it", MEDGEMMA_SIZES["27b"])}
    # The demo's tiny vision tower under a text stack shaped like the 4B's (6 layers, 5 local : 1 global).
    tiny_4b = replace(
        DEMO_SIZES["tiny"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        vocab_size=4096,
        sliding_window_pattern=6,
        max_position_embeddings=8192,
        initializer_range=0.02,
    )
    # Like the 27B, a query_pre_attn_scalar other than head_dim.
    tiny_27b = replace(tiny_4b, hidden_size=96, intermediate_size=192, head_dim=24, query_pre_attn_scalar=20)
    return {"4b": ("tiny-4b-like", tiny_4b), "27b": ("tiny-27b-like", tiny_27b)}


# --- building the model -----------------------------------------------------------------------------------------------


def build_tokenizer_and_processor(spec: SizeSpec) -> tuple[Any, Any, dict[str, int]]:
    """The demo tokenizer (1024 ids, real special-token layout) and a Gemma3Processor sized like ``spec``."""
    from medgemma import demo

    tokenizer = demo.build_tokenizer()
    processor = demo.build_processor(tokenizer, image_size=spec.image_size, tokens_per_image=spec.mm_tokens_per_image)
    tid = tokenizer.convert_tokens_to_ids
    ids = {
        "pad": tid(demo.PAD),
        "eos": tid(demo.EOS),
        "bos": tid(demo.BOS),
        "eot": tid(demo.END_OF_TURN),
        "boi": tid(demo.BOI),
        "eoi": tid(demo.EOI),
        "image": tid(demo.IMAGE_SOFT),
    }
    return tokenizer, processor, ids


def build_config(spec: SizeSpec, tokenizer: Any, dtype: Any) -> Any:
    """The demo builder's Gemma3Config for ``spec``; the demo tokenizer's image-token ids stand in for the real ones."""
    from medgemma.demo_sizes import model_config

    spec.check()
    return model_config("vlm", spec, tokenizer, dtype=str(dtype).removeprefix("torch."))


def build_model(spec: SizeSpec, device: str, dtype: Any) -> tuple[Any, Any, Any, dict[str, int], float]:
    import torch
    from transformers import Gemma3ForConditionalGeneration

    tokenizer, processor, ids = build_tokenizer_and_processor(spec)
    config = build_config(spec, tokenizer, dtype)
    t = time.monotonic()
    with torch.device(device):
        model = Gemma3ForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    with torch.no_grad():
        # As in medgemma.demo: a random projector (transformers starts it at zero, images would do nothing), and
        # zero embedding rows for tokens a real model never emits, EOS included: with tied embeddings their logit
        # is exactly 0, below the maximum of 262K random logits, so greedy decoding always runs to max_new_tokens.
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.normal_(0.0, proj.shape[0] ** -0.5)
        never = sorted({ids[k] for k in ("pad", "eos", "eot", "boi", "eoi", "image")})
        model.get_input_embeddings().weight[torch.tensor(never, device=device)] = 0.0
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return model, tokenizer, processor, ids, time.monotonic() - t


def weight_bytes(model: Any) -> dict[str, int]:
    """Unique parameter bytes: all, vision tower + projector, and what one decode step reads (the rest)."""
    seen: set[int] = set()
    total = vision = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied weights (embedding = LM head) are one Parameter
            continue
        seen.add(id(p))
        b = p.numel() * p.element_size()
        total += b
        if "vision_tower" in name or "multi_modal_projector" in name:
            vision += b
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "total_bytes": total, "vision_bytes": vision, "decode_bytes": total - vision}


# --- running the engine -----------------------------------------------------------------------------------------------

_PROMPT = (
    "You are an expert radiologist. A 64 year old man presents with a chronic cough and mild fever for two weeks. "
    "Prior studies showed a small nodule in the left upper lobe. Describe the likely findings on a chest X-ray, "
    "give an impression and list the differential diagnoses with the evidence for each."
)


@dataclass
class RunStats:
    requests: int
    output_tokens: int
    wall_s: float
    tok_per_s: float
    ttft_s_mean: float | None
    decode_ms_per_token: float | None  # per sequence, between first and last token
    input_tokens: list[int] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)


def make_engine(model: Any, tokenizer: Any, processor: Any, *, dtype: Any, batch: int, graphs: bool = False) -> Any:
    from transformers import GenerationConfig

    from medgemma.engine import Engine
    from medgemma.loader import LoadedModel

    config = model.config
    text = config.get_text_config()
    gen = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id, do_sample=False
    )
    loaded = LoadedModel(
        model=model,
        processor=processor,
        tokenizer=tokenizer,
        config=config,
        generation_config=gen,
        kind="vlm",
        model_id="random-weights",
        path="(in memory)",
        device=str(next(model.parameters()).device),
        dtype=str(dtype).removeprefix("torch."),
        is_demo=True,
    )
    engine = Engine(loaded, max_batch_size=batch, max_queue=max(256, batch), decode_graphs=graphs)
    engine.start()
    return engine


def run_requests(
    engine: Any, n: int, new_tokens: int, *, image: Any = None, timeout: float, sync: Callable[[], None]
) -> RunStats:
    from medgemma.protocol import GenerationRequest, ImagePart, Message, SamplingParams, TextPart

    preps = []
    for i in range(n):
        parts: list[Any] = [TextPart(f"Case {i}. {_PROMPT}")]
        if image is not None:
            parts.append(ImagePart(image, {}))
        req = GenerationRequest([Message("user", tuple(parts))], SamplingParams(max_new_tokens=new_tokens))
        preps.append(engine.prepare(req))  # processor work, off the clock as in the service (caller's thread)
    sync()
    t0 = time.perf_counter()
    handles = [engine.submit(p) for p in preps]
    results = [h.wait_sync(timeout=timeout) for h in handles]
    sync()
    wall = time.perf_counter() - t0
    toks = sum(r.output_tokens for r in results)
    ttfts = [r.timings.time_to_first_token_s for r in results if r.timings.time_to_first_token_s is not None]
    decode = [
        (r.timings.total_s - r.timings.time_to_first_token_s) / (r.output_tokens - 1)
        for r in results
        if r.output_tokens > 1 and r.timings.total_s is not None and r.timings.time_to_first_token_s is not None
    ]
    return RunStats(
        requests=n,
        output_tokens=toks,
        wall_s=wall,
        tok_per_s=toks / wall if wall > 0 else 0.0,
        ttft_s_mean=sum(ttfts) / len(ttfts) if ttfts else None,
        decode_ms_per_token=1000 * sum(decode) / len(decode) if decode else None,
        input_tokens=[r.input_tokens for r in results],
        finish=[r.finish_reason for r in results],
    )


def batch1_summary(runs: list[RunStats]) -> dict[str, Any]:
    toks = sum(r.output_tokens for r in runs)
    wall = sum(r.wall_s for r in runs)
    dec = [r.decode_ms_per_token for r in runs if r.decode_ms_per_token]
    return {
        "requests": len(runs),
        "output_tokens": toks,
        "wall_s": wall,
        "tok_per_s": toks / wall,
        "ms_per_token": 1000 * wall / toks,
        "decode_ms_per_token": sum(dec) / len(dec) if dec else None,
        "decode_tok_per_s": 1000 / (sum(dec) / len(dec)) if dec else None,
        "ttft_s": runs[0].ttft_s_mean,
        "input_tokens": runs[0].input_tokens[0],
        "finish": [f for r in runs for f in r.finish],
    }


def run_mixed(engine: Any, long_tokens: int, shorts: int, new_tokens: int, *, timeout: float) -> dict[str, Any]:
    """One prompt of about ``long_tokens`` tokens alone, then again with ``shorts`` short requests 0.2 s behind it:
    the shorts' throughput beside it against alone, and the long one's latency mixed against alone."""
    from medgemma.protocol import GenerationRequest, Message, SamplingParams, TextPart

    def req(text: str) -> Any:
        return engine.prepare(
            GenerationRequest([Message("user", (TextPart(text),))], SamplingParams(max_new_tokens=new_tokens))
        )

    per = engine.prepare(
        GenerationRequest([Message("user", (TextPart(_PROMPT),))], SamplingParams(max_new_tokens=1))
    ).n_input
    long_text = " ".join([_PROMPT] * max(1, long_tokens // per))
    short = [f"Case {i}. {_PROMPT}" for i in range(shorts)]

    def shorts_run(delay: float = 0.0) -> tuple[float, float]:
        time.sleep(delay)
        preps = [req(t) for t in short]
        t0 = time.perf_counter()
        res = [h.wait_sync(timeout) for h in [engine.submit(p) for p in preps]]
        wall = time.perf_counter() - t0
        return sum(r.output_tokens for r in res) / wall, wall

    alone_tok_s, _ = shorts_run()
    p_long = req(long_text)
    t0 = time.perf_counter()
    engine.submit(p_long).wait_sync(timeout)
    long_alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    h = engine.submit(req(long_text))
    mixed_tok_s, _ = shorts_run(0.2)
    h.wait_sync(timeout)
    long_mixed = time.perf_counter() - t0
    return {
        "long_input_tokens": p_long.n_input,
        "shorts": shorts,
        "shorts_alone_tok_s": alone_tok_s,
        "shorts_mixed_tok_s": mixed_tok_s,
        "shorts_ratio": mixed_tok_s / alone_tok_s,
        "long_alone_s": long_alone,
        "long_mixed_s": long_mixed,
        "long_ratio": long_mixed / long_alone,
    }


def test_image(size: int = 512) -> Any:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (20, 20, 20))
    draw = ImageDraw.Draw(img)
    for i in range(8):
        r = size // 16 * (i + 1)
        draw.ellipse((size // 2 - r, size // 2 - r, size // 2 + r, size // 2 + r), outline=(30 * i, 200, 255 - 30 * i))
    return img


@dataclass
class StageResult:
    shape: str
    status: str  # ok | failed | skipped
    reason: str = ""
    params: int = 0
    weight_bytes_total: int = 0
    weight_bytes_decode: int = 0
    build_s: float = 0.0
    bound_tok_s_batch1: float = 0.0
    runs: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    max_memory_gb: float | None = None
    seconds: float = 0.0


def run_stage(key: str, name: str, spec: SizeSpec, args: argparse.Namespace, deadline: float) -> StageResult:
    import torch

    cuda = not args.cpu_smoke
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def left() -> float:
        return deadline - time.monotonic()

    started = time.monotonic()
    res = StageResult(shape=name, status="ok")
    engine = model = None
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        say(
            f"[{key}] building {name} on {device} ({dtype}): hidden {spec.hidden_size}, {spec.num_hidden_layers} "
            f"layers, {spec.num_attention_heads}/{spec.num_key_value_heads} heads x {spec.head_dim}, vocab "
            f"{spec.vocab_size or 'of the tokenizer'}"
        )
        model, tokenizer, processor, _ids, res.build_s = build_model(spec, device, dtype)
        wb = weight_bytes(model)
        res.params, res.weight_bytes_total, res.weight_bytes_decode = (
            wb["params"],
            wb["total_bytes"],
            wb["decode_bytes"],
        )
        res.bound_tok_s_batch1 = BANDWIDTH_BYTES_PER_S / wb["decode_bytes"]
        say(
            f"[{key}] built in {res.build_s:.1f} s: {wb['params'] / 1e9:.3f} B params, "
            f"{wb['total_bytes'] / 1e9:.2f} GB "
            f"({wb['vision_bytes'] / 1e9:.2f} GB vision tower + projector, {wb['decode_bytes'] / 1e9:.2f} GB read per "
            f"decode step); bound at batch 1 = {BANDWIDTH_BYTES_PER_S / 1e12:.1f} TB/s / "
            f"{wb['decode_bytes'] / 1e9:.2f} GB = {res.bound_tok_s_batch1:.0f} tok/s"
        )
        engine = make_engine(model, tokenizer, processor, dtype=dtype, batch=max(args.concurrency, 1))

        say(f"[{key}] warm-up")
        run_requests(engine, 1, 4, timeout=max(left(), 1), sync=sync)
        run_requests(engine, args.concurrency, 4, timeout=max(left(), 1), sync=sync)

        n_new = args.new_tokens
        say(f"[{key}] batch 1: {args.batch1_requests} request(s) one after another, {n_new} new tokens each")
        b1 = [run_requests(engine, 1, n_new, timeout=max(left(), 1), sync=sync) for _ in range(args.batch1_requests)]
        batch1 = batch1_summary(b1)
        res.runs["batch1"] = batch1
        res.ratios["batch1_end_to_end"] = batch1["tok_per_s"] / res.bound_tok_s_batch1
        if batch1["decode_tok_per_s"]:
            res.ratios["batch1_decode"] = batch1["decode_tok_per_s"] / res.bound_tok_s_batch1
        say(
            f"[{key}] batch 1: {batch1['tok_per_s']:.1f} tok/s end to end ({batch1['ms_per_token']:.2f} ms/token), "
            f"decode {batch1['decode_ms_per_token'] or 0:.2f} ms/token = {batch1['decode_tok_per_s'] or 0:.1f} tok/s; "
            f"ratio to bound {res.ratios['batch1_end_to_end']:.3f} "
            f"(decode only {res.ratios.get('batch1_decode', 0):.3f})"
        )

        c = args.concurrency
        if left() < 20:
            raise TimeoutError("time budget spent before the concurrent run")
        say(f"[{key}] {c} concurrent requests, {n_new} new tokens each")
        cc = run_requests(engine, c, n_new, timeout=max(left(), 1), sync=sync)
        res.runs[f"concurrent{c}"] = asdict(cc)
        res.ratios[f"concurrent{c}"] = cc.tok_per_s / (c * res.bound_tok_s_batch1)
        if cc.decode_ms_per_token:
            res.ratios[f"concurrent{c}_decode"] = (1000 / cc.decode_ms_per_token) / res.bound_tok_s_batch1
        say(
            f"[{key}] {c} concurrent: {cc.tok_per_s:.1f} tok/s aggregate ({cc.tok_per_s / batch1['tok_per_s']:.1f}x "
            f"batch 1), per-sequence decode {cc.decode_ms_per_token or 0:.2f} ms/token, mean TTFT "
            f"{cc.ttft_s_mean or 0:.3f} s; ratio to {c} x bound {res.ratios[f'concurrent{c}']:.3f}"
        )

        if left() < 15:
            raise TimeoutError("time budget spent before the image request")
        say(
            f"[{key}] one image+text request (512x512 image -> {spec.image_size}px, {spec.mm_tokens_per_image} "
            "image tokens)"
        )
        img = run_requests(engine, 1, min(n_new, 64), image=test_image(), timeout=max(left(), 1), sync=sync)
        res.runs["image1"] = asdict(img)
        say(
            f"[{key}] image+text: {img.input_tokens[0]} input tokens, TTFT {img.ttft_s_mean or 0:.3f} s, "
            f"{img.output_tokens} tokens in {img.wall_s:.2f} s ({img.tok_per_s:.1f} tok/s)"
        )
        if img.input_tokens[0] < batch1["input_tokens"] + spec.mm_tokens_per_image:
            raise RuntimeError(
                f"the image request has {img.input_tokens[0]} input tokens: the {spec.mm_tokens_per_image} image "
                f"tokens are missing (text alone: {batch1['input_tokens']})"
            )
        if left() > 60:
            n_long = 512 if args.cpu_smoke else 8192
            say(f"[{key}] mixed: one ~{n_long}-token prompt beside {c - 1} short requests")
            mixed = run_mixed(engine, n_long, c - 1, min(n_new, 64), timeout=max(left(), 1))
            res.runs["mixed"] = mixed
            say(
                f"[{key}] mixed: {mixed['long_input_tokens']}-token prompt {mixed['long_alone_s']:.2f} s alone, "
                f"{mixed['long_mixed_s']:.2f} s beside the shorts ({mixed['long_ratio']:.2f}x); shorts "
                f"{mixed['shorts_alone_tok_s']:.1f} tok/s alone, {mixed['shorts_mixed_tok_s']:.1f} beside it "
                f"({mixed['shorts_ratio']:.2f}x)"
            )
        if left() > 45:
            say(f"[{key}] bucketed decode steps (MEDGEMMA_CUDA_GRAPHS): batch 1 and {c} concurrent again")
            engine.stop()
            engine = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()  # the first engine's KV pool goes back before the second one sizes its own
            engine = make_engine(model, tokenizer, processor, dtype=dtype, batch=max(c, 1), graphs=True)
            run_requests(engine, 1, 4, timeout=max(left(), 1), sync=sync)  # warm-up: the first steps capture
            run_requests(engine, c, 4, timeout=max(left(), 1), sync=sync)
            g1 = batch1_summary(
                [run_requests(engine, 1, n_new, timeout=max(left(), 1), sync=sync) for _ in range(args.batch1_requests)]
            )
            gc_ = run_requests(engine, c, n_new, timeout=max(left(), 1), sync=sync)
            stats = engine.stats().decode_graphs or {}
            res.runs["graphs"] = {"batch1": g1, f"concurrent{c}": asdict(gc_), "stats": stats}
            for run_name, plain, graphed in (
                ("batch1", batch1["decode_ms_per_token"], g1["decode_ms_per_token"]),
                (f"concurrent{c}", cc.decode_ms_per_token, gc_.decode_ms_per_token),
            ):
                if plain and graphed:
                    res.ratios[f"graphs_speedup_{run_name}_decode"] = plain / graphed
            say(
                f"[{key}] graphs: batch 1 decode {g1['decode_ms_per_token'] or 0:.2f} ms/token (without: "
                f"{batch1['decode_ms_per_token'] or 0:.2f}); {c} concurrent {gc_.tok_per_s:.1f} tok/s (without: "
                f"{cc.tok_per_s:.1f}); {stats}"
            )
            if cuda and not stats.get("graphs"):
                raise RuntimeError(f"no decode step was captured as a CUDA graph: {stats}")
            if not stats.get("replays") and not stats.get("eager_steps"):
                raise RuntimeError(f"no decode step took the bucketed path: {stats}")
        early = [f for r in (*b1, cc, img) for f in r.finish if f != "length"]
        if early:
            res.reason = f"{len(early)} request(s) ended before max_new_tokens: {sorted(set(early))}"
            say(f"[{key}] note: {res.reason} (token counts above are the tokens actually produced)")
    except TimeoutError as exc:
        res.status, res.reason = "failed", f"time budget: {exc}"
        say(f"[{key}] FAILED: {res.reason}")
    except Exception as exc:
        res.status, res.reason = "failed", f"{type(exc).__name__}: {exc}"[:800]
        say(f"[{key}] FAILED: {res.reason}")
        traceback.print_exc(file=sys.stdout)
    finally:
        if engine is not None:
            engine.stop()
        if cuda:
            res.max_memory_gb = torch.cuda.max_memory_allocated() / 1e9
        del engine, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        res.seconds = time.monotonic() - started
    return res


def check_real_shapes() -> dict[str, Any]:
    """--cpu-smoke: build the real 4B and 27B configs and models on the meta device (no memory) to check them."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    out: dict[str, Any] = {}
    for key, (name, spec) in model_sizes(cpu_smoke=False).items():
        tokenizer, _proc, _ids = build_tokenizer_and_processor(spec)
        with torch.device("meta"):
            config = build_config(spec, tokenizer, torch.bfloat16)
            model = Gemma3ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
        wb = weight_bytes(model)
        out[key] = {**wb, "bound_tok_s_batch1": BANDWIDTH_BYTES_PER_S / wb["decode_bytes"]}
        say(
            f"[meta] {name}: {wb['params'] / 1e9:.3f} B params, {wb['total_bytes'] / 1e9:.2f} GB bf16, "
            f"{wb['decode_bytes'] / 1e9:.2f} GB read per decode step -> bound {out[key]['bound_tok_s_batch1']:.0f} "
            "tok/s at batch 1 on an H200"
        )
        del model
    return out


# --- main -------------------------------------------------------------------------------------------------------------


def environment(cpu_smoke: bool) -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
        "mode": "cpu-smoke" if cpu_smoke else "gpu",
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(
            {
                "gpu": p.name,
                "gpu_memory_gb": round(p.total_memory / 1e9, 1),
                "gpu_count": torch.cuda.device_count(),
                "cuda": torch.version.cuda,
                "bf16": torch.cuda.is_bf16_supported(),
            }
        )
    for mod in ("PIL", "numpy", "tokenizers", "torchvision", "bentoml", "psutil", "pydicom"):
        try:
            m = __import__(mod)
            env[f"has_{mod}"] = getattr(m, "__version__", "yes")
        except ImportError:
            env[f"has_{mod}"] = None
    return env


def start_watchdog(hard_limit_s: float, summary: dict[str, Any]) -> None:
    """If the run overshoots its budget by far (a hung kernel, a stuck wait), print what we have and exit 3."""

    def watch() -> None:
        time.sleep(max(hard_limit_s - (time.monotonic() - T0), 1))
        say(f"WATCHDOG: {hard_limit_s:.0f} s passed; exiting with what was measured")
        print("RESULT " + json.dumps({**summary, "watchdog": True}, default=str), flush=True)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="watchdog").start()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the script, not the speed")
    p.add_argument(
        "--budget-s", type=float, default=420.0, help="time budget in seconds (default 420; hard stop 40 s later)"
    )
    p.add_argument("--min-27b-s", type=float, default=240.0, help="run 27B only if this much budget is left")
    p.add_argument("--skip-27b", action="store_true", help="4B only")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per request (default 128)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent requests (default 16)")
    p.add_argument("--batch1-requests", type=int, default=2, help="sequential requests at batch 1 (default 2)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here (e.g. $OUT/gpu_check.json)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary: dict[str, Any] = {"stages": []}
    start_watchdog(args.budget_s + 40, summary)
    deadline = T0 + args.budget_s

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    env = environment(args.cpu_smoke)
    summary["environment"] = env
    say("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    if not args.cpu_smoke and not torch.cuda.is_available():
        say("no CUDA device visible: run on the GPU machine, or pass --cpu-smoke for a CPU check of the script")
        print("RESULT " + json.dumps({**summary, "error": "no GPU"}), flush=True)
        return 2
    if args.cpu_smoke:
        torch.manual_seed(0)
    torch.set_grad_enabled(False)
    models = model_sizes(args.cpu_smoke)

    if args.cpu_smoke:
        summary["real_shapes"] = check_real_shapes()

    stages: list[StageResult] = []
    for key in ("4b", "27b"):
        remaining = deadline - time.monotonic()
        if key == "27b" and args.skip_27b:
            stages.append(StageResult(models[key][0], "skipped", "--skip-27b"))
            continue
        if key == "27b" and stages and stages[0].status == "failed":
            stages.append(StageResult(models[key][0], "skipped", "the 4B stage failed"))
            continue
        if key == "27b" and remaining < args.min_27b_s:
            stages.append(StageResult(models[key][0], "skipped", f"only {remaining:.0f} s of budget left"))
            say(f"[27b] skipped: only {remaining:.0f} s left (needs {args.min_27b_s:.0f})")
            continue
        stages.append(run_stage(key, *models[key], args, deadline))
        summary["stages"] = [asdict(s) for s in stages]

    summary["stages"] = [asdict(s) for s in stages]
    summary["bandwidth_bytes_per_s"] = BANDWIDTH_BYTES_PER_S
    summary["seconds"] = round(time.monotonic() - T0, 1)
    print_table(stages, args)
    ok = all(s.status != "failed" for s in stages)
    summary["ok"] = ok
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print("RESULT " + json.dumps(summary, default=str), flush=True)
    return 0 if ok else 1


def print_table(stages: list[StageResult], args: argparse.Namespace) -> None:
    c = args.concurrency
    print("", flush=True)
    print(
        f"| model | status | params | decode GB | bound b1 tok/s | b1 tok/s | b1 ms/token | b1 / bound "
        f"| {c}-conc tok/s | {c}-conc / ({c} x bound) | image TTFT s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in stages:
        b1 = s.runs.get("batch1", {})
        cc = s.runs.get(f"concurrent{c}", {})
        im = s.runs.get("image1", {})

        def f(x: Any, d: int = 1) -> str:
            return "-" if x is None or x == "" else f"{x:.{d}f}"

        print(
            f"| {s.shape} | {s.status}{' (' + s.reason + ')' if s.reason else ''} | {s.params / 1e9:.2f} B "
            f"| {s.weight_bytes_decode / 1e9:.2f} | {f(s.bound_tok_s_batch1 or None, 0)} | {f(b1.get('tok_per_s'))} "
            f"| {f(b1.get('ms_per_token'), 2)} | {f(s.ratios.get('batch1_end_to_end'), 3)} | {f(cc.get('tok_per_s'))} "
            f"| {f(s.ratios.get(f'concurrent{c}'), 3)} | {f(im.get('ttft_s_mean'), 3)} |"
        )
    print("", flush=True)


if __name__ == "__main__":
    sys.exit(main())
