#!/usr/bin/env python
"""End-to-end throughput benchmark: the real BentoML service over HTTP against in-process transformers baselines.

One command::

    python bench/benchmark.py [--quick] [--out bench/results/latest.json]

What it does, in one process and one run:

1. builds (or reuses) the ``small`` random-weight demo checkpoint (``medgemma.demo.ensure_checkpoint``);
2. loads it in this process through ``medgemma.loader.load_model`` (the same ``AutoModelForImageTextToText`` /
   ``AutoProcessor`` classes, dtype and attention the service uses) and starts ``bentoml serve service:MedGemma``
   on a free port as a subprocess, with ``MEDGEMMA_MODEL`` pointing at the same directory;
3. for text-only and image+text requests (a 512x512 PNG each) at concurrency 1, 4 and 16, runs the **same
   requests** through
   * the service: ``httpx.AsyncClient`` with ``c`` requests in flight at a time, ``"stream": true``; TTFT is the
     client-side time to the first streamed delta, latency is request start to the final ``done`` event;
   * in-process ``generate()``: one call per request at c=1 (sequential), one left-padded batched call per
     ``c`` requests otherwise (``processor(..., padding=True)``, left padding, ``do_sample=False``);
   in-process baselines use ``min_new_tokens = max_new_tokens``; the service has no such field, so every response's
   ``output_tokens`` is checked and only tokens actually produced are counted, on both sides;
4. a mixed workload (``max_new_tokens`` drawn from 8..128, fixed seed, concurrency 16): the service's continuous
   batching against static batching in-process (batches of 16, each running until its longest request finishes);
5. prints a Markdown table, writes it to ``<out>.md`` and everything (per-request figures too) to ``<out>``.

Measurements never overlap: the server is idle (not driven) while the in-process baselines run, and the
in-process model is idle while the server is driven. Service and in-process measurements of each workload are
interleaved so that background load on the machine hits both sides alike. The client runs in this process, on
the same CPUs as the server: its CPU time is reported with each service row.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import gc
import io
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from devtools.server import BentoServer  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "latest.json"
README = ROOT / "bench" / "README.md"
README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"

# Acceptance thresholds (issue): service / in-process batched at c=16; service / in-process sequential at c=1.
ACCEPT_C16 = {"text": 0.85, "image": 0.80}
ACCEPT_C1_TOLERANCE = 0.10


# --- workload ---------------------------------------------------------------------------------------------------------

_TOPICS = (
    "chest X-ray",
    "CT of the abdomen",
    "MRI of the brain",
    "fundus photograph",
    "dermatology photograph",
    "mammogram",
    "histology slide",
    "ultrasound of the liver",
)
_SENTENCES = (
    "The patient is a 64 year old man with a chronic cough and mild fever for two weeks.",
    "Prior studies showed a small nodule in the left upper lobe that was stable.",
    "There is a history of hypertension and type 2 diabetes, treated with metformin.",
    "The referring doctor asks whether the findings are consistent with pneumonia.",
)


@dataclass
class Req:
    idx: int
    text: str
    max_new_tokens: int
    png: bytes | None = None  # the image, PNG-encoded, for the service
    image: Any = None  # the same image decoded to PIL, for the in-process baselines

    @property
    def has_image(self) -> bool:
        return self.png is not None


def make_image(seed: int, size: int = 512) -> bytes:
    """A deterministic 512x512 RGB picture (gradients, blobs, noise), PNG-encoded."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.zeros((size, size, 3), np.float32)
    for ch in range(3):
        img[..., ch] = 0.3 + 0.3 * np.sin(6.28 * (x * rng.uniform(0.5, 3) + y * rng.uniform(0.5, 3)))
    for _ in range(6):
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.03, 0.15)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-0.4, 0.6, 3)
    img += rng.normal(0, 0.03, img.shape)
    arr = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def make_requests(n: int, *, images: bool, max_new_tokens: Sequence[int] | int, seed: int) -> list[Req]:
    from PIL import Image

    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = _TOPICS[rng.randrange(len(_TOPICS))]
        context = " ".join(rng.sample(_SENTENCES, k=rng.randint(1, 3)))
        if images:
            text = f"Request {seed}-{i}. {context} Describe the findings in this {topic} and give an impression."
        else:
            text = (
                f"Request {seed}-{i}. You are reviewing a {topic}. {context} Describe the likely findings, "
                "give an impression and list the differential diagnoses."
            )
        mnt = max_new_tokens[i] if isinstance(max_new_tokens, Sequence) else max_new_tokens
        req = Req(idx=i, text=text, max_new_tokens=int(mnt))
        if images:
            req.png = make_image(seed * 1000 + i)
            req.image = Image.open(io.BytesIO(req.png)).convert("RGB")
        out.append(req)
    return out


# --- results ----------------------------------------------------------------------------------------------------------


@dataclass
class ReqResult:
    idx: int
    requested: int
    tokens: int  # real tokens produced (EOS not counted)
    ttft_s: float | None
    latency_s: float
    input_tokens: int | None = None
    finish: str | None = None
    server_ttft_s: float | None = None
    text: str = ""
    token_ids: list[int] | None = None  # in-process only: what the text was decoded from


@dataclass
class ModeResult:
    workload: str  # text | image | mixed
    concurrency: int
    mode: str  # service | inproc_sequential | inproc_batched | inproc_static
    requests: int
    output_tokens: int
    requested_tokens: int
    wall_s: float
    tok_per_s: float
    ttft_p50: float | None
    ttft_p99: float | None
    latency_p50: float
    latency_p99: float
    early_stops: int
    extra: dict[str, Any] = field(default_factory=dict)
    per_request: list[dict[str, Any]] = field(default_factory=list)


def percentile(xs: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); with few samples p99 is close to the maximum."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarise(workload: str, c: int, mode: str, results: list[ReqResult], wall: float, **extra: Any) -> ModeResult:
    toks = sum(r.tokens for r in results)
    ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
    lats = [r.latency_s for r in results]
    server = [r.server_ttft_s for r in results if r.server_ttft_s is not None]
    if server:
        extra["server_ttft_p50"] = percentile(server, 50)
        extra["server_ttft_p99"] = percentile(server, 99)
        # The first streamed delta came long after the server's first token: the stream held text back.
        extra["first_delta_held"] = sum(
            1
            for r in results
            if r.ttft_s is not None and r.server_ttft_s is not None and r.ttft_s - r.server_ttft_s > 1.0
        )
    return ModeResult(
        workload=workload,
        concurrency=c,
        mode=mode,
        requests=len(results),
        output_tokens=toks,
        requested_tokens=sum(r.requested for r in results),
        wall_s=wall,
        tok_per_s=toks / wall if wall > 0 else 0.0,
        ttft_p50=percentile(ttfts, 50),
        ttft_p99=percentile(ttfts, 99),
        latency_p50=percentile(lats, 50) or 0.0,
        latency_p99=percentile(lats, 99) or 0.0,
        early_stops=sum(1 for r in results if r.tokens < r.requested),
        extra=extra,
        per_request=[{k: v for k, v in asdict(r).items() if k not in ("text", "token_ids")} for r in results],
    )


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- in-process baselines ---------------------------------------------------------------------------------------------


class InProcess:
    """The checkpoint loaded in this process; ``generate()`` one request at a time or left-padded batches."""

    def __init__(self, path: Path) -> None:
        import torch
        from transformers.generation.streamers import BaseStreamer

        from medgemma.config import Settings
        from medgemma.loader import load_model

        self.torch = torch
        self.loaded = load_model(Settings(model=str(path)))
        self.model = self.loaded.model
        self.processor = self.loaded.processor
        self.tokenizer = self.loaded.tokenizer
        self.tokenizer.padding_side = "left"
        gen = self.loaded.generation_config
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        self.eos = {int(e) for e in eos if e is not None}
        if self.tokenizer.eos_token_id is not None:
            self.eos.add(int(self.tokenizer.eos_token_id))
        self.pad_id = self.tokenizer.pad_token_id
        self.cache_class: str | None = None
        self._engine: Any = None

        class FirstToken(BaseStreamer):
            """Records when the first generated token comes out (``generate`` first puts the prompt)."""

            def __init__(self) -> None:
                self.calls = 0
                self.first: float | None = None

            def put(self, value: Any) -> None:
                self.calls += 1
                if self.calls == 2:
                    self.first = time.perf_counter()

            def end(self) -> None:
                pass

        self._streamer_cls = FirstToken

    def encode(self, reqs: Sequence[Req]) -> Any:
        chats = []
        for r in reqs:
            content: list[dict[str, Any]] = [{"type": "text", "text": r.text}]
            if r.has_image:
                content.append({"type": "image"})
            chats.append([{"role": "user", "content": content}])
        prompts = [self.processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        kwargs: dict[str, Any] = {}
        if any(r.has_image for r in reqs):
            kwargs["images"] = [[r.image] for r in reqs]
        return self.processor(text=prompts, padding=True, return_tensors="pt", add_special_tokens=False, **kwargs)

    def run_batch(self, reqs: Sequence[Req]) -> list[ReqResult]:
        """One left-padded ``generate()`` over ``reqs``; runs until the longest request's max_new_tokens."""
        n = max(r.max_new_tokens for r in reqs)
        t0 = time.perf_counter()
        enc = self.encode(reqs)
        streamer = self._streamer_cls()
        with self.torch.inference_mode():
            out = self.model.generate(
                **enc,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=self.pad_id,
                streamer=streamer,
                return_dict_in_generate=True,
            )
        t1 = time.perf_counter()
        if self.cache_class is None:
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            self.cache_class = type(cache).__name__
        seqs = out.sequences[:, enc["input_ids"].shape[1] :].tolist()
        in_lens = enc["attention_mask"].sum(1).tolist()
        results = []
        for r, ids, n_in in zip(reqs, seqs, in_lens, strict=True):
            own = ids[: r.max_new_tokens]  # static batching: tokens past a request's own limit are waste
            real = 0
            for t in own:
                if t in self.eos:
                    break
                real += 1
            results.append(
                ReqResult(
                    idx=r.idx,
                    requested=r.max_new_tokens,
                    tokens=real,
                    ttft_s=(streamer.first - t0) if streamer.first else None,
                    latency_s=t1 - t0,
                    input_tokens=int(n_in),
                    finish="length" if real == r.max_new_tokens else "stop",
                    text=self.tokenizer.decode(own[:real], skip_special_tokens=True),
                    token_ids=own[:real],
                )
            )
        return results

    def run(self, reqs: Sequence[Req], batch: int) -> tuple[list[ReqResult], float]:
        gc.collect()
        t0 = time.perf_counter()
        results: list[ReqResult] = []
        for i in range(0, len(reqs), batch):
            results.extend(self.run_batch(reqs[i : i + batch]))
        return results, time.perf_counter() - t0

    def run_engine(self, reqs: Sequence[Req], c: int, max_batch: int) -> tuple[list[ReqResult], float]:
        """``medgemma.engine.Engine`` on this process's model, no HTTP: c threads, each prepare + submit + wait."""
        import threading

        from medgemma.protocol import GenerationRequest, ImagePart, Message, SamplingParams, TextPart

        if self._engine is None:
            from medgemma.engine import Engine

            self._engine = Engine(self.loaded, max_batch_size=max_batch)
            self._engine.start()
        engine = self._engine
        gc.collect()
        todo = iter(range(len(reqs)))
        lock = threading.Lock()
        results: list[ReqResult | None] = [None] * len(reqs)
        errors: list[BaseException] = []

        def worker() -> None:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                r = reqs[i]
                parts: list[Any] = [TextPart(r.text)]
                if r.has_image:
                    parts.append(ImagePart(r.image, {}))
                t0 = time.perf_counter()
                try:
                    req = GenerationRequest(
                        [Message("user", tuple(parts))], SamplingParams.resolve(max_new_tokens=r.max_new_tokens)
                    )
                    h = engine.submit(engine.prepare(req))
                    out = h.wait_sync(timeout=900)
                except BaseException as exc:
                    errors.append(exc)
                    return
                t1 = time.perf_counter()
                ttft = out.timings.time_to_first_token_s
                results[i] = ReqResult(
                    idx=r.idx,
                    requested=r.max_new_tokens,
                    tokens=out.output_tokens,
                    ttft_s=(h.submitted_at - t0 + ttft) if ttft is not None else None,
                    latency_s=t1 - t0,
                    input_tokens=out.input_tokens,
                    finish=out.finish_reason,
                    text=out.text,
                )

        threads = [threading.Thread(target=worker) for _ in range(min(c, len(reqs)))]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        if errors:
            raise errors[0]
        return [r for r in results if r is not None], wall

    def close(self) -> None:
        if self._engine is not None:
            self._engine.stop()
            self._engine = None

    def warm_up(self, reqs: Sequence[Req], batches: Sequence[int]) -> None:
        for b in sorted(set(batches)):
            chunk = [Req(r.idx, r.text, 4, r.png, r.image) for r in reqs[:b]]
            self.run_batch(chunk)


# --- the service ------------------------------------------------------------------------------------------------------


class Server(BentoServer):
    """The service under test (``devtools.server``), plus what the benchmark reads off it: CPU time, threads."""

    def __init__(
        self, model_dir: Path, app: str, *, threads: int, max_batch: int, workdir: Path, cwd: Path = ROOT
    ) -> None:
        env = {
            "MEDGEMMA_MODEL": str(model_dir),
            "MEDGEMMA_APP_NAME": app,
            "MEDGEMMA_MAX_BATCH_SIZE": str(max_batch),
            "MEDGEMMA_MAX_QUEUE": "1024",
            # The server's torch reads these at import: same intra-op thread count as this process.
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
        }
        # Own session: a Ctrl-C in the terminal reaches only this script, which then stops the server itself.
        super().__init__(workdir, env, cwd=cwd, new_session=True)
        self.app = app

    def wait_model(self, timeout: float = 300.0) -> dict[str, Any]:
        health = self.wait_for_model(self.app, timeout)
        if health.get("model_state") != "ready":
            raise RuntimeError(f"model failed to load: {health.get('loading_error')}")
        return health

    def cpu_seconds(self) -> float:
        import psutil

        total = 0.0
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def thread_info(self) -> list[dict[str, Any]]:
        import psutil

        info = []
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(p.cmdline())[:120]
                env = p.environ()
                info.append(
                    {
                        "pid": p.pid,
                        "cmd": cmd,
                        "os_threads": p.num_threads(),
                        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS"),
                        "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES"),
                    }
                )
        return info


def payload(req: Req, *, stream: bool) -> bytes:
    body: dict[str, Any] = {"text": req.text, "max_new_tokens": req.max_new_tokens}
    if req.png is not None:
        body["image"] = "data:image/png;base64," + base64.b64encode(req.png).decode("ascii")
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


async def _one(client: Any, url: str, req: Req, body: bytes, *, stream: bool) -> ReqResult:
    headers = {"content-type": "application/json"}
    t0 = time.perf_counter()
    first: float | None = None
    final: dict[str, Any] | None = None
    if stream:
        async with client.stream("POST", url, content=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"request {req.idx}: HTTP {resp.status_code}: {text[:500]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                ev = json.loads(line[6:])
                if ev.get("done"):
                    final = ev
                elif ev.get("status") == "streaming":
                    if first is None:
                        first = time.perf_counter()
                else:
                    raise RuntimeError(f"request {req.idx}: error event {ev}")
    else:
        resp = await client.post(url, content=body, headers=headers)
        if resp.status_code != 200:
            raise RuntimeError(f"request {req.idx}: HTTP {resp.status_code}: {resp.text[:500]}")
        final = resp.json()
    t1 = time.perf_counter()
    if final is None:
        raise RuntimeError(f"request {req.idx}: stream ended without a final event")
    m = final.get("compute_metrics", {})
    server_ttft = m.get("time_to_first_token_seconds")
    return ReqResult(
        idx=req.idx,
        requested=req.max_new_tokens,
        tokens=int(m["output_tokens"]),
        ttft_s=(first - t0) if first is not None else (server_ttft if not stream else None),
        latency_s=t1 - t0,
        input_tokens=m.get("input_tokens"),
        finish=final.get("finish_reason"),
        server_ttft_s=server_ttft,
        text=final.get("response", ""),
    )


async def _drive(
    url: str, reqs: Sequence[Req], c: int, *, stream: bool, timeout: float
) -> tuple[list[ReqResult], float]:
    import httpx

    bodies = [payload(r, stream=stream) for r in reqs]  # encoded up front: not timed
    limits = httpx.Limits(max_connections=c + 2, max_keepalive_connections=c + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        todo = iter(range(len(reqs)))
        results: list[ReqResult | None] = [None] * len(reqs)

        async def worker() -> None:
            for i in todo:  # a shared iterator: each worker takes the next request when its last one is done
                try:
                    results[i] = await asyncio.wait_for(
                        _one(client, url, reqs[i], bodies[i], stream=stream), timeout=timeout
                    )
                except TimeoutError:
                    raise RuntimeError(f"request {reqs[i].idx}: no complete answer within {timeout:.0f} s") from None

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(c, len(reqs)))))
        wall = time.perf_counter() - t0
    return [r for r in results if r is not None], wall


class CpuMeter:
    """CPU seconds spent during a measurement: by the server, by this process, and by everything else.

    "Everything else" (other users of the machine) is the system-wide busy time minus ours; it tells which rows
    were measured on a machine that was not quiet.
    """

    def __init__(self, server: Server | None) -> None:
        self.server = server
        self.start = self._now()

    def _now(self) -> tuple[float, float, float, float]:
        import psutil

        t = psutil.cpu_times()
        busy = sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
        own = os.times()
        srv = self.server.cpu_seconds() if self.server is not None else 0.0
        return time.perf_counter(), busy, own.user + own.system, srv

    def stop(self) -> dict[str, float]:
        t1, busy1, own1, srv1 = self._now()
        t0, busy0, own0, srv0 = self.start
        wall = max(t1 - t0, 1e-9)
        ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        other = max(0.0, (busy1 - busy0) - (own1 - own0) - (srv1 - srv0))
        out = {"bench_cpu_s": own1 - own0, "other_cpu_share": other / (ncpu * wall)}
        if self.server is not None:
            out["server_cpu_s"] = srv1 - srv0
        return out


def drive(
    server: Server, reqs: Sequence[Req], c: int, *, stream: bool, timeout: float = 600.0
) -> tuple[list[ReqResult], float, dict]:
    gc.collect()
    url = f"{server.url}/{server.app}/v1/generate"
    meter = CpuMeter(server)
    results, wall = asyncio.run(_drive(url, reqs, c, stream=stream, timeout=timeout))
    return results, wall, meter.stop()


# --- the run ----------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    concurrency: tuple[int, ...]
    requests: dict[int, int]  # concurrency -> number of requests
    new_tokens: int
    mixed_requests: int
    mixed_range: tuple[int, int]
    modalities: tuple[str, ...]
    repeat: int


def make_plan(args: argparse.Namespace) -> Plan:
    conc = tuple(int(c) for c in args.concurrency.split(","))
    if args.quick:
        reqs = {c: max(2, c) for c in conc}  # one round (two at c=1)
        mixed = 16
    else:
        reqs = {c: max(16, 3 * c) for c in conc}  # 16 requests at c=1 and c=4 (rounds of 4), 48 at c=16
        mixed = 48
    if args.requests:
        reqs = {c: args.requests for c in conc}
    modalities = tuple(m for m in ("text", "image") if m in args.workloads.split(","))
    repeat = args.repeat or (1 if args.quick else 2)
    return Plan(conc, reqs, args.new_tokens, args.mixed_requests or mixed, (8, 128), modalities, repeat)


def environment(inproc: InProcess, threads: int) -> dict[str, Any]:
    import bentoml
    import torch
    import transformers

    model = inproc.model
    total = sum(p.numel() for p in model.parameters())
    vision = getattr(getattr(model, "model", None), "vision_tower", None)
    n_vision = sum(p.numel() for p in vision.parameters()) if vision is not None else 0
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bentoml": bentoml.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads_inprocess": torch.get_num_threads(),
        "torch_interop_threads_inprocess": torch.get_num_interop_threads(),
        "omp_num_threads_server": threads,
        "model_path": inproc.loaded.path,
        "model_dtype": inproc.loaded.dtype,
        "model_params": total,
        "model_params_vision": n_vision,
        "model_params_text_and_projector": total - n_vision,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "loadavg_start": list(os.getloadavg()),
    }


def compare_texts(
    a: list[ReqResult], b: list[ReqResult], as_streamed: Callable[[list[int]], str] | None = None
) -> dict[str, int]:
    """Service results ``a`` against in-process ``b``, by request. ``as_streamed``: how a stream turns ids into text
    (the engine's incremental detokenizer); a text that differs from the whole-sequence decode but equals that is
    counted apart: same tokens, where byte tokens that are not valid UTF-8 decode differently piece by piece."""
    by_idx = {r.idx: r for r in b}
    same = sum(1 for r in a if r.idx in by_idx and r.text == by_idx[r.idx].text)
    same_streamed = 0
    if as_streamed is not None:
        same_streamed = sum(
            1
            for r in a
            if r.idx in by_idx
            and r.text != by_idx[r.idx].text
            and by_idx[r.idx].token_ids is not None
            and r.text == as_streamed(by_idx[r.idx].token_ids or [])
        )
    in_mismatch = sum(
        1 for r in a if r.idx in by_idx and r.input_tokens is not None and r.input_tokens != by_idx[r.idx].input_tokens
    )
    return {
        "identical_text": same,
        "same_tokens_streamed_text": same_streamed,
        "compared": len(a),
        "input_token_mismatches": in_mismatch,
    }


def streamed_text(tokenizer: Any) -> Callable[[list[int]], str]:
    """The text a streaming client receives for ``ids``: the engine's own incremental detokenizer, token by token."""
    from medgemma import reasoning
    from medgemma.engine.text import TextOut

    decode = reasoning.tag_preserving_decoder(tokenizer)

    def run(ids: list[int]) -> str:
        out = TextOut(decode, lambda _t: None)
        for i in range(1, len(ids) + 1):
            out.feed(ids[:i])
        return out.finish(ids, streamed=True, cancelled=False)

    return run


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from medgemma.demo import checkpoint_name, ensure_checkpoint

    plan = make_plan(args)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    t_start = time.perf_counter()
    log("building or reusing the small demo checkpoint")
    model_dir = ensure_checkpoint("vlm", "small", root=args.demo_dir or None)
    app = checkpoint_name("vlm", "small")

    workdir = Path(tempfile.mkdtemp(prefix="medgemma-bench-"))
    server = Server(
        model_dir, app, threads=threads, max_batch=args.max_batch_size, workdir=workdir, cwd=args.service_dir
    )
    log(f"starting bentoml serve on {server.url} (log: {server.log_path})")

    def on_signal(signum: int, _frame: Any) -> None:
        log(f"signal {signum}: killing the server and stopping")
        server.kill()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    inproc: InProcess | None = None
    try:
        inproc = InProcess(model_dir)
        env = environment(inproc, threads)
        health = server.wait_model()
        log("smoke request (4 tokens)")
        try:
            drive(server, make_requests(1, images=False, max_new_tokens=4, seed=5), 1, stream=False, timeout=120)
        except Exception as exc:
            raise RuntimeError(
                f"the service failed a 4-token request: {exc}\n--- server log ---\n{server.log_tail()}"
            ) from exc
        env["server_health"] = {k: health.get(k) for k in ("model", "device", "engine", "load_seconds")}
        env["server_processes"] = server.thread_info()
        log(f"service ready; {env['model_params']:,} params, torch threads {threads}, cpus {env['cpu_count']}")

        # Workloads: different seeds per (modality, concurrency) so no prompt repeats across measurements.
        work: dict[tuple[str, int], list[Req]] = {}
        for m_i, modality in enumerate(plan.modalities):
            for c in plan.concurrency:
                work[(modality, c)] = make_requests(
                    plan.requests[c], images=modality == "image", max_new_tokens=plan.new_tokens, seed=100 * m_i + c
                )
        rng = random.Random(1234)
        mixed_tokens = [rng.randint(*plan.mixed_range) for _ in range(plan.mixed_requests)]
        mixed = make_requests(plan.mixed_requests, images=False, max_new_tokens=mixed_tokens, seed=999)

        # Warm-up: both sides, every batch shape once (first calls pay for lazy init and allocator growth).
        log("warm-up")
        for modality in plan.modalities:
            warm = make_requests(max(plan.concurrency), images=modality == "image", max_new_tokens=4, seed=7)
            drive(server, warm, max(plan.concurrency), stream=not args.no_stream)
            drive(server, warm[:1], 1, stream=not args.no_stream)
            inproc.warm_up(warm, plan.concurrency)
            if args.engine:
                inproc.run_engine(warm, max(plan.concurrency), args.max_batch_size)

        modes: list[ModeResult] = []
        checks: dict[str, Any] = {}
        stream = not args.no_stream
        # A streamed answer is the concatenation of its deltas; compare it also with that view of the in-process ids.
        as_streamed = streamed_text(inproc.tokenizer) if stream else None

        def measure(name: str, workload: str, c: int, reqs: list[Req]) -> tuple[ModeResult, list[ReqResult]]:
            assert inproc is not None
            if name == "service":
                res, wall, cpu = drive(server, reqs, c, stream=stream)
                return summarise(workload, c, name, res, wall, **cpu), res
            meter = CpuMeter(server)
            if name == "engine":
                res, wall = inproc.run_engine(reqs, c, args.max_batch_size)
            else:
                res, wall = inproc.run(reqs, batch=c)
            return summarise(workload, c, name, res, wall, **meter.stop()), res

        def measure_all(
            names: list[str], workload: str, c: int, reqs: list[Req]
        ) -> dict[str, tuple[ModeResult, list[ReqResult]]]:
            """Each mode ``--repeat`` times, alternating the order; per mode the run with the best tok/s is kept
            (interference from other processes only ever slows a run down), the others are listed."""
            runs: dict[str, list[tuple[ModeResult, list[ReqResult]]]] = {n: [] for n in names}
            for rep in range(plan.repeat):
                for name in names if rep % 2 == 0 else names[::-1]:
                    log(f"{workload} c={c}: {_MODE_NAMES[name]} ({len(reqs)} requests, run {rep + 1}/{plan.repeat})")
                    runs[name].append(measure(name, workload, c, reqs))
            best = {}
            for name, rs in runs.items():
                m, res = max(rs, key=lambda r: r[0].tok_per_s)
                m.extra["runs_tok_per_s"] = [round(r[0].tok_per_s, 1) for r in rs]
                m.extra["runs_other_cpu_share"] = [round(r[0].extra.get("other_cpu_share", 0.0), 3) for r in rs]
                best[name] = (m, res)
            return best

        for modality in plan.modalities:
            for c in plan.concurrency:
                base_name = "inproc_sequential" if c == 1 else "inproc_batched"
                names = ["service", *(["engine"] if args.engine else []), base_name]
                got = measure_all(names, modality, c, work[(modality, c)])
                base, base_res = got[base_name]
                for name in names[:-1]:
                    m, res = got[name]
                    m.extra["ratio_vs_inproc"] = m.tok_per_s / base.tok_per_s if base.tok_per_s else None
                    checks[f"{modality}_c{c}" + ("" if name == "service" else f"_{name}")] = compare_texts(
                        res, base_res, as_streamed
                    )
                modes += [got[n][0] for n in names]
                svc = got["service"][0]
                log(
                    f"  service {svc.tok_per_s:.1f} tok/s, in-process {base.tok_per_s:.1f} tok/s, "
                    f"ratio {svc.extra['ratio_vs_inproc']:.2f}"
                )

        mixed_out: list[ModeResult] = []
        if plan.mixed_requests and not args.no_mixed:
            c = max(plan.concurrency)
            got = measure_all(["service", "inproc_static"], "mixed", c, mixed)
            (svc, s_res), (static, i_res) = got["service"], got["inproc_static"]
            svc.extra["ratio_vs_inproc"] = svc.tok_per_s / static.tok_per_s if static.tok_per_s else None
            static.extra["slot_tokens"] = sum(
                max(mixed_tokens[i : i + c]) * len(mixed_tokens[i : i + c]) for i in range(0, len(mixed), c)
            )
            checks["mixed"] = compare_texts(s_res, i_res, as_streamed)
            mixed_out = [svc, static]
            log(f"  service {svc.tok_per_s:.1f} useful tok/s, static {static.tok_per_s:.1f} useful tok/s")

        env["loadavg_end"] = list(os.getloadavg())
        env["inprocess_generate_cache"] = inproc.cache_class
    finally:
        server.stop()
        if inproc is not None:
            inproc.close()
    return {
        "quick": args.quick,
        "stream": not args.no_stream,
        "ttft_source": "server-reported" if args.no_stream else "client-side, first streamed delta",
        "plan": asdict(plan),
        "environment": env,
        "modes": [asdict(m) for m in modes],
        "mixed": [asdict(m) for m in mixed_out],
        "checks": checks,
        "acceptance": acceptance(modes),
        "total_seconds": time.perf_counter() - t_start,
        "server_log": str(server.log_path),
    }


def acceptance(modes: list[ModeResult]) -> list[dict[str, Any]]:
    out = []
    svc = {(m.workload, m.concurrency): m for m in modes if m.mode == "service"}
    base = {(m.workload, m.concurrency): m for m in modes if m.mode.startswith("inproc")}
    for (w, c), s in sorted(svc.items()):
        b = base.get((w, c))
        if b is None or not b.tok_per_s:
            continue
        ratio = s.tok_per_s / b.tok_per_s
        if c == 1:
            goal, ok = f">= {1 - ACCEPT_C1_TOLERANCE:.2f} x sequential", ratio >= 1 - ACCEPT_C1_TOLERANCE
        elif c == 16 and w in ACCEPT_C16:
            goal, ok = f">= {ACCEPT_C16[w]:.2f} x batched", ratio >= ACCEPT_C16[w]
        else:
            continue
        out.append({"workload": w, "concurrency": c, "ratio": round(ratio, 3), "goal": goal, "pass": ok})
    return out


# --- report -----------------------------------------------------------------------------------------------------------

_MODE_NAMES = {
    "service": "service (HTTP, continuous batching)",
    "engine": "engine in-process (no HTTP)",
    "inproc_sequential": "in-process, one generate() per request",
    "inproc_batched": "in-process, batched generate() (batch = c)",
    "inproc_static": "in-process, static batches of 16",
}


def _load(m: dict[str, Any]) -> str:
    share = m["extra"].get("other_cpu_share")
    return "-" if share is None else f"{100 * share:.0f} %"


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(res: dict[str, Any]) -> str:
    env = res["environment"]
    lines = [
        f"Run {env['date']} on {env['cpu_count']} CPUs ({'quick' if res['quick'] else 'full'} run, "
        f"{res['total_seconds']:.0f} s); torch {env['torch']}, transformers {env['transformers']}, "
        f"bentoml {env['bentoml']}.",
        f"Model: `small` demo checkpoint (random weights, Gemma3ForConditionalGeneration), "
        f"{env['model_params']:,} parameters ({env['model_params_vision']:,} in the vision tower), "
        f"{env['model_dtype']}, attention `{env['attn_implementation']}`; in-process generate() cache: "
        f"{env.get('inprocess_generate_cache')}.",
        f"Threads: torch intra-op {env['torch_threads_inprocess']} in-process, OMP_NUM_THREADS="
        f"{env['omp_num_threads_server']} for the server; load average {env['loadavg_start'][0]:.2f} at the start, "
        f"{env.get('loadavg_end', [0])[0]:.2f} at the end.",
        f"Each request: {res['plan']['new_tokens']} new tokens, greedy; image requests carry one 512x512 PNG. "
        f"Every row is the best of {res['plan']['repeat']} run(s) (order alternating; all runs in the JSON). "
        f"TTFT: {res['ttft_source']}. tok/s counts tokens actually produced. Other load: share of the machine's "
        "CPU time used by processes other than the benchmark and its server during the row (above ~5 % the row "
        "is not a clean measurement).",
        "",
        "| workload | c | mode | requests | output tokens | tok/s | TTFT p50 s | TTFT p99 s | latency p50 s "
        "| latency p99 s | server TTFT p50/p99 s | vs in-process | other load |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for m in res["modes"]:
        ratio = m["extra"].get("ratio_vs_inproc")
        sp50, sp99 = m["extra"].get("server_ttft_p50"), m["extra"].get("server_ttft_p99")
        server_ttft = "-" if sp50 is None else f"{sp50:.2f}/{sp99:.2f}"
        lines.append(
            f"| {m['workload']} | {m['concurrency']} | {_MODE_NAMES[m['mode']]} | {m['requests']} | "
            f"{m['output_tokens']} | {m['tok_per_s']:.1f} | {_f(m['ttft_p50'])} | {_f(m['ttft_p99'])} | "
            f"{_f(m['latency_p50'])} | {_f(m['latency_p99'])} | {server_ttft} | {_f(ratio)} | {_load(m)} |"
        )
    if res["mixed"]:
        s, st = res["mixed"]
        lines += [
            "",
            f"Mixed workload: {s['requests']} text requests, max_new_tokens drawn from 8..128 (seed 1234, "
            f"{s['requested_tokens']} tokens asked for), concurrency {s['concurrency']}.",
            "",
            "| mode | useful tokens | wall s | useful tok/s | latency p50 s | latency p99 s | other load |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for m in (s, st):
            lines.append(
                f"| {_MODE_NAMES[m['mode']]} | {m['output_tokens']} | {m['wall_s']:.1f} | {m['tok_per_s']:.1f} | "
                f"{_f(m['latency_p50'])} | {_f(m['latency_p99'])} | {_load(m)} |"
            )
        gain = s["extra"].get("ratio_vs_inproc")
        lines += [
            "",
            f"Continuous over static batching: {_f(gain)}x useful tok/s; static batching computed "
            f"{st['extra'].get('slot_tokens')} token slots for {st['output_tokens']} useful tokens.",
        ]
    if res["acceptance"]:
        lines += ["", "| acceptance | ratio | goal | result |", "|---|---:|---|---|"]
        for a in res["acceptance"]:
            lines.append(
                f"| {a['workload']} c={a['concurrency']} | {a['ratio']:.2f} | {a['goal']} | "
                f"{'PASS' if a['pass'] else 'FAIL'} |"
            )
    notes = []
    for m in res["modes"] + res["mixed"]:
        if m["early_stops"]:
            notes.append(
                f"{m['workload']} c={m['concurrency']} {m['mode']}: {m['early_stops']} request(s) stopped at EOS "
                "before max_new_tokens; only produced tokens are counted."
            )
        if m["extra"].get("first_delta_held"):
            notes.append(
                f"{m['workload']} c={m['concurrency']} {m['mode']}: for {m['extra']['first_delta_held']} "
                "request(s) the first streamed delta came over 1 s after the server's first token "
                "(server-reported TTFT p50/p99 "
                f"{_f(m['extra']['server_ttft_p50'])}/{_f(m['extra']['server_ttft_p99'])} s): the engine holds back "
                "text that does not decode to complete characters yet."
            )
        if len(m["extra"].get("runs_tok_per_s", [])) > 1:
            runs = ", ".join(f"{t:.1f}" for t in m["extra"]["runs_tok_per_s"])
            loads = ", ".join(f"{100 * x:.0f} %" for x in m["extra"]["runs_other_cpu_share"])
            notes.append(f"{m['workload']} c={m['concurrency']} {m['mode']}: runs {runs} tok/s (other load {loads}).")
        if m["mode"] == "service" and "server_cpu_s" in m["extra"]:
            notes.append(
                f"{m['workload']} c={m['concurrency']} service: server used {m['extra']['server_cpu_s']:.1f} CPU-s, "
                f"client (this process) {m['extra']['bench_cpu_s']:.1f} CPU-s in {m['wall_s']:.1f} s."
            )
    for k, v in res["checks"].items():
        notes.append(
            f"{k}: {v['identical_text']}/{v['compared']} service texts identical to in-process greedy output"
            + (
                f" ({v['same_tokens_streamed_text']} more equal to the same token ids detokenized piece by piece, as "
                "a stream is: byte tokens that are not valid UTF-8)"
                if v.get("same_tokens_streamed_text")
                else ""
            )
            + f"; {v['input_token_mismatches']} prompt-length mismatches."
        )
    if notes:
        lines += [
            "",
            "<details><summary>Checks and CPU use</summary>",
            "",
            *[f"- {n}" for n in notes],
            "",
            "</details>",
        ]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def update_readme(table: str) -> None:
    if not README.exists():
        return
    text = README.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        return
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    write_atomic(README, f"{head}{README_START}\n{table}{README_END}{tail}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: one round per concurrency, 16 mixed requests")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (the Markdown table goes next to it)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels (default 1,4,16)")
    p.add_argument("--workloads", default="text,image", help="text, image or both (default both)")
    p.add_argument("--new-tokens", type=int, default=64, help="max_new_tokens of each request (default 64)")
    p.add_argument("--requests", type=int, default=0, help="requests per concurrency level (default: by plan)")
    p.add_argument("--mixed-requests", type=int, default=0, help="requests in the mixed workload (default: by plan)")
    p.add_argument("--no-mixed", action="store_true", help="skip the mixed workload")
    p.add_argument(
        "--repeat",
        type=int,
        default=0,
        help="runs of every measurement, order alternating; the best tok/s is kept (default: 2 full, 1 quick)",
    )
    p.add_argument(
        "--engine", action="store_true", help="also run medgemma.engine.Engine in this process (no HTTP) per workload"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads for both sides (default: torch's default)")
    p.add_argument("--max-batch-size", type=int, default=16, help="MEDGEMMA_MAX_BATCH_SIZE of the server")
    p.add_argument(
        "--service-dir", type=Path, default=ROOT, help="checkout whose service.py is served (default: this one)"
    )
    p.add_argument("--demo-dir", default="", help="where demo checkpoints live (default: medgemma.demo's default)")
    p.add_argument(
        "--no-stream", action="store_true", help="non-streaming requests; TTFT then is the server-reported one"
    )
    p.add_argument(
        "--readme",
        choices=("auto", "yes", "no"),
        default="auto",
        help="replace the table in bench/README.md (auto: on full runs with the default --out)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    table = markdown(res)
    out: Path = args.out
    write_atomic(out, json.dumps(res, indent=1) + "\n")
    write_atomic(out.with_suffix(".md"), table)
    if args.readme == "yes" or (args.readme == "auto" and not args.quick and out == DEFAULT_OUT):
        update_readme(table)
    print(table)
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
