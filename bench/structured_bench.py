#!/usr/bin/env python
"""What constrained decoding costs: the service at concurrency 16 with every request JSON-schema-constrained, against
the same requests unconstrained.

    python bench/structured_bench.py [--size small] [--concurrency 16] [--requests 64] [--rounds 3]

Starts ``bentoml serve`` on the ``small`` demo checkpoint (as ``bench/benchmark.py`` does, with its ``Server``),
then drives the seed API over HTTP with ``--concurrency`` requests in flight, alternating rounds of the two modes
so that background load on the machine hits both alike. The schema (a report with an array of findings) is long
enough that most constrained answers run to ``max_new_tokens`` like the unconstrained ones do, so both sides decode
about the same number of tokens; throughput is output tokens over wall time, the median over rounds. Every
constrained answer that finished with "stop" is checked against the schema. Prints both throughputs and their
ratio; the issue's goal is constrained >= 0.8 x unconstrained.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/benchmark.py: Server, workload text
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from benchmark import Server, make_requests

SCHEMA = {
    "type": "object",
    "properties": {
        "impression": {"enum": ["normal", "abnormal", "indeterminate"]},
        "findings": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "label": {"type": "string", "maxLength": 40},
                    "side": {"enum": ["left", "right", "bilateral", "none"]},
                    "size_mm": {"type": "integer", "minimum": 0, "maximum": 300},
                },
                "required": ["label", "side", "size_mm"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 40,
        },
    },
    "required": ["impression", "findings"],
    "additionalProperties": False,
}
GOAL = 0.8


async def one_round(url: str, bodies: list[dict[str, Any]], c: int) -> tuple[int, float, list[dict[str, Any]]]:
    import httpx

    limits = httpx.Limits(max_connections=c + 2, max_keepalive_connections=c + 2)
    results: list[dict[str, Any]] = []
    todo = iter(bodies)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:

        async def worker() -> None:
            for body in todo:
                r = await client.post(url, json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
                results.append(r.json())

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(c, len(bodies)))))
        wall = time.perf_counter() - t0
    tokens = sum(int(r["compute_metrics"]["output_tokens"]) for r in results)
    return tokens, wall, results


def check(results: list[dict[str, Any]]) -> tuple[int, int]:
    """(answers that finished "stop", of them valid against the schema)."""
    import jsonschema

    done = valid = 0
    for r in results:
        if r["finish_reason"] != "stop":
            continue
        done += 1
        try:
            jsonschema.validate(json.loads(r["response"]), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return done, valid


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "small"), default="small")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64, help="requests per round and mode")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads of the server (default: torch's)")
    args = p.parse_args()

    import torch

    from medgemma.demo import checkpoint_name, ensure_checkpoint

    ckpt = ensure_checkpoint("vlm", args.size)
    threads = args.threads or torch.get_num_threads()
    reqs = make_requests(args.requests, images=False, max_new_tokens=args.new_tokens, seed=7)
    plain = [{"text": r.text, "max_new_tokens": r.max_new_tokens} for r in reqs]
    fmt = {"type": "json_schema", "json_schema": {"name": "report", "schema": SCHEMA}}
    constrained = [{**b, "response_format": fmt} for b in plain]
    with tempfile.TemporaryDirectory() as work:
        server = Server(
            ckpt, checkpoint_name("vlm", args.size), threads=threads, max_batch=args.concurrency, workdir=Path(work)
        )
        server.start()
        try:
            server.wait_model()
            url = f"{server.url}/{server.app}/v1/generate"
            asyncio.run(one_round(url, constrained[: args.concurrency], args.concurrency))  # warm-up, compile cache
            rates: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
            stops = valid = 0
            for rnd in range(args.rounds):
                for mode, bodies in (("unconstrained", plain), ("constrained", constrained)):
                    tokens, wall, results = asyncio.run(one_round(url, bodies, args.concurrency))
                    rates[mode].append(tokens / wall)
                    print(f"round {rnd + 1} {mode:>13}: {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} tok/s")
                    if mode == "constrained":
                        d, v = check(results)
                        stops, valid = stops + d, valid + v
        finally:
            server.stop()
    u, c = statistics.median(rates["unconstrained"]), statistics.median(rates["constrained"])
    print(f"\ncheckpoint {args.size}, concurrency {args.concurrency}, {args.requests} requests x {args.rounds} rounds")
    print(f"unconstrained {u:.1f} tok/s, constrained {c:.1f} tok/s: ratio {c / u:.3f} (goal >= {GOAL})")
    print(f"constrained answers that finished 'stop': {stops}, valid against the schema: {valid}")
    return 0 if stops == valid else 1


if __name__ == "__main__":
    raise SystemExit(main())
